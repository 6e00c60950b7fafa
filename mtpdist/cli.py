"""The `mtpdist` command line: one parser, each subcommand in its own module."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
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

    from .coordinator.config import add_cluster_arguments, add_model_arguments
    g = sub.add_parser("generate", help="generate text from a prompt (this machine, or through workers)")
    add_model_arguments(g)
    g.add_argument("--prompt", required=True)
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
    s.add_argument("--size", choices=["tiny", "small", "medium", "0.8b", "9b"], default="tiny",
                   help="0.8b / 9b have Qwen3.5-0.8B's / 9B's shapes (3.2 / 36 GB in fp32)")
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
    b.add_argument("--scenario", default="single",
                   choices=["single", "streams", "depths", "prefill", "interleave", "hop", "chat", "agent", "macs"],
                   help="single: plain vs MTP vs mlx-lm (default); streams: aggregate tok/s of concurrent "
                        "streams; depths: plain, MTP depth 1..K and auto; prefill: time to first token of a long "
                        "prompt, chunks pipelined vs one after another, and a short request during it; "
                        "interleave: a 4-token request during a long prefill; hop: overhead per stage; chat: a "
                        "long prompt continued as token ids from kept state vs afresh; agent: a tool-using chat "
                        "session through the HTTP API, once per --worker-counts; macs: one stream on N workers each "
                        "emulating 1/N of a Mac, plain, MTP, and MTP with verify rounds in flight")
    b.add_argument("--emulate-ms", default=None, metavar="A,B",
                   help="local workers emulate Mac-speed stages (A + B*(rows-1) ms per forward); figures say so")
    b.add_argument("--pin-cores", type=int, default=0, metavar="K",
                   help="pin this process and each local worker to K cores of their own (like separate Macs)")
    b.add_argument("--worker-gpus", default=None, metavar="I,J,...",
                   help="give local worker i the GPU in position i of this list (CUDA_VISIBLE_DEVICES), one each")
    b.add_argument("--streams", default="1,4", help="stream counts for --scenario streams (e.g. 1,4,8,16)")
    b.add_argument("--mtp-depth", default="1", help="MTP depth for --scenario streams (1-8, auto, or none)")
    b.add_argument("--max-depth", type=int, default=3, help="deepest depth for --scenario depths")
    b.add_argument("--prompt-tokens", type=int, default=1500, help="prompt length for --scenario prefill")
    b.add_argument("--prefill-step", type=int, default=256, help="prefill chunk (and per-unit prefill budget)")
    b.add_argument("--worker-counts", default="1,2", metavar="N,M,...",
                   help="--scenario agent: worker counts to compare; with --emulate-ms A,B (a whole Mac) each of "
                        "N workers emulates A/N,B/N")
    b.add_argument("--turns", type=int, default=6, help="--scenario agent: turns of the session")
    b.add_argument("--verify-curve", action="store_true",
                   help="only measure verify(T)/step for T = 1..--max-t (coordinator/bench_verify.py)")
    b.add_argument("--max-t", type=int, default=8, help="longest verify pass of --verify-curve (default 8)")
    b.add_argument("--small-t", type=int, action="append", default=[], metavar="N",
                   help="--verify-curve also with the compiled GDN path up to N tokens (repeatable)")
    return ap


def _in_process():
    """The in-process stage for runs without workers: this module is where the coordinator
    and the worker are composed (neither imports the other)."""
    from .worker.in_process import LocalTransport
    return LocalTransport


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mtpdist` command."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            from .coordinator.commands import run_generate
            from .coordinator.config import cluster_from, generate_from, model_from
            return run_generate(cluster_from(args), model_from(args), generate_from(args), _in_process())
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
            from .coordinator.config import cluster_from, model_from, server_from
            from .coordinator.main import run_coordinator
            return run_coordinator(cluster_from(args), model_from(args), server_from(args),
                                   make_transport=_in_process())
        if args.command == "demo":
            from .coordinator.demo import run_demo
            return run_demo(args)
        if args.command == "status":
            from .coordinator.commands import run_status
            from .coordinator.config import cluster_from
            return run_status(cluster_from(args), args.json)
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
        if args.command == "bench" and args.verify_curve:
            from .coordinator.bench_verify import run_verify_curve
            print(json.dumps(run_verify_curve(args), indent=2))
            return 0
        if args.command == "bench" and args.scenario != "single":
            from .coordinator.bench_streams import run_scenario
            result = run_scenario(args, _in_process())
            if args.out:
                Path(args.out).write_text(json.dumps(result, indent=2))
            print(json.dumps(result, indent=2))
            return 0
        if args.command == "bench":
            from .coordinator.bench_local import run_bench
            result = run_bench(args, _in_process())
            prompt_ids = result.pop("prompt_ids")
            if args.workers or args.worker:
                from .coordinator.bench_pipeline import add_pipeline_figures
                add_pipeline_figures(result, args, prompt_ids)
            if args.out:
                Path(args.out).write_text(json.dumps(result, indent=2))
            print(json.dumps(result, indent=2))
            return 0
    except MtpdistError as e:
        print(f"mtpdist: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
