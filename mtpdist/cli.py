"""The `mtpdist` command line: one parser, each subcommand in its own module."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .errors import MtpdistError


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    p.add_argument("--temp", type=float, default=0.0, help="temperature; 0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 keeps every token")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    """Flags that say which workers to use and how to reach them."""
    from .worker.main import add_security_arguments
    p.add_argument("--worker", action="append", default=[], metavar="HOST:PORT",
                   help="use this worker (repeatable, in pipeline order; mixes with discovery)")
    p.add_argument("--workers", type=int, default=0, help="wait for this many workers in all (found on mDNS)")
    p.add_argument("--cluster", default="default", help="only use workers advertising this cluster name")
    p.add_argument("--mdns-interface", action="append", default=[], metavar="IP",
                   help="browse mDNS on this interface address only (repeatable)")
    p.add_argument("--discover-timeout", type=float, default=15.0, help="seconds to wait for --workers")
    p.add_argument("--tls-ca", default=None, help="CA certificate to trust for workers serving TLS")
    p.add_argument("--rpc-timeout", type=float, default=30.0, help="deadline (s) of each call to a worker")
    p.add_argument("--step-timeout", type=float, default=5.0,
                   help="deadline (s) of one decode step through all workers: a hung worker is noticed this fast")
    add_security_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    ap = argparse.ArgumentParser(
        prog="mtpdist",
        description="Run one Qwen3.5/3.6 model across several Macs, with the model's own MTP head "
                    "doing speculative decoding across the pipeline.",
        epilog="Start with `mtpdist demo` (no download). On real Macs: `mtpdist worker` on each, "
               "`mtpdist coordinator --model PATH --mtp` on one. See README.md and deploy/README.md.")
    ap.add_argument("--version", action="version", version=f"mtpdist {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate text from a prompt (this machine, or through workers)")
    g.add_argument("--model", required=True, help="model folder (config.json, safetensors, tokenizer)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--mtp", action="store_true", help="speculative decoding with the model's MTP head")
    g.add_argument("--mtp-hidden", choices=["post-norm", "pre-norm"], default="post-norm",
                   help="which backbone hidden state feeds the MTP head (default post-norm)")
    g.add_argument("--prefill-step", type=int, default=512, help="prompt tokens per prefill chunk")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_cluster_arguments(g)
    _add_sampling(g)

    c = sub.add_parser("convert", help="convert a Hugging Face checkpoint to MLX, keeping the MTP head")
    c.add_argument("--hf-path", required=True)
    c.add_argument("--mlx-path", required=True)
    c.add_argument("-q", "--quantize", action="store_true")
    c.add_argument("--q-bits", type=int, default=4)
    c.add_argument("--q-group-size", type=int, default=64)
    c.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None)
    c.add_argument("--mtp-precision", choices=["bf16", "fp16", "quantized"], default="bf16",
                   help="precision of the MTP head (default bf16; fp16 is faster on M1/M2)")
    c.add_argument("--force", action="store_true", help="overwrite --mlx-path if it already holds files")

    w = sub.add_parser("worker", help="serve a slice of a model's layers over gRPC")
    from .worker.main import add_arguments as add_worker_arguments
    add_worker_arguments(w)

    co = sub.add_parser("coordinator", help="find workers, place the model, serve the OpenAI-compatible API")
    from .coordinator.main import add_arguments as add_coordinator_arguments
    add_coordinator_arguments(co)
    add_cluster_arguments(co)

    d = sub.add_parser("demo", help="two local workers + coordinator with the bundled model (no download)")
    from .coordinator.demo import add_arguments as add_demo_arguments
    add_demo_arguments(d)

    st = sub.add_parser("status", help="show the workers: addresses, link, layers held, memory")
    add_cluster_arguments(st)
    st.add_argument("--json", action="store_true")

    dr = sub.add_parser("doctor", help="check this machine: MLX backend, memory, interfaces, mDNS, port, versions")
    dr.add_argument("--mdns-interface", action="append", default=[], metavar="IP")
    dr.add_argument("--port", type=int, default=50551)
    dr.add_argument("--json", action="store_true")

    s = sub.add_parser("synth", help="write a random-weight Qwen3.5-style checkpoint (tests, benchmarks)")
    s.add_argument("--out", required=True)
    s.add_argument("--size", choices=["tiny", "small", "medium", "0.8b"], default="tiny",
                   help="0.8b has Qwen3.5-0.8B's shapes (3.2 GB in fp32)")
    s.add_argument("--moe", action="store_true")
    s.add_argument("--seed", type=int, default=0)

    b = sub.add_parser("bench", help="measure plain vs MTP decoding against mlx-lm; writes JSON")
    b.add_argument("--model", required=True)
    b.add_argument("--prompt", default="def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")
    b.add_argument("--max-tokens", type=int, default=64)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--cycles", type=int, default=30, help="steps timed for the per-pass cost figures")
    b.add_argument("--out", default=None, help="write the JSON here too")
    b.add_argument("--skip-mlx-lm", action="store_true")
    b.add_argument("--workers", type=int, default=0, help="also run through N local worker processes")
    b.add_argument("--worker", action="append", default=[], metavar="HOST:PORT",
                   help="also run through these (already running) workers")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mtpdist` command."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            from .commands import run_generate
            return run_generate(args)
        if args.command == "convert":
            from .model.convert import ConvertOptions, convert
            out = convert(args.hf_path, args.mlx_path, ConvertOptions(
                dtype=args.dtype, quantize=args.quantize, q_bits=args.q_bits,
                q_group_size=args.q_group_size, mtp_precision=args.mtp_precision, force=args.force))
            print(f"wrote {out}")
            return 0
        if args.command == "worker":
            from .worker.main import run_worker
            return run_worker(args)
        if args.command == "coordinator":
            from .coordinator.main import run_coordinator
            return run_coordinator(args)
        if args.command == "demo":
            from .coordinator.demo import run_demo
            return run_demo(args)
        if args.command == "status":
            from .commands import run_status
            return run_status(args)
        if args.command == "doctor":
            from .doctor import run_doctor
            checks = run_doctor(args.mdns_interface, args.port)
            if args.json:
                print(json.dumps([c.__dict__ for c in checks], indent=2))
            else:
                for c in checks:
                    print(f"{c.status:4}  {c.name:12}  {c.detail}")
            return 1 if any(c.status == "FAIL" for c in checks) else 0
        if args.command == "synth":
            from .model.synthetic import make_synthetic
            print(make_synthetic(args.out, args.size, moe=args.moe, seed=args.seed))
            return 0
        if args.command == "bench":
            from .bench import run_bench
            print(json.dumps(run_bench(args), indent=2))
            return 0
    except MtpdistError as e:
        print(f"mtpdist: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
