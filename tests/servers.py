"""A real `mtpdist coordinator` process for tests, and free ports."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The model names the tests' clients send (an unknown name is a 404 model_not_found).
TEST_MODEL_NAMES = ("m", "tiny")


class Coordinator:
    def __init__(self, *args: str, names: tuple[str, ...] = TEST_MODEL_NAMES):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if names and "--served-model-name" not in args:
            args = (*args, "--served-model-name", *names)
        self.proc = subprocess.Popen([sys.executable, "-m", "mtpdist.cli", "coordinator", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.url = None
        self.lines: list[str] = []
        deadline = time.time() + 120
        while time.time() < deadline and self.url is None:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError("coordinator exited:\n" + "".join(self.lines[-30:]))
            self.lines.append(line)
            m = re.search(r"serving (http://\S+/v1)", line)
            self.url = m.group(1) if m else None
        # Keep draining the log so the process never blocks on a full pipe.
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
