"""Qwen3.5/3.6 model code: configuration, layers with rollback, the MTP head, loading."""
