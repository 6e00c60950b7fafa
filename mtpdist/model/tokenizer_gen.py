"""Train a small byte-level BPE tokenizer offline (on Python's own standard library)."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

SPECIALS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# A Qwen3.5-style chat template (same markup: <think> blocks, <tools> in the system turn,
# <tool_call><function=...><parameter=...> calls, <tool_response> turns). Thinking is off
# unless `enable_thinking` is passed: the small models made here were never taught to think.
CHAT_TEMPLATE = """{%- set thinking = enable_thinking if enable_thinking is defined else false %}
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages and messages[0].role == 'system' and messages[0].content %}
{{- messages[0].content + '\\n\\n' }}
{%- endif %}
{{- '# Tools\\n\\nThese functions are available:\\n<tools>' }}
{%- for tool in tools %}
{{- '\\n' + (tool | tojson) }}
{%- endfor %}
{{- '\\n</tools>\\n\\nTo call a function, reply with\\n<tool_call>\\n<function=NAME>\\n<parameter=ARGUMENT>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call><|im_end|>\\n' }}
{%- elif messages and messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for m in messages %}
{%- if m.role == 'system' and loop.first %}
{%- elif m.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
{{- '<|im_start|>user' }}
{%- endif %}
{{- '\\n<tool_response>\\n' + (m.content or '') + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
{{- '<|im_end|>\\n' }}
{%- endif %}
{%- elif m.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' }}
{%- if m.reasoning_content %}
{{- '<think>\\n' + m.reasoning_content + '\\n</think>\\n\\n' }}
{%- endif %}
{{- m.content or '' }}
{%- for call in m.tool_calls or [] %}
{%- set f = call.function if call.function is defined else call %}
{{- '\\n<tool_call>\\n<function=' + f.name + '>\\n' }}
{%- for name, value in (f.arguments or {}).items() %}
{{- '<parameter=' + name + '>\\n' + (value if value is string else (value | tojson)) + '\\n</parameter>\\n' }}
{%- endfor %}
{{- '</function>\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>' + m.role + '\\n' + (m.content or '') + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if thinking %}
{{- '<think>\\n' }}
{%- else %}
{{- '<think>\\n\\n</think>\\n\\n' }}
{%- endif %}
{%- endif %}
"""


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
