"""How fast this machine reads weights (placement balances stages by it)."""

import mlx.core as mx


def measure_read_gbps(mib: int = 64, repeats: int = 5) -> float:
    """How fast this machine streams weights through a one-row matmul (the decode regime), GB/s.
    A stage's forward time is about its weight bytes over this, so placement can balance stages."""
    import time

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
