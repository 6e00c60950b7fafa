"""Start `mtpdist worker` processes on this machine (bench, demo, tests)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path


class LocalWorker:
    """One worker subprocess on 127.0.0.1 with a free port."""

    def __init__(self, cache: Path | None = None, *extra: str, host: str = "127.0.0.1", start_timeout: float = 60,
                 token: str | None = None, advertise: bool = False, cpus: tuple[int, ...] = (),
                 gpu: str | None = None):
        """`cpus`: pin the worker to these cores; `gpu`: its CUDA_VISIBLE_DEVICES (one GPU each, like separate Macs)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        if cache is not None:
            env["MTPDIST_CACHE"] = str(cache)
            env["MTPDIST_CONFIG"] = str(cache / "config")
        env.pop("MTPDIST_TOKEN", None)
        if token:  # in the environment, not on the command line, where `ps` would show it to every user
            env["MTPDIST_TOKEN"] = token
        extra = (*extra, *(() if token else ("--insecure",)),
                 *(("--mdns-interface", host) if advertise else ("--no-advertise",)))
        self.proc = subprocess.Popen([sys.executable, "-m", "mtpdist.cli", "worker", "--host", host, "--port", "0",
                                      *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        self.cpus = cpus
        self.address = None
        self.log: list[str] = []
        deadline = time.time() + start_timeout
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                break
            self.log.append(line)
            m = re.search(r"listening on (\S+:\d+)", line)
            if m:
                self.address = m.group(1)
                return
        self.stop()
        raise RuntimeError("worker did not start:\n" + "".join(self.log[-20:]))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout and not self.proc.stdout.closed:
            self.proc.stdout.close()


class LocalCluster:
    """N local workers, stopped together (a context manager)."""

    def __init__(self, n: int, cache: Path | None = None, *extra: str, token: str | None = None,
                 advertise: bool = False, cpus: list[tuple[int, ...]] | None = None, gpus: list[str] | None = None):
        self.workers: list[LocalWorker] = []
        try:
            for i in range(n):
                self.workers.append(LocalWorker(cache / f"w{i}" if cache else None, *extra, token=token,
                                                advertise=advertise, cpus=cpus[i] if cpus else (),
                                                gpu=gpus[i % len(gpus)] if gpus else None))
        except Exception:
            self.stop()
            raise

    @property
    def addresses(self) -> list[str]:
        return [w.address for w in self.workers]

    def stop(self) -> None:
        for w in self.workers:
            w.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
