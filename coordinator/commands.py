"""`mtpdist status` and `mtpdist generate`."""

from __future__ import annotations

import json
import sys

from mtpdist.engine.driver import generate
from mtpdist.engine.generate import GenerationRequest
from mtpdist.engine.scheduler import Scheduler, SchedulerSettings
from mtpdist.errors import MtpdistError

from .config import ClusterConfig, GenerateOptions, ModelOptions


def run_status(cluster: ClusterConfig, as_json: bool = False) -> int:
    """`mtpdist status`: every worker found, what it holds and how it is reached.

    Without --workers/--worker it lists whoever answers once discovery has settled (no new
    advert for a couple of seconds, within --discover-timeout), and says so. Peers that do not
    prove they belong to the cluster are listed with why, and never count toward --workers.
    """
    from .vetting import vet
    channel = cluster.channel()
    m = cluster.membership()
    try:
        try:
            m.wait(lambda a: vet(a, channel))
        except MtpdistError:
            pass  # fewer than asked for: list who was seen (rc 1 below)
        ads = {a.address: a for a in m.discovered()}
        where = m.where()
        rows = []
        for addr in m.current():
            row = {"address": addr, "link": next((k for ip, k in ads[addr].links if addr.startswith(ip + ":")), "")
                   if addr in ads else "static"}
            i = m.proven.get(addr)
            if i is not None:
                row.update(worker_id=i.worker_id, backend=i.backend, chip=i.chip, version=i.version,
                           usable_gib=round(i.usable_bytes / 2**30, 2), weights_gib=round(i.weight_bytes / 2**30, 3),
                           layers=f"{i.layer_start}-{i.layer_end - 1}" if i.layer_end else "none",
                           sequences=i.sequences, state_mib=round(i.state_bytes / 2**20, 1))
            else:
                row["error"] = m.refused.get(addr) or "no answer yet"
            rows.append(row)
    finally:
        m.close()
    short = len([r for r in rows if "error" not in r]) < max(cluster.workers, 1)
    settled = (f"listed once discovery settled (no new worker for {m.opts.settle:g}s); a worker that was not yet "
               "advertising may be missing: pass --workers N to wait for N") if not cluster.workers and m.browser else ""
    if as_json:
        print(json.dumps({"workers": rows, **({"note": settled} if settled else {})}, indent=2))
    elif not rows:
        print(f"no workers found within {cluster.discover_timeout:g}s ({where}). Check that `mtpdist worker` "
              "runs on each Mac, the --cluster name and --mdns-interface.")
    else:
        for r in rows:
            print("  ".join(f"{k}={v}" for k, v in r.items()))
        if settled:
            print(f"({settled})")
    return 0 if rows and not short and not any("error" in r for r in rows) else 1


def run_generate(cluster: ClusterConfig, model: ModelOptions, opts: GenerateOptions, make_transport=None) -> int:
    """`mtpdist generate`: one completion, printed as text or as one JSON object."""
    if cluster.static or cluster.workers:
        from .session import PipelineSession
        from .vetting import vet
        channel = cluster.channel()
        membership = cluster.membership()
        try:
            addresses = membership.wait(lambda a: vet(a, channel))
        finally:
            membership.close()
        session = PipelineSession(model.model, addresses, mtp=model.mtp, post_norm=model.post_norm,
                                  prefill_step=model.prefill_step, channel=channel)
    else:
        from .local_session import LocalSession
        session = LocalSession(model.model, make_transport, mtp=model.mtp, post_norm=model.post_norm,
                               prefill_step=model.prefill_step)
    gen = session.generator
    req = GenerationRequest(prompt_ids=gen.encode(opts.prompt), max_tokens=opts.max_tokens, sampling=opts.sampling,
                            stop=opts.stop, mtp=model.mtp, mtp_depth=model.mtp_depth)

    def show(delta) -> None:
        if not opts.json and delta.text:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
    try:
        settings = SchedulerSettings(reuse_prefixes=False, rounds_in_flight=model.rounds_in_flight)
        result = generate(Scheduler(gen, session, settings), req, on_delta=show)
    finally:
        session.close()
    if opts.json:
        print(json.dumps(result.as_dict()))
    else:
        sys.stdout.write("\n")
    return 0
