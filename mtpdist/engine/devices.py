"""Which accelerator backend MLX runs on here."""

import mlx.core as mx


def backend_name() -> str:
    """"metal", "cuda" or "cpu": where MLX runs by default here."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"


def mlx_version() -> str:
    """The installed MLX version."""
    return mx.__version__
