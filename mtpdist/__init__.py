"""mtpdist: one Qwen3.5/3.6 model across several machines, with MTP speculative decoding."""

__version__ = "0.1.0"
