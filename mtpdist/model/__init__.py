"""Model code: Qwen3.5/3.6/3.8 (qwen35, layers) and Qwen3.8-Flash-Next (qwen4exp*):
configuration, layers with rollback, the MTP heads, loading."""
