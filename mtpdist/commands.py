"""Subcommand bodies that need more than a line or two."""

from __future__ import annotations

import json
import sys

from .engine.generate import GenerationRequest
from .engine.sampling import SamplingParams
from .errors import MtpdistError


def sampling_from(args) -> SamplingParams:
    try:
        return SamplingParams(temperature=args.temp, top_p=args.top_p, top_k=args.top_k,
                              min_p=args.min_p, seed=args.seed)
    except ValueError as e:
        raise MtpdistError(str(e)) from e


def run_generate(args) -> int:
    """`mtpdist generate`: one completion, printed as text or as one JSON object."""
    if args.max_tokens < 1:
        raise MtpdistError("--max-tokens must be at least 1")
    post_norm = args.mtp_hidden == "post-norm"
    if args.worker:
        from .coordinator.session import PipelineSession
        session = PipelineSession(args.model, args.worker, mtp=args.mtp, post_norm=post_norm,
                                  prefill_step=args.prefill_step)
    else:
        from .engine.local import LocalSession
        session = LocalSession(args.model, mtp=args.mtp, post_norm=post_norm, prefill_step=args.prefill_step)
    gen = session.generator
    req = GenerationRequest(prompt_ids=gen.encode(args.prompt), max_tokens=args.max_tokens,
                            sampling=sampling_from(args), stop=tuple(args.stop), mtp=args.mtp)
    try:
        for delta in gen.stream(req, session.trunk()):
            if not args.json and delta.text:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
            if delta.result is not None:
                result = delta.result
    finally:
        close = getattr(session, "close", None)
        if close:
            close()
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        sys.stdout.write("\n")
    return 0
