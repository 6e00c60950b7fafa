"""`mtpdist coordinator`: find the workers, place the model, serve the OpenAI API."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from mtpdist.errors import MtpdistError

from mtpdist.engine.scheduler import SchedulerSettings

from .config import ClusterConfig, ModelOptions, ServerOptions, add_model_arguments


log = logging.getLogger("mtpdist.coordinator")


def add_arguments(p) -> None:
    """Flags of `mtpdist coordinator` (cluster flags come from config.add_cluster_arguments)."""
    add_model_arguments(p)
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="the model id(s) the API answers to (default: the model folder's name, always accepted)")
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help="do not keep state at message boundaries and finished turns for later requests")
    p.add_argument("--max-inflight", type=int, default=0,
                   help="units of work in flight through the pipeline (default: one per worker)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (0 picks a free one)")
    p.add_argument("--api-key", default=None, help="require this bearer key on /v1/* (or MTPDIST_API_KEY)")
    p.add_argument("--local", action="store_true", help="run every layer in this process (no workers)")
    p.add_argument("--max-context", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--default-max-tokens", type=int, default=512)
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting or running before new ones get 429 with Retry-After (default 64)")


def run_coordinator(cluster: ClusterConfig, model: ModelOptions, server: ServerOptions, on_ready=None,
                    make_transport=None) -> int:
    """Find workers, place the model, and serve the API until interrupted."""
    import os

    import uvicorn

    from .engine_thread import EngineThread
    from .metrics import Metrics
    from .server import ServerState, create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    membership = None
    if server.local:
        from .local_session import LocalSession
        session = LocalSession(model.model, make_transport, mtp=model.mtp, post_norm=model.post_norm,
                               prefill_step=model.prefill_step)
        cluster_info = lambda: {"mode": "local", "workers": []}  # noqa: E731
    else:
        from .session import PipelineSession
        from .vetting import vet
        channel = cluster.channel()
        membership = cluster.membership()
        addresses = membership.wait(lambda a: vet(a, channel))
        session = PipelineSession(model.model, addresses, mtp=model.mtp, post_norm=model.post_norm,
                                  prefill_step=model.prefill_step, channel=channel,
                                  candidates=membership.current, label=membership.label, refused=membership.refused)

        def cluster_info():
            rows = []
            for c in list(session.clients):
                try:
                    i = c.describe()
                except (MtpdistError, ValueError) as e:  # a worker gone since the last request
                    rows.append({"address": c.address, "error": str(e)})
                    continue
                rows.append({"address": c.address, "worker_id": i.worker_id, "backend": i.backend, "chip": i.chip,
                             "layers": [i.layer_start, i.layer_end], "usable_bytes": i.usable_bytes,
                             "weight_bytes": i.weight_bytes, "sequences": i.sequences, "state_bytes": i.state_bytes})
            return {"mode": "pipeline", "workers": rows}
    config = session.parts.config
    metrics = Metrics()
    settings = SchedulerSettings(max_inflight=server.max_inflight, prefill_budget=model.prefill_step,
                                 rounds_in_flight=model.rounds_in_flight,
                                 reuse_prefixes=server.prefix_reuse)
    engine = EngineThread(session.generator, session, settings,
                          on_result=metrics.record_generation,
                          on_unit=metrics.record_unit)
    engine.start()
    max_ctx = server.max_context or int(config.text_config.get("max_position_embeddings", 32768))
    names = [*server.served_model_names, Path(model.model).name]
    state = ServerState(engine=engine, tokenizer=session.generator.tokenizer, model_name=names[0],
                        model_aliases=tuple(names[1:]),
                        max_context=max_ctx, mtp=model.mtp, metrics=metrics, vocab_size=config.vocab_size,
                        api_key=server.api_key or os.environ.get("MTPDIST_API_KEY"), cluster_info=cluster_info,
                        default_max_tokens=server.default_max_tokens, mtp_depth=model.mtp_depth,
                        max_queue=server.max_queue)
    app = create_app(state)
    sock = socket.socket(socket.AF_INET6 if ":" in server.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((server.host, server.port))
    except OSError as e:
        raise MtpdistError(f"cannot listen on {server.host}:{server.port}: {e.strerror}") from e
    host, port = sock.getsockname()[:2]
    workers = "local" if server.local else f"{len(session.clients)} workers"
    print(f"mtpdist coordinator serving http://{host}:{port}/v1 (model {state.model_name}, {workers}, "
          f"MTP {'on' if model.mtp else 'off'})", flush=True)
    if on_ready:
        on_ready(f"http://{host}:{port}/v1", state.model_name)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
        if membership:
            membership.close()
    return 0
