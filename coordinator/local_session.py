"""Generation with every layer in this process: the coordinator's parts, a tokenizer, and a
transport to an in-process worker store (handed in by the caller, since the coordinator
does not import the worker: `mtpdist.cli` and the tests compose the two)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from mlx_lm.utils import load_tokenizer

from mtpdist.engine.generate import Generator
from mtpdist.errors import ModelLoadError
from mtpdist.model.loader import ModelParts, load_parts


def load_tokenizer_for(model_dir: str | Path):
    """A model folder's tokenizer, with a clear error when it has none."""
    path = Path(model_dir)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ModelLoadError(f"{path}: no tokenizer files (tokenizer.json) next to the weights")
    return load_tokenizer(path)


class LocalSession:
    """All layers in this process: a Generator, and a Backend with one in-process stage."""

    def __init__(self, model_dir: str | Path, make_transport: Callable, mtp: bool = False, post_norm: bool = True,
                 prefill_step: int = 512, tokenizer: bool = True, parts: ModelParts | None = None):
        """`make_transport(stack, hidden_size)` builds the stage (worker.in_process.LocalTransport)."""
        self.parts: ModelParts = parts or load_parts(model_dir, mtp=mtp)
        self.generator = Generator(self.parts, load_tokenizer_for(model_dir) if tokenizer else None,
                                   post_norm, prefill_step)
        self._transport = make_transport(self.parts.stack, self.parts.config.hidden_size)

    def transport(self):
        """The scheduler's way through the layers: one stage, in this process."""
        return self._transport

    def prepare(self) -> None:
        pass

    def recover(self) -> None:
        raise ModelLoadError("a local session has no workers to recover")

    def close(self) -> None:
        pass
