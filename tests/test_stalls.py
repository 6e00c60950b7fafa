"""Issue 17, item 3 (part): a stopped worker is reported as not answering (not as lacking the
secret), and kept prefixes of a crashed coordinator expire like its sequences do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from mtpdist.coordinator.local_cluster import LocalWorker
from mtpdist.coordinator.vetting import vet
from mtpdist.security import node_identity
from mtpdist.wire.client import ChannelSettings, WorkerClient

SECRET = "cluster-secret-for-tests"


def test_a_stopped_worker_is_reported_as_not_answering(tmp_path):
    w = LocalWorker(tmp_path, token=SECRET)
    channel = ChannelSettings(identity=node_identity(SECRET))
    try:
        assert vet(w.address, channel).proven
        os.kill(w.proc.pid, signal.SIGSTOP)
        v = vet(w.address, channel, timeout=2)
        assert not v.proven and not v.secret and "no answer within" in v.reason and "secret" not in v.reason
        st = subprocess.run([sys.executable, "-m", "mtpdist.cli", "status", "--worker", w.address, "--token", SECRET,
                             "--json"], capture_output=True, text=True, timeout=120)
        row = json.loads(st.stdout)["workers"][0]
        assert st.returncode == 1 and "no answer within" in row["error"] and "secret" not in row["error"]
    finally:
        os.kill(w.proc.pid, signal.SIGCONT)
        w.stop()


def test_kept_prefixes_of_a_crashed_coordinator_expire(tmp_path, tiny_dense):
    import openai

    from servers import Coordinator
    w = LocalWorker(tmp_path / "w", "--prefix-ttl", "2")
    c = Coordinator("--model", str(tiny_dense[0]), "--insecure", "--worker", w.address)
    try:
        client = openai.OpenAI(base_url=c.url, api_key="x", max_retries=0)
        client.completions.create(model="m", prompt="import os\n" * 12, max_tokens=4, temperature=0)
        info = WorkerClient(w.address).describe()
        assert info.prefixes >= 1 and info.sequences == 0      # kept for a later turn
        os.kill(c.proc.pid, signal.SIGKILL)                    # nobody will ever fork them again
        deadline = time.time() + 15
        while time.time() < deadline and WorkerClient(w.address).describe().prefixes:
            time.sleep(0.25)
        info = WorkerClient(w.address).describe()
        assert info.prefixes == 0 and info.state_bytes == 0
    finally:
        c.stop()
        w.stop()
