"""`mtpdist demo`: two local workers and a coordinator on 127.0.0.1, with the bundled model."""

from __future__ import annotations

import importlib.resources
import secrets
import socket
import tempfile
from pathlib import Path

from mtpdist.errors import MtpdistError

from .config import ClusterConfig, GenerateOptions, ModelOptions, ServerOptions
from .local_cluster import LocalCluster

DEMO_MODEL = Path(str(importlib.resources.files("mtpdist") / "demo_model"))
DEFAULT_PROMPT = "def fibonacci(n):\n    "


def add_arguments(p) -> None:
    """Flags of `mtpdist demo`."""
    p.add_argument("--model", default=None, help="use this model instead of the bundled demo model")
    p.add_argument("--workers", type=int, default=2, help="local workers to start (default 2)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--once", action="store_true", help="run one greedy MTP completion through the cluster and exit")
    p.add_argument("--json", action="store_true", help="with --once: print the `mtpdist generate --json` object")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--no-mtp", action="store_true", help="plain decoding")


def model_path(arg: str | None) -> Path:
    """The model the demo serves: --model, or the bundled one."""
    path = Path(arg) if arg else DEMO_MODEL
    if not (path / "config.json").is_file():
        raise MtpdistError(f"{path}: not a model folder" + ("" if arg else " (the bundled demo model is missing)"))
    return path


def check_port(host: str, port: int) -> None:
    """Fail at once, before any worker starts, when the HTTP port is taken."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as e:
            raise MtpdistError(f"cannot serve on {host}:{port}: {e.strerror} (another program uses it); "
                               f"pick another port with --port, e.g. `mtpdist demo --port {port + 1}`") from None


def run_demo(args) -> int:
    """Start local workers (found over mDNS on loopback), then serve, or run one completion with --once."""
    model = model_path(args.model)
    if not args.once:
        check_port("127.0.0.1", args.port)
    token = secrets.token_urlsafe(16)
    cluster = f"demo-{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory(prefix="mtpdist-demo-") as tmp, \
            LocalCluster(args.workers, Path(tmp), "--cluster", cluster, token=token, advertise=True) as workers:
        if not args.json:
            print(f"started {args.workers} workers: {', '.join(workers.addresses)} (cluster {cluster})", flush=True)
        found = ClusterConfig(workers=args.workers, cluster=cluster, mdns_interfaces=("127.0.0.1",),
                              discover_timeout=30.0, token=token)
        options = ModelOptions(str(model), mtp=not args.no_mtp)
        if args.once:
            from .commands import run_generate
            return run_generate(found, options, GenerateOptions(args.prompt, args.max_tokens, json=args.json))
        from .main import run_coordinator
        return run_coordinator(found, options, ServerOptions(port=args.port, default_max_tokens=256),
                               on_ready=print_usage)


def print_usage(url: str, model: str) -> None:
    """Show how to call the demo with curl and with the openai package."""
    print(f"""
Try it (Ctrl-C stops everything):

  curl {url}/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "def add(a, b):"}}], "max_tokens": 48}}'

  python -c "from openai import OpenAI; c = OpenAI(base_url='{url}', api_key='none'); \\
print(c.completions.create(model='{model}', prompt='import os\\n', max_tokens=48, temperature=0).choices[0].text)"
""", flush=True)
