"""Prompts for the load: synthetic ones of an exact token length, or lines of a JSONL file."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.cli.bench.config import BenchError
from app.cli.dev.mockllm import VOCAB, get_encoding

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class Prompt:
    """One request's input: chat messages and the completion length asked for."""

    messages: Messages
    max_tokens: int

    def wire(self) -> dict[str, Any]:
        """The ``prompt``/``messages`` part of a Sluice ``generate`` frame."""
        if len(self.messages) == 1 and self.messages[0].get("role") == "user":
            return {"prompt": self.messages[0]["content"]}
        return {"messages": self.messages}


class PromptSource:
    """Hands out prompts in a fixed, seeded order (cycling through a file's lines)."""

    def __init__(self, prompts: list[Prompt] | None = None, *, input_tokens: int = 32,
                 output_tokens: int = 50, seed: int = 0) -> None:
        self._fixed = prompts
        self._input_tokens = input_tokens
        self._output_tokens = output_tokens
        self._rng = random.Random(seed)
        self._count = 0

    def next(self) -> Prompt:
        """The next prompt."""
        self._count += 1
        if self._fixed:
            return self._fixed[(self._count - 1) % len(self._fixed)]
        text = synthetic_text(self._input_tokens, self._rng)
        return Prompt([{"role": "user", "content": text}], self._output_tokens)


def synthetic_text(n_tokens: int, rng: random.Random) -> str:
    """Random words that encode to exactly ``n_tokens`` cl100k tokens.

    Every word of the mock's vocabulary is one token with its leading space,
    so distinct prompts of one length are cheap; the count is checked with
    tiktoken and corrected if a merge ever changes it.
    """
    words = rng.choices(VOCAB, k=n_tokens)
    words[0] = words[0].lstrip() or words[0]
    text = "".join(words)
    enc = get_encoding()
    tokens = enc.encode_ordinary(text)
    if len(tokens) != n_tokens:  # pragma: no cover - VOCAB words never merge
        tokens = (tokens * (n_tokens // max(1, len(tokens)) + 1))[:n_tokens]
        text = enc.decode(tokens)
    return text


def load_jsonl(path: Path, default_max_tokens: int) -> list[Prompt]:
    """Read prompts from a JSONL file.

    Each line is an object with ``prompt`` (a string) or ``messages`` (chat
    messages), and optionally ``max_tokens``; blank lines and lines starting
    with ``#`` are skipped.

    :raises BenchError: the file is missing, empty, or a line is malformed.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise BenchError(f"--prompts {path}: {e.strerror or e}") from None
    prompts: list[Prompt] = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"--prompts {path}:{n}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise BenchError(f"{where}: not JSON ({e})") from None
        if not isinstance(obj, dict):
            raise BenchError(f"{where}: each line must be a JSON object")
        messages = obj.get("messages")
        if isinstance(obj.get("prompt"), str) and obj["prompt"]:
            messages = [{"role": "user", "content": obj["prompt"]}]
        if not (isinstance(messages, list) and messages
                and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                        and isinstance(m.get("role"), str) for m in messages)):
            raise BenchError(f"{where}: give a non-empty 'prompt' string or 'messages' "
                             "(a list of {role, content} objects)")
        max_tokens = obj.get("max_tokens", default_max_tokens)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise BenchError(f"{where}: 'max_tokens' must be a positive integer")
        prompts.append(Prompt([{"role": m["role"], "content": m["content"]} for m in messages],
                              max_tokens))
    if not prompts:
        raise BenchError(f"--prompts {path}: no prompts in the file")
    return prompts
