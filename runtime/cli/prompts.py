"""Prompts from the command line: ``--prompt-ids`` and ``--prompts FILE`` as token ids, checked against the
vocabulary before anything starts."""

from __future__ import annotations

from pathlib import Path

from model.errors import ConfigError, UserError
from model.tokenizer import Tokenizer

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."


def token_ids(text: str, where: str, vocab_size: int, why: str = "") -> list[int]:
    """Comma-separated token ids, each in [0, vocab_size); ``where`` names the flag or file line in errors,
    ``why`` says why ids are expected there."""
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{where}: {why}must be comma-separated token ids, found {text[:60]!r}") from None
    bad = [(i, t) for i, t in enumerate(ids) if not 0 <= t < vocab_size]
    if bad:
        raise ConfigError(f"{where}: token {bad[0][0] + 1} is {bad[0][1]}, outside the model's vocabulary "
                          f"(0..{vocab_size - 1})")
    if not ids:
        raise ConfigError(f"{where} is empty: give at least one token id")
    return ids


def prompt_ids(ids: str | None, text: str | None, tok: Tokenizer | None, chat: bool, vocab_size: int) -> list[int]:
    """``--prompt-ids``, else ``--prompt`` (default: DEFAULT_PROMPT), wrapped in the chat template with ``chat``."""
    if ids is not None:
        return token_ids(ids, "--prompt-ids", vocab_size)
    text = text if text is not None else DEFAULT_PROMPT
    return tok.encode_chat([{"role": "user", "content": text}]) if chat else tok.encode(text)


def read_prompts(path: str | None, n: int | None, tok: Tokenizer | None, vocab_size: int,
                 chat: bool = False) -> list[list[int]]:
    """The first ``n`` (None: all) non-empty lines of ``path`` as token ids (text, wrapped in the chat
    template with ``chat``, or comma-separated ids without a tokenizer); without ``path`` the default prompt."""
    if path is None:
        if tok is None:
            raise UserError("the image has no tokenizer: give --prompts FILE with lines of comma-separated token "
                            "ids (or --checkpoints DIR with a tokenizer)")
        return [tok.encode(DEFAULT_PROMPT)] * n
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the prompts ({e})") from None
    found = [(i + 1, ln) for i, ln in enumerate(lines) if ln.strip()][:n]
    if not found:
        raise UserError(f"{path}: no non-empty line")
    if n is not None and len(found) < n:
        raise UserError(f"{path}: {len(found)} non-empty line(s), --batch-size {n} needs {n}")
    if tok is None:
        why = "the image has no tokenizer, so a prompt "
        return [token_ids(ln, f"{path}:{no}", vocab_size, why) for no, ln in found]
    return [tok.encode_chat([{"role": "user", "content": ln}]) if chat else tok.encode(ln) for _, ln in found]
