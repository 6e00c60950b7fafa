"""Real `mtpdist worker` processes on 127.0.0.1 for tests (the product's own launcher)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from mtpdist.coordinator.local_cluster import LocalCluster, LocalWorker

WorkerProcess = LocalWorker


@contextmanager
def workers(n: int, cache_root: Path, *extra: str):
    with LocalCluster(n, cache_root, *extra) as c:
        yield c.workers
