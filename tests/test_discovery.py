"""Discovery through real mDNS packets between processes, on 127.0.0.1 and across netns."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid

import pytest

from mtpdist.wire.types import PROTOCOL_VERSION
from mtpdist.coordinator.cluster import ClusterOptions, Membership
from mtpdist.coordinator.local_cluster import LocalCluster
from mtpdist.discovery import Browser, classify, parse_networksetup, parse_txt, preferred_ip
from mtpdist.wire.client import WorkerClient

FAKE_ADVERT = """
import sys, time
from mtpdist.discovery import Advert, Advertiser
a = Advertiser(Advert("fake{proto}", 40000 + {proto}, (("127.0.0.1", "loopback"),), {proto}, 1 << 30, "cpu", "x",
                      "{cluster}", "9.9"), ["127.0.0.1"])
print("up", flush=True)
sys.stdin.read()
a.close()
"""


def test_finds_workers_with_their_txt_and_ignores_others(tmp_path):
    cluster = f"t{uuid.uuid4().hex[:6]}"
    fake = subprocess.Popen([sys.executable, "-c", FAKE_ADVERT.format(proto=99, cluster=cluster)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert fake.stdout.readline().strip() == "up"
    try:
        with LocalCluster(3, tmp_path, "--cluster", cluster, "--usable-memory-gb", "2", advertise=True) as mine, \
                LocalCluster(1, tmp_path / "other", "--cluster", cluster + "x", advertise=True):
            browser = Browser(["127.0.0.1"], cluster)
            try:
                found = browser.wait_for(3, timeout=20)
                ids = {WorkerClient(a).describe().worker_id for a in mine.addresses}
                assert {a.worker_id for a in found} == ids
                for a in found:
                    assert a.cluster == cluster and a.protocol == PROTOCOL_VERSION and a.backend == "cpu"
                    assert a.usable_bytes == 2 << 30 and a.address in mine.addresses
                browser.wait_for(99, timeout=3)  # give the others time to be seen, and ignored
                assert len(browser.workers()) == 3
                reasons = " ".join(browser.ignored.values())
                assert "protocol 99" in reasons and f"cluster '{cluster}x'" in reasons
            finally:
                browser.close()
    finally:
        fake.communicate("", timeout=10)


def test_membership_mixes_static_and_discovered_and_reports_shortfall(tmp_path):
    cluster = f"t{uuid.uuid4().hex[:6]}"
    with LocalCluster(1, tmp_path / "s") as static, \
            LocalCluster(1, tmp_path / "d", "--cluster", cluster, advertise=True) as found:
        m = Membership(ClusterOptions(workers=2, static=tuple(static.addresses), cluster=cluster,
                                      mdns_interfaces=("127.0.0.1",), discover_timeout=20))
        try:
            assert m.wait() == static.addresses + found.addresses
        finally:
            m.close()
        short = Membership(ClusterOptions(workers=3, cluster=cluster, mdns_interfaces=("127.0.0.1",),
                                          discover_timeout=3))
        try:
            with pytest.raises(Exception, match=r"found 1 of 3 workers .* Discovered: [\w-]+ at 127.0.0.1"):
                short.wait()
        finally:
            short.close()


def test_generate_discovers_workers(tmp_path, tiny_dense):
    cluster = f"t{uuid.uuid4().hex[:6]}"
    base = [sys.executable, "-m", "mtpdist.cli", "generate", "--model", str(tiny_dense[0]), "--prompt", "x = 1",
            "--max-tokens", "8", "--json", "--mtp"]
    local = json.loads(subprocess.run(base, capture_output=True, text=True, check=True).stdout)
    with LocalCluster(2, tmp_path, "--cluster", cluster, token="s3cret-token", advertise=True):
        p = subprocess.run(base + ["--workers", "2", "--cluster", cluster, "--mdns-interface", "127.0.0.1",
                                   "--token", "s3cret-token"], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["token_ids"] == local["token_ids"]


def test_pure_helpers():
    assert preferred_ip([("192.168.1.5", "wifi"), ("10.0.0.5", "ethernet"), ("169.254.1.2", "thunderbolt")]) \
        == "169.254.1.2"
    assert preferred_ip([("192.168.1.5", "wifi"), ("10.0.0.5", "ethernet")]) == "10.0.0.5"
    assert classify("bridge0") == "thunderbolt" and classify("en0", hardware_port="Wi-Fi") == "wifi"
    assert classify("en5", hardware_port="Thunderbolt Ethernet Slot 1") == "thunderbolt"
    assert classify("eth0") == "ethernet" and classify("wlan0", wireless=True) == "wifi" and classify("lo") == "loopback"
    ports = parse_networksetup("Hardware Port: Wi-Fi\nDevice: en0\nEthernet Address: x\n\n"
                               "Hardware Port: Thunderbolt Bridge\nDevice: bridge0\n")
    assert ports == {"en0": "Wi-Fi", "bridge0": "Thunderbolt Bridge"}
    ad = parse_txt({b"id": b"abc", b"proto": b"1", b"mem": b"5", b"cluster": b"c", b"links": b"10.0.0.2=ethernet"},
                   7000, ["10.0.0.2", "127.0.0.1"])
    assert ad.address == "10.0.0.2:7000" and ad.usable_bytes == 5 and ("127.0.0.1", "loopback") in ad.links


NS = ("mtpdt-a", "mtpdt-b")


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair: separate hosts on one machine."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 not installed")
    cmds = [f"ip netns add {NS[0]}", f"ip netns add {NS[1]}", "ip link add mtpdt-va type veth peer name mtpdt-vb",
            f"ip link set mtpdt-va netns {NS[0]}", f"ip link set mtpdt-vb netns {NS[1]}",
            f"ip -n {NS[0]} addr add 10.231.9.1/24 dev mtpdt-va", f"ip -n {NS[1]} addr add 10.231.9.2/24 dev mtpdt-vb",
            f"ip -n {NS[0]} link set mtpdt-va up", f"ip -n {NS[1]} link set mtpdt-vb up",
            f"ip -n {NS[0]} link set lo up", f"ip -n {NS[1]} link set lo up"]
    for ns in NS:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    for c in cmds:
        if subprocess.run(c.split(), capture_output=True).returncode != 0:
            for ns in NS:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            pytest.skip("cannot create network namespaces here (needs root)")
    yield ("10.231.9.1", "10.231.9.2")
    for ns in NS:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_discovery_and_serving_across_network_namespaces(two_hosts, tmp_path, tiny_dense):
    a, b = two_hosts
    worker = subprocess.Popen(["ip", "netns", "exec", NS[0], sys.executable, "-m", "mtpdist.cli", "worker",
                               "--host", a, "--port", "0", "--mdns-interface", a, "--cluster", "ns",
                               "--token", "netns-token-1", "--cache-dir", str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        while "listening on" not in line:
            line = worker.stdout.readline()
            assert line or worker.poll() is None, "worker exited"
        p = subprocess.run(["ip", "netns", "exec", NS[1], sys.executable, "-m", "mtpdist.cli", "generate",
                            "--model", str(tiny_dense[0]), "--prompt", "import sys", "--max-tokens", "6", "--json",
                            "--workers", "1", "--cluster", "ns", "--mdns-interface", b, "--token", "netns-token-1"],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        local = subprocess.run([sys.executable, "-m", "mtpdist.cli", "generate", "--model", str(tiny_dense[0]),
                                "--prompt", "import sys", "--max-tokens", "6", "--json"],
                               capture_output=True, text=True, check=True)
        assert json.loads(p.stdout)["token_ids"] == json.loads(local.stdout)["token_ids"]
    finally:
        worker.terminate()
        worker.wait(10)


def test_status_and_a_worker_joining_between_requests(tmp_path, tiny_dense):
    import time

    import httpx
    import openai

    from servers import Coordinator
    cluster = f"t{uuid.uuid4().hex[:6]}"
    first = LocalCluster(1, tmp_path / "a", "--cluster", cluster, advertise=True)
    second = None
    c = Coordinator("--model", str(tiny_dense[0]), "--insecure", "--workers", "1", "--cluster", cluster,
                    "--mdns-interface", "127.0.0.1")
    try:
        client = openai.OpenAI(base_url=c.url, api_key="x", max_retries=0)
        want = client.completions.create(model="m", prompt="import os", max_tokens=10, temperature=0).choices[0].text
        second = LocalCluster(1, tmp_path / "b", "--cluster", cluster, advertise=True)
        deadline = time.time() + 20
        while time.time() < deadline:
            got = client.completions.create(model="m", prompt="import os", max_tokens=10, temperature=0)
            assert got.choices[0].text == want
            if len(httpx.get(c.url + "/cluster").json()["workers"]) == 2:
                break
            time.sleep(0.5)
        workers = httpx.get(c.url + "/cluster").json()["workers"]
        # Two contiguous ranges over all 8 layers; where they meet follows each worker's measured
        # speed, which on a loaded box need not come out equal.
        (a, k), (k2, b) = [w["layers"] for w in workers]
        assert len(workers) == 2 and a == 0 and b == 8 and k == k2 and 0 < k < 8
        st = subprocess.run([sys.executable, "-m", "mtpdist.cli", "status", "--workers", "2", "--cluster", cluster,
                             "--mdns-interface", "127.0.0.1", "--insecure", "--json"],
                            capture_output=True, text=True, timeout=120)
        rows = json.loads(st.stdout)["workers"]
        assert st.returncode == 0 and sorted(r["layers"] for r in rows) == sorted([f"0-{k - 1}", f"{k}-7"])
        assert all(r["link"] == "loopback" and r["backend"] == "cpu" for r in rows)
    finally:
        c.stop()
        first.stop()
        if second:
            second.stop()


def test_status_without_flags_lists_every_running_worker(tmp_path):
    cluster = f"t{uuid.uuid4().hex[:6]}"
    with LocalCluster(2, tmp_path, "--cluster", cluster, advertise=True) as ws:
        for _ in range(2):   # each a fresh browser; it used to list whichever worker resolved first
            st = subprocess.run([sys.executable, "-m", "mtpdist.cli", "status", "--cluster", cluster,
                                 "--mdns-interface", "127.0.0.1", "--insecure"], capture_output=True, text=True,
                                timeout=120)
            assert st.returncode == 0, st.stdout + st.stderr
            assert all(a in st.stdout for a in ws.addresses) and "discovery settled" in st.stdout
