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


def measure_read_gbps(mib: int = 64, repeats: int = 5) -> float:
    """How fast this machine streams weights through a one-row matmul (the decode regime), GB/s.
    A stage's forward time is about its weight bytes over this, so placement can balance stages."""
    import time

    import mlx.core as mx
    rows = (mib << 20) // (2 * 4096)
    w = mx.random.normal((rows, 4096)).astype(mx.float16)
    x = mx.random.normal((1, 4096)).astype(mx.float16)
    mx.eval(w, x)
    mx.eval(x @ w.T)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(x @ w.T)
        best = min(best, time.perf_counter() - t)
    return w.nbytes / best / 1e9
