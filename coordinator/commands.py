"""Subcommand bodies that need more than a line or two."""

from __future__ import annotations

import json
import sys

from mtpdist.engine.driver import generate
from mtpdist.engine.generate import GenerationRequest
from mtpdist.engine.sampling import SamplingParams
from mtpdist.engine.scheduler import Scheduler, SchedulerSettings
from mtpdist.errors import MtpdistError


def sampling_from(args) -> SamplingParams:
    """SamplingParams from CLI flags, with a clear error for bad values."""
    try:
        return SamplingParams(temperature=args.temp, top_p=args.top_p, top_k=args.top_k,
                              min_p=args.min_p, seed=args.seed)
    except ValueError as e:
        raise MtpdistError(str(e)) from e


def channel_from(args):
    """How to reach workers (this node's mutual-TLS identity, deadlines) from CLI flags."""
    from mtpdist.security import check_insecure_hosts, resolve_identity
    from mtpdist.wire.client import ChannelSettings
    identity = resolve_identity(args.token, args.token_file, args.insecure, role="coordinator")
    plaintext_network = getattr(args, "allow_insecure_network", False)
    if identity is None:  # fail at once for the static workers; discovered ones are refused when dialed
        check_insecure_hosts(args.worker, plaintext_network, "would reach workers at")
    return ChannelSettings(identity=identity, plaintext_network=plaintext_network, timeout=args.rpc_timeout,
                           step_timeout=getattr(args, "step_timeout", 5.0))


def membership_from(args):
    """Static and discovered workers from CLI flags."""
    from .cluster import ClusterOptions, Membership
    return Membership(ClusterOptions(workers=args.workers, static=tuple(args.worker),
                                     cluster=args.cluster, mdns_interfaces=tuple(args.mdns_interface),
                                     discover_timeout=args.discover_timeout))


def run_status(args) -> int:
    """`mtpdist status`: every worker found, what it holds and how it is reached.

    Without --workers/--worker it lists whoever answers once discovery has settled (no new
    advert for a couple of seconds, within --discover-timeout), and says so. Peers that do not
    prove they belong to the cluster are listed with why, and never count toward --workers.
    """
    from .vetting import vet
    channel = channel_from(args)
    m = membership_from(args)
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
    short = len([r for r in rows if "error" not in r]) < max(args.workers, 1)
    settled = (f"listed once discovery settled (no new worker for {m.opts.settle:g}s); a worker that was not yet "
               "advertising may be missing: pass --workers N to wait for N") if not args.workers and m.browser else ""
    if args.json:
        print(json.dumps({"workers": rows, **({"note": settled} if settled else {})}, indent=2))
    elif not rows:
        print(f"no workers found within {args.discover_timeout:g}s ({where}). Check that `mtpdist worker` "
              "runs on each Mac, the --cluster name and --mdns-interface.")
    else:
        for r in rows:
            print("  ".join(f"{k}={v}" for k, v in r.items()))
        if settled:
            print(f"({settled})")
    return 0 if rows and not short and not any("error" in r for r in rows) else 1


def run_generate(args, make_transport) -> int:
    """`mtpdist generate`: one completion, printed as text or as one JSON object."""
    if args.max_tokens < 1:
        raise MtpdistError("--max-tokens must be at least 1")
    post_norm = args.mtp_hidden == "post-norm"
    if args.worker or args.workers:
        from .session import PipelineSession
        from .vetting import vet
        channel = channel_from(args)
        membership = membership_from(args)
        try:
            addresses = membership.wait(lambda a: vet(a, channel))
        finally:
            membership.close()
        session = PipelineSession(args.model, addresses, mtp=args.mtp, post_norm=post_norm,
                                  prefill_step=args.prefill_step, channel=channel)
    else:
        from .local_session import LocalSession
        session = LocalSession(args.model, make_transport, mtp=args.mtp, post_norm=post_norm,
                               prefill_step=args.prefill_step)
    gen = session.generator
    req = GenerationRequest(prompt_ids=gen.encode(args.prompt), max_tokens=args.max_tokens,
                            sampling=sampling_from(args), stop=tuple(args.stop), mtp=args.mtp,
                            mtp_depth=getattr(args, "mtp_depth", 1))
    def show(delta) -> None:
        if not args.json and delta.text:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
    try:
        result = generate(Scheduler(gen, session, SchedulerSettings(reuse_prefixes=False)), req, on_delta=show)
    finally:
        close = getattr(session, "close", None)
        if close:
            close()
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        sys.stdout.write("\n")
    return 0
