"""Test helpers: decode through the scheduler (the path the server runs), and an oracle
drafter that knows the greedy answer."""

from __future__ import annotations

import mlx.core as mx

from mtpdist.coordinator.local_session import LocalSession
from mtpdist.engine.depth import FixedDepth
from mtpdist.engine.driver import generate
from mtpdist.engine.generate import GenerationRequest, Generator
from mtpdist.engine.scheduler import Scheduler, SchedulerSettings
from mtpdist.worker.in_process import LocalTransport


class InProcess:
    """A Backend with every layer in this process (a worker's store, no network)."""

    def __init__(self, parts):
        self.t = LocalTransport(parts.stack, parts.config.hidden_size)

    def transport(self):
        return self.t

    def prepare(self):
        pass

    def recover(self):
        raise AssertionError("an in-process backend has nothing to recover")


class Pipelined(InProcess):
    """Every layer in this process, but each unit's result comes back `latency` seconds after it
    was sent, in order, and up to `stages` units may be out: rounds of one sequence stack up as
    they do through a pipeline of workers (the store applies each unit at once, in order)."""

    def __init__(self, parts, stages: int = 2, latency: float = 0.02):
        import queue
        import threading
        super().__init__(parts)
        self.t.stages = stages
        self.q: queue.Queue = queue.Queue()
        send = self.t.send

        def delayed(rows, hidden, done):
            import time
            send(rows, hidden, lambda r: self.q.put((time.monotonic() + latency, done, r)))

        def deliver():
            import time
            while True:
                at, done, r = self.q.get()
                time.sleep(max(0.0, at - time.monotonic()))
                done(r)
        self.t.send = delayed
        threading.Thread(target=deliver, daemon=True).start()


def local_session(path, mtp: bool = False, prefill_step: int = 512, tokenizer: bool = True) -> LocalSession:
    """All layers in this process, composed as `mtpdist generate` does without workers."""
    return LocalSession(path, LocalTransport, mtp=mtp, prefill_step=prefill_step, tokenizer=tokenizer)


def decode(parts, prompt, n, step=512, mtp=False, drafter=None, post_norm=True, backend=None, depth=1,
           sampling=None, settings=SchedulerSettings(reuse_prefixes=False)):
    """One request through a fresh scheduler: (tokens, GenerationResult)."""
    policy = depth if hasattr(depth, "choose") else None
    gen = Generator(parts, None, post_norm, step, make_drafter=(lambda req: drafter) if drafter else None,
                    make_depth=(lambda req: policy) if policy else None)
    req = GenerationRequest(tuple(prompt), n, mtp=mtp, mtp_depth=1 if policy else depth, ignore_eos=True,
                            **({"sampling": sampling} if sampling else {}))
    r = generate(Scheduler(gen, backend or InProcess(parts), settings), req, timeout=600)
    return list(r.token_ids), r


def plain_greedy(parts, prompt, n, step=512, backend=None):
    return decode(parts, prompt, n, step, backend=backend)[0]


def spec_greedy(parts, prompt, n, step=512, drafter=None, post_norm=True, backend=None, depth=1):
    """Greedy MTP decoding; returns (tokens, result) where the result carries drafted/accepted."""
    return decode(parts, prompt, n, step, mtp=True, drafter=drafter, post_norm=post_norm, backend=backend,
                  depth=depth)


class OracleDrafter:
    """Drafts the true greedy token, except where `wrong(i)` says to draft a wrong one.

    MTP entry i pairs (h_i, x_{i+1}) and predicts x_{i+2}; the oracle counts entries.
    """

    def __init__(self, reference: list[int], vocab: int, wrong=lambda i: False):
        self.ref, self.vocab, self.wrong, self.n = reference, vocab, wrong, 0

    def extend(self, hidden, normed, tokens):
        self.n += len(tokens)
        target = self.ref[self.n + 1] if self.n + 1 < len(self.ref) else 0
        if self.wrong(self.n):
            target = (target + 1) % self.vocab
        return mx.where(mx.arange(self.vocab) == target, 10.0, 0.0)

    def chain(self, token):
        return self.extend(None, None, [token])

    def rewind(self, n):
        self.n -= n


__all__ = ["FixedDepth", "InProcess", "OracleDrafter", "Pipelined", "decode", "local_session", "plain_greedy", "spec_greedy"]


class Layers:
    """A LayerStack with one sequence's caches (model-level tests of passes and rewinds)."""

    def __init__(self, stack):
        from mtpdist.model.cache import rewind_all
        self.stack, self._rewind = stack, rewind_all
        self.caches = stack.make_caches()

    def forward(self, hidden, keep=()):
        return self.stack.ragged(hidden, [(self.caches, hidden.shape[1], tuple(keep))])

    def rewind(self, n):
        self._rewind(self.caches, n)

    @property
    def offset(self):
        return self.caches[0].offset
