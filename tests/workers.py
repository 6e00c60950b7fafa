"""Start real `mtpdist worker` processes on 127.0.0.1 for tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path


class WorkerProcess:
    def __init__(self, cache: Path, *extra: str):
        env = dict(os.environ, MTPDIST_CACHE=str(cache), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "mtpdist.cli", "worker", "--port", "0", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.time() + 60
        self.address = None
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}")
            m = re.search(r"listening on (\S+:\d+)", line)
            if m:
                self.address = m.group(1)
                break
        if self.address is None:
            self.stop()
            raise RuntimeError("worker did not start in time")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.proc.stdout:
            self.proc.stdout.close()


@contextmanager
def workers(n: int, cache_root: Path, *extra: str):
    procs = [WorkerProcess(cache_root / f"w{i}", *extra) for i in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()
