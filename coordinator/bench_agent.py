"""`mtpdist bench --scenario agent`: a tool-using session as a client sends it.

Every turn resends the whole history (a long system prompt with tools, then the user's task,
the assistant's replies, tool calls and tool results) to /v1/chat/completions of a real
coordinator over local workers, streaming, and times each turn's first token and the whole
session. It runs once per worker count (`--worker-counts 1,2,4`): N workers each emulating
1/N of a Mac (`--emulate-ms A,B` is the whole Mac; each worker gets A/N, B/N), so the
figures answer "are N Macs faster than one for this session?". A second conversation on
the same system prompt and tools follows each session.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from mtpdist.errors import MtpdistError

from .local_cluster import LocalCluster

RULES = [
    "Read the relevant files before you change them, and keep each change small and reviewable.",
    "Run the tests after every change; never report success without a passing run.",
    "Prefer the standard library; add a dependency only when it saves real work and is well kept.",
    "Name things for what they mean; comments say why, not what.",
    "Handle errors explicitly and say what went wrong in words a user understands.",
    "Never print secrets, tokens or private keys, and never send them anywhere.",
]
TOOLS = [{"type": "function", "function": {"name": name, "description": desc, "parameters": {
    "type": "object", "properties": {arg: {"type": "string", "description": f"the {arg}"}}, "required": [arg]}}}
    for name, desc, arg in [("read_file", "Read a file of the repository", "path"),
                            ("run_tests", "Run the test suite (or one file of it) and return the failures", "path"),
                            ("search", "Search the repository for a regular expression", "pattern"),
                            ("write_file", "Replace a file's contents", "path")]]
TASKS = ["The date parser rejects ISO dates with a time zone. Find out why and fix it.",
         "Add a --verbose flag to the command line tool and document it."]
TOOL_OUTPUT = ("FAILED tests/test_dates.py::test_parse_tz - ValueError: unconverted data remains: +02:00\n"
               "    at parse_date (src/dates.py:41)\n") * 3


def system_prompt(tokens: int) -> str:
    """About `tokens` tokens of an agent's standing instructions."""
    lines, i = ["You are a coding agent working in a Python repository."], 0
    while sum(len(x) for x in lines) < tokens * 4:          # ~4 characters a token in English
        lines.append(f"{i + 1}. {RULES[i % len(RULES)]}")
        i += 1
    return "\n".join(lines)


class _Coordinator:
    """A real `mtpdist coordinator` over given workers, on a free port."""

    def __init__(self, model: str, addresses: list[str], *flags: str):
        cmd = [sys.executable, "-m", "mtpdist.cli", "coordinator", "--model", model, "--port", "0", "--insecure",
               *flags, *sum((["--worker", a] for a in addresses), [])]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.url, lines = None, []
        while self.url is None:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                raise MtpdistError("the coordinator exited:\n" + "".join(lines[-20:]))
            lines.append(line)
            m = re.search(r"serving (http://\S+/v1)", line)
            self.url = m.group(1) if m else None
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def _turn(client: httpx.Client, url: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed turn: its reply, time to first token, wall time and cached prompt tokens."""
    t0 = time.perf_counter()
    first, text, usage = None, [], {}
    with client.stream("POST", url + "/chat/completions", json={
            "messages": messages, "tools": TOOLS, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True},
            "chat_template_kwargs": {"enable_thinking": False}}) as r:
        if r.status_code != 200:
            raise MtpdistError(f"the coordinator answered {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                piece = c.get("delta", {}).get("content") or ""
                if piece and first is None:
                    first = time.perf_counter() - t0
                text.append(piece)
    return {"reply": "".join(text), "ttft_s": first or time.perf_counter() - t0,
            "wall_s": time.perf_counter() - t0, "prompt_tokens": usage.get("prompt_tokens", 0),
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)}


def run_session(url: str, system: str, task: str, turns: int, max_tokens: int) -> list[dict]:
    """An agent's session: each turn the model replies, the client runs a tool and resends it all."""
    history = [{"role": "system", "content": system}, {"role": "user", "content": task}]
    out = []
    with httpx.Client(timeout=1800) as client:
        for t in range(turns):
            r = _turn(client, url, history, max_tokens)
            out.append({k: v for k, v in r.items() if k != "reply"})
            call = {"id": f"call_{t}", "type": "function",
                    "function": {"name": "run_tests", "arguments": json.dumps({"path": f"tests/test_{t}.py"})}}
            history += [{"role": "assistant", "content": r["reply"], "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": call["id"], "content": TOOL_OUTPUT}]
    return out


def _chat_turns(url: str, system: str, max_tokens: int) -> dict:
    """A plain chat's two turns (no tools): the second resends the history with a short question."""
    history = [{"role": "system", "content": system}, {"role": "user", "content": TASKS[0]}]
    with httpx.Client(timeout=1800) as client:
        first = _turn(client, url, history, max_tokens)
        history += [{"role": "assistant", "content": first["reply"]}, {"role": "user", "content": "Thanks. And why?"}]
        second = _turn(client, url, history, max_tokens)
    first.pop("reply"), second.pop("reply")
    return {"first": first, "second": second, "second_over_first_ttft": round(second["ttft_s"] / first["ttft_s"], 4)}


def scenario_agent(args, tmp: Path) -> dict:
    """The session through each worker count, side by side in one run."""
    counts = [int(x) for x in args.worker_counts.split(",")]
    a, b = (float(x) for x in args.emulate_ms.split(",")) if args.emulate_ms else (0.0, 0.0)
    system = system_prompt(args.prompt_tokens)
    flags = ["--prefill-step", str(args.prefill_step)]
    if args.mtp_depth != "none":
        flags += ["--mtp", "--mtp-depth", str(args.mtp_depth)]
    results = {}
    for n in counts:
        extra = ("--model-dir", str(Path(args.model).resolve()),
                 *(("--emulate-ms", f"{a / n:g},{b / n:g}") if args.emulate_ms else ()))
        with LocalCluster(n, tmp / f"agent{n}", *extra) as cluster:
            coord = _Coordinator(args.model, cluster.addresses, *flags)
            try:
                _turn(httpx.Client(timeout=600), coord.url, [{"role": "user", "content": "warm up"}], 2)
                t0 = time.perf_counter()
                turns = run_session(coord.url, system, TASKS[0], args.turns, args.max_tokens)
                session_s = time.perf_counter() - t0
                other = run_session(coord.url, system, TASKS[1], 1, args.max_tokens)[0]
                chat = _chat_turns(coord.url, "(a plain chat)\n" + system, args.max_tokens)
            finally:
                coord.stop()
        results[str(n)] = {
            "emulated": f"emulated, {a / n:g},{b / n:g} per worker" if args.emulate_ms else "real compute",
            "session_s": round(session_s, 3), "turns": turns,
            "second_turn_over_first_ttft": round(turns[1]["ttft_s"] / turns[0]["ttft_s"], 4) if len(turns) > 1 else None,
            "second_conversation": other,
            "second_conversation_over_first_ttft": round(other["ttft_s"] / turns[0]["ttft_s"], 4),
            "chat": chat}
    base = results[str(counts[0])]["session_s"]
    return {"worker_counts": counts, "whole_mac_emulated": args.emulate_ms, "turns_per_session": args.turns,
            "system_prompt_tokens": results[str(counts[0])]["turns"][0]["prompt_tokens"],
            "session_speedup_vs_first_count": {str(n): round(base / results[str(n)]["session_s"], 3) for n in counts},
            "runs": results}
