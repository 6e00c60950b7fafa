"""Set up generation in this process: load the model parts and the tokenizer."""

from __future__ import annotations

from pathlib import Path

from mlx_lm.utils import load_tokenizer

from ..errors import ModelLoadError
from ..model.loader import ModelParts, load_parts
from .generate import Generator
from .stage import Stage
from .transport import LocalTransport
from .trunk import LocalTrunk


def load_tokenizer_for(model_dir: str | Path):
    """A model folder's tokenizer, with a clear error when it has none."""
    path = Path(model_dir)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ModelLoadError(f"{path}: no tokenizer files (tokenizer.json) next to the weights")
    return load_tokenizer(path)


class LocalSession:
    """All layers in this process: a Generator and fresh trunks for it."""

    def __init__(self, model_dir: str | Path, mtp: bool = False, post_norm: bool = True,
                 prefill_step: int = 512):
        self.parts: ModelParts = load_parts(model_dir, mtp=mtp)
        self.generator = Generator(self.parts, load_tokenizer_for(model_dir), post_norm, prefill_step)
        self._transport: LocalTransport | None = None

    def trunk(self) -> LocalTrunk:
        return LocalTrunk(self.parts.stack)

    def transport(self) -> LocalTransport:
        """The scheduler's way through the layers: one stage, in this process."""
        if self._transport is None:
            self._transport = LocalTransport(Stage(self.parts.stack, self.parts.config.hidden_size))
        return self._transport

    def prepare(self) -> None:
        pass

    def recover(self) -> None:
        raise ModelLoadError("a local session has no workers to recover")
