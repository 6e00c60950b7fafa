"""The coordinator's settings as frozen dataclasses, built once from the command line (or by
`mtpdist demo` directly): nothing past this module reads an argparse namespace."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from mtpdist.engine.sampling import SamplingParams
from mtpdist.errors import MtpdistError
from mtpdist.security import add_security_arguments


@dataclass(frozen=True)
class ClusterConfig:
    """Which workers to use and how to reach them."""
    workers: int = 0                       # wait for this many on mDNS (0: whoever is given or found)
    static: tuple[str, ...] = ()           # --worker addresses, in pipeline order
    cluster: str = "default"
    mdns_interfaces: tuple[str, ...] = ()
    discover_timeout: float = 15.0
    token: str | None = None
    token_file: str | None = None
    insecure: bool = False
    allow_insecure_network: bool = False
    rpc_timeout: float = 30.0
    step_timeout: float = 5.0              # a worker silent this long to a liveness probe is lost

    def channel(self):
        """How to reach workers: this node's mutual-TLS identity and deadlines."""
        from mtpdist.security import check_insecure_hosts, resolve_identity
        from mtpdist.wire.client import ChannelSettings
        identity = resolve_identity(self.token, self.token_file, self.insecure, role="coordinator")
        if identity is None:  # fail at once for the static workers; discovered ones are refused when dialed
            check_insecure_hosts(list(self.static), self.allow_insecure_network, "would reach workers at")
        return ChannelSettings(identity=identity, plaintext_network=self.allow_insecure_network,
                               timeout=self.rpc_timeout, step_timeout=self.step_timeout)

    def membership(self):
        """Static and discovered workers."""
        from .cluster import ClusterOptions, Membership
        return Membership(ClusterOptions(workers=self.workers, static=self.static, cluster=self.cluster,
                                         mdns_interfaces=self.mdns_interfaces,
                                         discover_timeout=self.discover_timeout))


@dataclass(frozen=True)
class ModelOptions:
    """The model and how to decode with it."""
    model: str
    mtp: bool = False
    mtp_hidden: str = "post-norm"
    mtp_depth: int | str = 1
    prefill_step: int = 512
    rounds_in_flight: int = 0       # verify rounds of one sequence in flight; 0: one per stage when alone

    @property
    def post_norm(self) -> bool:
        return self.mtp_hidden == "post-norm"


@dataclass(frozen=True)
class ServerOptions:
    """The HTTP server's settings."""
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    local: bool = False
    max_context: int | None = None
    default_max_tokens: int = 512
    max_inflight: int = 0
    max_queue: int = 64
    prefix_reuse: bool = True
    served_model_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerateOptions:
    """One `mtpdist generate` run."""
    prompt: str
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    json: bool = False


def _rounds_flag(text: str) -> int:
    """The value of `--rounds-in-flight`: 1-16 or 'auto' (0)."""
    if text == "auto":
        return 0
    if not text.isdigit() or not 1 <= int(text) <= 16:
        raise argparse.ArgumentTypeError(f"must be 1-16 or 'auto', not {text!r}")
    return int(text)


def _depth_flag(text: str):
    from mtpdist.engine.depth import parse_depth
    try:
        return parse_depth(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_model_arguments(p: argparse.ArgumentParser, prefill_default: int = 512) -> None:
    """Flags of the model and its decoding (generate and coordinator)."""
    p.add_argument("--model", required=True, help="model folder (config.json, safetensors, tokenizer)")
    p.add_argument("--mtp", action="store_true", help="speculative decoding with the model's MTP head")
    p.add_argument("--mtp-hidden", choices=["post-norm", "pre-norm"], default="post-norm",
                   help="which backbone hidden state feeds the MTP head (default post-norm)")
    p.add_argument("--mtp-depth", type=_depth_flag, default=1, metavar="K|auto",
                   help="drafts per round with --mtp: 1-8, or 'auto' to choose from measured acceptance and "
                        "verify cost (default 1)")
    p.add_argument("--prefill-step", type=int, default=prefill_default, help="prompt tokens per prefill chunk")
    p.add_argument("--rounds-in-flight", type=_rounds_flag, default=0, metavar="N|auto",
                   help="with --mtp: verify rounds of one sequence in flight through the pipeline at once, each "
                        "after the first assuming those before it hold (default auto: as many as there are "
                        "stages per active sequence; 1 turns speculative rounds off)")


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    """Flags that say which workers to use and how to reach them."""
    p.add_argument("--worker", action="append", default=[], metavar="HOST:PORT",
                   help="use this worker (repeatable, in pipeline order; mixes with discovery)")
    p.add_argument("--workers", type=int, default=0, help="wait for this many workers in all (found on mDNS)")
    p.add_argument("--cluster", default="default", help="only use workers advertising this cluster name")
    p.add_argument("--mdns-interface", action="append", default=[], metavar="IP",
                   help="browse mDNS on this interface address only (repeatable)")
    p.add_argument("--discover-timeout", type=float, default=15.0, help="seconds to wait for --workers")
    p.add_argument("--rpc-timeout", type=float, default=30.0, help="deadline (s) of each control call to a worker")
    p.add_argument("--step-timeout", type=float, default=5.0,
                   help="a worker that leaves a liveness probe unanswered this long (s) is lost; a busy one is not")
    add_security_arguments(p)


def cluster_from(args) -> ClusterConfig:
    """ClusterConfig from parsed flags."""
    return ClusterConfig(args.workers, tuple(args.worker), args.cluster, tuple(args.mdns_interface),
                         args.discover_timeout, args.token, args.token_file, args.insecure,
                         args.allow_insecure_network, args.rpc_timeout, args.step_timeout)


def model_from(args) -> ModelOptions:
    """ModelOptions from parsed flags."""
    return ModelOptions(args.model, args.mtp, args.mtp_hidden, args.mtp_depth, args.prefill_step,
                        args.rounds_in_flight)


def server_from(args) -> ServerOptions:
    """ServerOptions from parsed flags of `mtpdist coordinator`."""
    return ServerOptions(args.host, args.port, args.api_key, args.local, args.max_context, args.default_max_tokens,
                         args.max_inflight, max(1, args.max_queue), not args.no_prefix_reuse,
                         tuple(args.served_model_name or ()))


def generate_from(args) -> GenerateOptions:
    """GenerateOptions from parsed flags of `mtpdist generate`, with a clear error for bad values."""
    if args.max_tokens < 1:
        raise MtpdistError("--max-tokens must be at least 1")
    try:
        sampling = SamplingParams(temperature=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                                  seed=args.seed)
    except ValueError as e:
        raise MtpdistError(str(e)) from e
    return GenerateOptions(args.prompt, args.max_tokens, sampling, tuple(args.stop), args.json)
