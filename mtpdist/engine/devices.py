"""Which accelerator backend MLX runs on here."""

import mlx.core as mx


def backend_name() -> str:
    if mx.default_device() == mx.cpu:
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"


def mlx_version() -> str:
    return mx.__version__
