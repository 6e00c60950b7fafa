"""Prometheus metrics of one server (its own registry: no process-wide globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# The only endpoint label values: a request to any other path is counted as "other", so
# a client probing random paths cannot grow /metrics (one label set per path otherwise).
ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/cluster", "/health",
                    "/metrics", "/openapi.json", "/docs", "/redoc"})


def endpoint_label(path: str) -> str:
    """The metrics label of a request path: the route itself, or "other"."""
    return path if path in ROUTES else "other"


class Metrics:
    """Prometheus counters, gauges and histograms of one server."""
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.depth_rounds = Counter("mtpdist_mtp_rounds_at_depth", "Verify rounds that drafted at least `depth` "
                                    "tokens", ["depth"], registry=r)
        self.depth_held = Counter("mtpdist_mtp_rounds_held_at_depth", "Of those, rounds whose first `depth` drafts "
                                  "were all accepted (held / rounds = cumulative acceptance)", ["depth"], registry=r)
        self.requests = Counter("mtpdist_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("mtpdist_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter("mtpdist_generated_tokens", "Tokens generated", registry=r)
        self.drafted = Counter("mtpdist_mtp_drafted", "MTP drafts verified", registry=r)
        self.accepted = Counter("mtpdist_mtp_accepted", "MTP drafts accepted", registry=r)
        self.acceptance = Gauge("mtpdist_mtp_acceptance", "Draft acceptance of the last request", registry=r)
        self.tps = Gauge("mtpdist_generation_tokens_per_second", "Decode rate of the last request", registry=r)
        self.spec_rounds = Counter("mtpdist_mtp_speculative_rounds", "Verify rounds sent while an earlier round "
                                   "of the same sequence was in flight", registry=r)
        self.voided_rounds = Counter("mtpdist_mtp_voided_rounds", "Of those, rounds a rejection before them made "
                                     "void", registry=r)
        self.wasted_rows = Counter("mtpdist_mtp_wasted_rows", "Rows of voided rounds", registry=r)
        self.drafted_ahead = Counter("mtpdist_mtp_drafted_ahead", "Speculative rounds whose drafts were all made "
                                     "while the rounds before them were out", registry=r)
        self.rounds_in_flight = Gauge("mtpdist_mtp_rounds_in_flight", "Most verify rounds the last request had in "
                                      "flight at once", registry=r)
        self.queue_depth = Gauge("mtpdist_queue_depth", "Requests waiting or running", registry=r)
        self.hop_latency = Histogram("mtpdist_pipeline_overhead_seconds",
                                     "Per-stage time of a forward outside worker compute (network, serialization, queueing)",
                                     buckets=(1e-4, 3e-4, 1e-3, 2e-3, 5e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0), registry=r)
        self.request_seconds = Histogram("mtpdist_request_seconds", "Request latency", ["endpoint"], registry=r)

    def count(self, path: str, status: int | str) -> None:
        """Count one answered request under its bounded endpoint label."""
        self.requests.labels(endpoint_label(path), str(status)).inc()

    def observe(self, path: str, seconds: float) -> None:
        """Record one request's latency under its bounded endpoint label."""
        self.request_seconds.labels(endpoint_label(path)).observe(seconds)

    def record_generation(self, result) -> None:
        """Account one finished generation (tokens, MTP statistics)."""
        self.prompt_tokens.inc(result.prompt_tokens)
        self.generated_tokens.inc(result.generation_tokens)
        self.drafted.inc(result.drafted)
        self.accepted.inc(result.accepted)
        if result.drafted:
            self.acceptance.set(result.acceptance)
        for depth, (rounds, held) in enumerate(result.rounds_by_depth, start=1):
            self.depth_rounds.labels(str(depth)).inc(rounds)
            self.depth_held.labels(str(depth)).inc(held)
        self.tps.set(result.generation_tps)
        if result.rounds:
            self.spec_rounds.inc(result.rounds.get("speculative", 0))
            self.voided_rounds.inc(result.rounds.get("voided", 0))
            self.wasted_rows.inc(result.rounds.get("wasted_rows", 0))
            self.drafted_ahead.inc(result.rounds.get("drafted_ahead", 0))
            self.rounds_in_flight.set(result.rounds.get("max_in_flight", 0))

    def record_unit(self, wall_s: float, result) -> None:
        """One unit back from the pipeline: its time outside worker compute, per stage."""
        stages = max(1, len(result.compute_us))
        self.hop_latency.observe(max(0.0, wall_s - sum(result.compute_us) / 1e6) / stages)

    def render(self) -> bytes:
        return generate_latest(self.registry)
