"""Issue 17, item 4: two workers on one machine need no memory flag, and never over-commit it."""

from __future__ import annotations

import json
import subprocess
import sys

from mtpdist.coordinator.local_cluster import LocalWorker
from mtpdist.placement import share_host_budgets
from mtpdist.wire.client import WorkerClient
from mtpdist.worker.service import total_memory

GiB = 1 << 30


def test_workers_of_one_host_share_its_budget():
    ram = 24 * GiB
    default = int(ram * 0.75)
    # Two workers started without a flag: 75% of RAM between them, not 75% each.
    assert share_host_budgets([default, default], ["h", "h"], [ram, ram]) == [default // 2, default // 2]
    # The old advice followed on the second worker alone (18 + 8 GiB offered on 24 GiB): still 18 in all.
    shared = share_host_budgets([default, 8 * GiB], ["h", "h"], [ram, ram])
    assert sum(shared) <= default and shared[0] > shared[1]
    # Explicit offers that fit are kept; one explicit large offer on its own is honoured.
    assert share_host_budgets([6 * GiB, 8 * GiB], ["h", "h"], [ram, ram]) == [6 * GiB, 8 * GiB]
    assert share_host_budgets([22 * GiB], ["h"], [ram]) == [22 * GiB]
    # Other machines, and workers that do not say which machine they are on, are untouched.
    assert share_host_budgets([default, default], ["h", "k"], [ram, ram]) == [default, default]
    assert share_host_budgets([default, default], ["", ""], [ram, ram]) == [default, default]
    # The plan's share travels with the shard, so the worker's state budget stays within it too.
    from mtpdist.wire.convert import spec_from_pb, spec_to_pb
    from mtpdist.wire.types import ShardSpec
    assert spec_from_pb(spec_to_pb(ShardSpec("m", 0, 1, "{}", budget_bytes=5 * GiB))).budget_bytes == 5 * GiB


def test_two_workers_on_one_host_without_a_memory_flag_are_placed_and_serve(tmp_path, tiny_dense):
    shared = tmp_path / "host"   # one machine: one config folder, as two workers of one user have
    a = LocalWorker(shared)      # neither has --usable-memory-gb (the second used to be refused)
    b = LocalWorker(shared)
    try:
        ia, ib = WorkerClient(a.address).describe(), WorkerClient(b.address).describe()
        assert ia.host_id == ib.host_id and ia.usable_bytes == ib.usable_bytes == int(total_memory() * 0.75)
        base = [sys.executable, "-m", "mtpdist.cli", "generate", "--model", str(tiny_dense[0]), "--prompt",
                "import os", "--max-tokens", "8", "--json"]
        local = json.loads(subprocess.run(base, capture_output=True, text=True, check=True).stdout)
        p = subprocess.run(base + ["--worker", a.address, "--worker", b.address, "--insecure"],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["token_ids"] == local["token_ids"]
        ia, ib = WorkerClient(a.address).describe(), WorkerClient(b.address).describe()
        assert ia.layer_end == ib.layer_start > 0   # both placed, one after the other
    finally:
        a.stop()
        b.stop()
