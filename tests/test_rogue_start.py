"""Issue 17, item 1: rogue mDNS adverts (a plaintext server, a certificate from another CA, a
tarpit, a closed port; advertised before and after the real workers) never count toward
`--workers`, never take a real worker's place at start, after a lost worker, or in `status`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from mtpdist.coordinator.cluster import ClusterOptions, Membership
from mtpdist.coordinator.local_cluster import LocalCluster
from mtpdist.coordinator.vetting import vet
from mtpdist.errors import MtpdistError
from mtpdist.security import node_identity
from mtpdist.wire.client import ChannelSettings

SECRET = "cluster-secret-for-tests"
ROGUE = Path(__file__).with_name("rogue.py")
KINDS = ("tls", "plaintext", "tarpit", "closed")
REASONS = {"tls": "did not prove it holds the cluster secret", "plaintext": "does not speak TLS",
           "tarpit": "no answer within", "closed": "connection refused"}


def _rogues(cluster: str, alone: bool):
    """One process advertising one rogue of each kind; returns it and {address: kind}."""
    p = subprocess.Popen([sys.executable, str(ROGUE), cluster, "a-guess-at-the-secret", ",".join(KINDS),
                          *(["--alone"] if alone else [])], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    found = {}
    for kind in KINDS:
        _, port, _ = p.stdout.readline().split()
        found[f"127.0.0.1:{port}"] = kind
    return p, found


@pytest.fixture(scope="module")
def rogue_cluster(tmp_path_factory):
    """Four rogues advertised first, then two real workers, then four rogues cloning a real advert."""
    cluster = f"t{uuid.uuid4().hex[:6]}"
    procs, real = [], None
    try:
        before, rogues = _rogues(cluster, alone=True)
        procs.append(before)
        real = LocalCluster(2, tmp_path_factory.mktemp("rogues"), "--cluster", cluster, token=SECRET, advertise=True)
        after, more = _rogues(cluster, alone=False)
        procs.append(after)
        yield cluster, real, {**rogues, **more}
    finally:
        for p in procs:
            p.communicate("", timeout=10)
        if real:
            real.stop()


def _membership(cluster: str, workers: int, timeout: float = 20) -> Membership:
    return Membership(ClusterOptions(workers=workers, cluster=cluster, mdns_interfaces=("127.0.0.1",),
                                     discover_timeout=timeout))


def test_repeated_starts_count_only_workers_that_prove_themselves(rogue_cluster):
    cluster, real, rogues = rogue_cluster
    channel = ChannelSettings(identity=node_identity(SECRET))
    for workers in (1, 2):
        for _ in range(10):   # ten fresh starts each: a new mDNS browser every time
            m = _membership(cluster, workers)
            try:
                got = m.wait(lambda a: vet(a, channel))
            finally:
                m.close()
            assert set(got) <= set(real.addresses) and len(got) >= workers, (got, m.refused)
    m = _membership(cluster, 3, timeout=4)   # more than there are: the error names every refused rogue
    try:
        with pytest.raises(MtpdistError, match="found 2 of 3 workers") as e:
            m.wait(lambda a: vet(a, channel))
    finally:
        m.close()
    for address, kind in rogues.items():
        assert address in str(e.value) and REASONS[kind] in m.refused[address], (kind, m.refused.get(address))
    assert "Refused (never counted)" in str(e.value) and "cluster secret" in str(e.value)


def test_coordinator_serves_through_real_workers_replans_without_rogues_and_status(rogue_cluster, tiny_dense):
    import httpx
    import openai

    from servers import Coordinator
    cluster, real, rogues = rogue_cluster
    model = tiny_dense[0]
    local = json.loads(subprocess.run([sys.executable, "-m", "mtpdist.cli", "generate", "--model", str(model),
                                       "--prompt", "import os", "--max-tokens", "8", "--json"],
                                      capture_output=True, text=True, check=True).stdout)
    c = Coordinator("--model", str(model), "--token", SECRET, "--workers", "2", "--discover-timeout", "30",
                    "--cluster", cluster, "--mdns-interface", "127.0.0.1")
    try:
        client = openai.OpenAI(base_url=c.url, api_key="x", max_retries=0)
        got = client.completions.create(model="m", prompt="import os", max_tokens=8, temperature=0)
        assert got.choices[0].text == local["text"]
        assert sorted(r["address"] for r in httpx.get(c.url + "/cluster").json()["workers"]) == sorted(real.addresses)
        st = subprocess.run([sys.executable, "-m", "mtpdist.cli", "status", "--cluster", cluster, "--mdns-interface",
                             "127.0.0.1", "--token", SECRET, "--json"], capture_output=True, text=True, timeout=120)
        out = json.loads(st.stdout)
        rows = {r["address"]: r for r in out["workers"]}
        assert all("error" not in rows[a] and rows[a]["layers"] != "none" for a in real.addresses)   # both seen
        assert all(REASONS[k] in rows[a]["error"] for a, k in rogues.items() if a in rows) and "settled" in out["note"]
        real.workers[1].stop()          # a lost worker: the re-plan uses the real one left, never a rogue
        got = client.completions.create(model="m", prompt="import os", max_tokens=8, temperature=0)
        assert got.choices[0].text == local["text"]
        assert [r["address"] for r in httpx.get(c.url + "/cluster").json()["workers"]] == [real.addresses[0]]
        time.sleep(0.5)
        for address in rogues:   # logged once each, by name, with what happened; never placed
            assert len([ln for ln in c.lines if "refusing" in ln and address in ln]) <= 1, c.log
    finally:
        c.stop()
