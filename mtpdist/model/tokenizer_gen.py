"""Train a small byte-level BPE tokenizer offline (on Python's own standard library)."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

SPECIALS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def stdlib_text(max_bytes: int = 2_000_000, skip: tuple[str, ...] = ()) -> list[str]:
    """Source files of this Python's standard library, a corpus every machine has."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for f in sorted(root.glob("*.py")):
        if f.name in skip:
            continue
        t = f.read_text(encoding="utf-8", errors="ignore")
        out.append(t)
        total += len(t)
        if total >= max_bytes:
            break
    return out


def write_tokenizer(out_dir: Path, vocab_size: int, corpus: list[str] | None = None) -> None:
    """Write tokenizer.json + tokenizer_config.json with exactly `vocab_size` entries or fewer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus or stdlib_text(300_000), trainer=trainer)
    out_dir = Path(out_dir)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
        "pad_token": "<|pad|>", "chat_template": CHAT_TEMPLATE, "model_max_length": 32768,
    }, indent=2))
