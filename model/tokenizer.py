"""Tokenizer: text <-> token ids for Llama-family models, built from the files a checkpoint ships with.

Three sources, one ``Tokenizer`` over one of two backends:
  - Meta Llama-3 ``tokenizer.model`` (tiktoken BPE ranks, Meta's split pattern and 256 special tokens)
    -> tiktoken backend (``from_tiktoken_model``).
  - Hugging Face ``tokenizer.json`` (+ ``tokenizer_config.json`` for BOS/EOS, add_bos and the chat
    template) -> ``tokenizers`` backend (``from_tokenizer_json``).
  - GGUF vocabulary metadata of a byte-level BPE (``tokenizer.ggml.model == "gpt2"``) -> a
    ``tokenizers`` BPE rebuilt from ``tokenizer.ggml.tokens``/``merges``, split the way
    ``tokenizer.ggml.pre`` says (``from_gguf``).
``load_tokenizer`` picks one from a path. ``Tokenizer.save`` writes the backend's file (``tokenizer.json``
or ``tokenizer.model``) plus ``tokenizer_meta.json`` into a directory (beside a packed image's manifest);
``Tokenizer.load`` reads them back and encodes and decodes identically.

Chat prompts are built as ids, not as text: control tokens are looked up by name and only the text
between them is encoded, with special-token strings read as plain text, so a message cannot inject
``<|eot_id|>``. Two formats:
  llama3: <|begin_of_text|> then per message <|start_header_id|>{role}<|end_header_id|>\\n\\n{content
          stripped}<|eot_id|>, then <|start_header_id|>assistant<|end_header_id|>\\n\\n.
  chatml: per message <|im_start|>{role}\\n{content}<|im_end|>\\n, then <|im_start|>assistant\\n; a
          default system message first when the template has one (SmolLM2's) and the conversation
          does not start with a system message.

Runs in the client process; owns nothing shared. Bad files raise ``CheckpointError`` naming the file and
what was expected and found.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import gguf
import tiktoken
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from model.errors import CheckpointError

logger = logging.getLogger(__name__)

META_NAME = "tokenizer_meta.json"
META_FORMAT = 1

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Meta llama-models llama3/tokenizer.py: these, then reserved tokens up to 256, ids after the ranks.
_LLAMA3_NAMED_SPECIALS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
)
_LLAMA3_NUM_SPECIALS = 256

# Tokens that end generation wherever a vocabulary has them (end of text, end of turn, end of message).
_END_TOKENS = ("<|end_of_text|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>")
_CHAT_MARKERS = (("llama3", "<|start_header_id|>"), ("chatml", "<|im_start|>"))
_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]*?)<\|im_end\|>")

_GGUF_LLAMA3_PRE = frozenset({"llama-bpe", "llama3", "llama-v3"})
_GGUF_GPT2_PRE = frozenset({"gpt2", "gpt-2", "default"})
_CONTROL, _USER_DEFINED = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)


class _Special(str):
    """A control token's name inside a rendered chat prompt (encoded by id, never as text)."""


# ---------------------------------------------------------------------------------------------- backends


@dataclass(frozen=True, eq=False)
class _HFBackend:
    """A ``tokenizers.Tokenizer``, held twice: ``special`` matches special-token strings as their ids,
    ``plain`` (``encode_special_tokens``) reads them as text. Two objects, so encode never mutates."""

    special: tokenizers.Tokenizer
    plain: tokenizers.Tokenizer = field(init=False)
    kind: ClassVar[str] = "tokenizers"
    file_name: ClassVar[str] = "tokenizer.json"

    def __post_init__(self) -> None:
        plain = tokenizers.Tokenizer.from_str(self.special.to_str())
        plain.encode_special_tokens = True
        object.__setattr__(self, "plain", plain)

    @classmethod
    def load(cls, directory: Path, meta: dict) -> _HFBackend:
        return cls(_read_tokenizer_json(directory / cls.file_name))

    def encode(self, text: str, allow_special: bool) -> list[int]:
        backend = self.special if allow_special else self.plain
        return backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        return self.special.decode(ids, skip_special_tokens=skip_special)

    def token_id(self, token: str) -> int | None:
        return self.special.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.special.get_vocab_size(with_added_tokens=True)

    def save(self, directory: Path) -> dict:
        self.special.save(str(directory / self.file_name))
        return {}


@dataclass(frozen=True, eq=False)
class _TiktokenBackend:
    """A ``tiktoken.Encoding``; keeps its ranks, specials and pattern to write them back."""

    ranks: dict[bytes, int]
    specials: dict[str, int]
    pattern: str
    encoding: tiktoken.Encoding = field(init=False)
    kind: ClassVar[str] = "tiktoken"
    file_name: ClassVar[str] = "tokenizer.model"

    def __post_init__(self) -> None:
        encoding = tiktoken.Encoding(
            "llama3", pat_str=self.pattern, mergeable_ranks=self.ranks, special_tokens=self.specials
        )
        object.__setattr__(self, "encoding", encoding)

    @classmethod
    def load(cls, directory: Path, meta: dict) -> _TiktokenBackend:
        if not {"special_tokens", "pattern"} <= meta.keys():
            found = sorted(meta)
            raise CheckpointError(f"{directory / META_NAME}: expected keys special_tokens and pattern, found {found}")
        ranks = _read_tiktoken_ranks(_existing_file(directory / cls.file_name))
        return cls(ranks, meta["special_tokens"], meta["pattern"])

    def encode(self, text: str, allow_special: bool) -> list[int]:
        if allow_special:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: list[int], skip_special: bool) -> str:
        if skip_special:
            special_ids = set(self.specials.values())
            ids = [i for i in ids if i not in special_ids]
        return self.encoding.decode(ids)

    def token_id(self, token: str) -> int | None:
        return self.specials.get(token)

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def save(self, directory: Path) -> dict:
        by_rank = sorted(self.ranks.items(), key=lambda item: item[1])
        (directory / self.file_name).write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in by_rank))
        return {"pattern": self.pattern, "special_tokens": self.specials}


_Backend = _HFBackend | _TiktokenBackend
_BACKENDS = {b.kind: b for b in (_HFBackend, _TiktokenBackend)}


# --------------------------------------------------------------------------------------------- Tokenizer


@dataclass(frozen=True, eq=False)
class Tokenizer:
    """Encode, decode and chat-format for one model. ``source`` is the file or directory it came from."""

    backend: _Backend = field(repr=False)
    bos_id: int | None
    eos_ids: frozenset[int]
    add_bos: bool
    chat_format: str | None
    default_system: str | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.chat_format not in (None, "llama3", "chatml"):
            found = self.chat_format
            raise CheckpointError(f"{self.source}: chat_format: expected llama3, chatml or None, found {found!r}")
        if self.add_bos and self.bos_id is None:
            raise CheckpointError(f"{self.source}: add_bos is set but the tokenizer has no BOS token id")

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    def vocabulary_digest(self) -> str:
        """A hash of every token's id and text (or bytes), specials included: two tokenizers with one digest
        turn the same ids into the same text (a draft model's and its target's, runtime/engine/drafts.py)."""
        b = self.backend
        if isinstance(b, _HFBackend):
            items = sorted((i, t.encode()) for t, i in b.special.get_vocab(with_added_tokens=True).items())
        else:
            items = sorted([(i, t) for t, i in b.ranks.items()] + [(i, t.encode()) for t, i in b.specials.items()])
        h = hashlib.sha256()
        for i, t in items:
            h.update(i.to_bytes(4, "little") + len(t).to_bytes(4, "little") + t)
        return h.hexdigest()[:16]

    def encode(self, text: str, bos: bool | None = None, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``; BOS first if ``bos`` (default ``add_bos``). Special-token strings are
        plain text unless ``allow_special``."""
        ids = self.backend.encode(text, allow_special)
        if not (self.add_bos if bos is None else bos):
            return ids
        if self.bos_id is None:
            raise CheckpointError(f"{self.source}: BOS requested, but the tokenizer has no BOS token")
        return [self.bos_id, *ids]

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Ids of a conversation ``[{"role": ..., "content": ...}]`` in this model's chat format."""
        if self.chat_format is None:
            raise CheckpointError(
                f"{self.source}: expected a chat format (a chat template, or <|start_header_id|> or "
                "<|im_start|> tokens), found none"
            )
        _check_messages(messages)
        render = _llama3_pieces if self.chat_format == "llama3" else _chatml_pieces
        ids: list[int] = []
        for piece in render(messages, add_generation_prompt, self.default_system):
            ids += [self._special_id(piece)] if isinstance(piece, _Special) else self.encode(piece, bos=False)
        return ids

    def _special_id(self, token: str) -> int:
        token_id = self.backend.token_id(token)
        if token_id is None:
            raise CheckpointError(
                f"{self.source}: chat format {self.chat_format} needs the token {token!r}, not in the vocabulary"
            )
        return token_id

    def save(self, directory: str | Path) -> list[str]:
        """Write the backend's file and ``tokenizer_meta.json`` into ``directory``; return their names."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": META_FORMAT, "kind": self.backend.kind, "bos_id": self.bos_id,
            "eos_ids": sorted(self.eos_ids), "add_bos": self.add_bos, "chat_format": self.chat_format,
            "default_system": self.default_system, **self.backend.save(directory),
        }
        (directory / META_NAME).write_text(json.dumps(meta, indent=1) + "\n")
        return [self.backend.file_name, META_NAME]

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Read a directory written by ``save``."""
        directory = Path(directory)
        meta = _read_meta(directory / META_NAME)
        backend = _BACKENDS[meta["kind"]].load(directory, meta)
        return cls(
            backend, meta["bos_id"], frozenset(meta["eos_ids"]), meta["add_bos"], meta["chat_format"],
            meta["default_system"], str(directory),
        )


def _check_messages(messages: list[dict]) -> None:
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise ValueError(f"chat message {i}: expected {{'role': str, 'content': str}}, found {message!r:.100}")


def _llama3_pieces(messages: list[dict], add_generation_prompt: bool, default_system: str | None) -> list[str]:
    start, end = _Special("<|start_header_id|>"), _Special("<|end_header_id|>")
    pieces: list[str] = [_Special("<|begin_of_text|>")]
    for m in messages:
        pieces += [start, m["role"], end, "\n\n" + m["content"].strip(), _Special("<|eot_id|>")]
    if add_generation_prompt:
        pieces += [start, "assistant", end, "\n\n"]
    return pieces


def _chatml_pieces(messages: list[dict], add_generation_prompt: bool, default_system: str | None) -> list[str]:
    if messages and messages[0]["role"] != "system" and default_system is not None:
        messages = [{"role": "system", "content": default_system}, *messages]
    start, end = _Special("<|im_start|>"), _Special("<|im_end|>")
    pieces: list[str] = []
    for m in messages:
        pieces += [start, f"{m['role']}\n{m['content']}", end, "\n"]
    if add_generation_prompt:
        pieces += [start, "assistant\n"]
    return pieces


def _build(backend: _Backend, source: Path, bos_id: int | None, eos_id: int | None, add_bos: bool,
           template: str | None) -> Tokenizer:
    """A Tokenizer with every end token the vocabulary has and the chat format its template names."""
    eos_ids = {backend.token_id(t) for t in _END_TOKENS} | {eos_id}
    chat_format = _chat_format(template, backend)
    found = _DEFAULT_SYSTEM.search(template or "") if chat_format == "chatml" else None
    return Tokenizer(
        backend, bos_id, frozenset(eos_ids - {None}), add_bos, chat_format,
        found.group(1) if found else None, str(source),
    )


def _chat_format(template: str | None, backend: _Backend) -> str | None:
    """The format the chat template writes; without a template, the one whose tokens the vocabulary has."""
    for chat_format, marker in _CHAT_MARKERS:
        found = marker in template if template is not None else backend.token_id(marker) is not None
        if found:
            return chat_format
    return None


# ---------------------------------------------------------------------------------------------- sources


def from_tiktoken_model(path: str | Path) -> Tokenizer:
    """Meta Llama-3 ``tokenizer.model``: ranks, then Meta's 256 special tokens numbered after them."""
    path = _existing_file(path)
    ranks = _read_tiktoken_ranks(path)
    specials = {name: len(ranks) + i for i, name in enumerate(_llama3_special_names())}
    backend = _TiktokenBackend(ranks, specials, LLAMA3_PATTERN)
    return _build(backend, path, specials["<|begin_of_text|>"], specials["<|end_of_text|>"], True, None)


def _llama3_special_names() -> list[str]:
    reserved = _LLAMA3_NUM_SPECIALS - len(_LLAMA3_NAMED_SPECIALS)
    return [*_LLAMA3_NAMED_SPECIALS, *(f"<|reserved_special_token_{2 + i}|>" for i in range(reserved))]


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """``<base64 token> <rank>`` per line; ranks must be 0..N-1, each once."""
    ranks = dict(_parse_rank_line(path, n, line)
                 for n, line in enumerate(path.read_bytes().splitlines(), 1) if line.strip())
    if not ranks or sorted(ranks.values()) != list(range(len(ranks))):
        found = f"{len(ranks)} tokens, ranks {min(ranks.values(), default='-')}..{max(ranks.values(), default='-')}"
        raise CheckpointError(f"{path}: expected distinct tokens with ranks 0..N-1 each once, found {found}")
    return ranks


def _parse_rank_line(path: Path, n: int, line: bytes) -> tuple[bytes, int]:
    parts = line.split()
    try:
        if len(parts) != 2:
            raise ValueError(line)
        return base64.b64decode(parts[0], validate=True), int(parts[1])
    except ValueError:  # binascii.Error is a ValueError
        raise CheckpointError(
            f"{path}: line {n}: expected '<base64 token> <rank>' (tiktoken BPE; SentencePiece models are "
            f"not supported), found {line[:80]!r}"
        ) from None


def from_tokenizer_json(path: str | Path, config_path: str | Path | None = None) -> Tokenizer:
    """HF ``tokenizer.json``; BOS/EOS, add_bos and the chat template from ``tokenizer_config.json``
    (``config_path``, else the one beside it if present). Without ``add_bos_token`` in the config, BOS
    is added when the file's post-processor adds it."""
    path = _existing_file(path)
    config_file = Path(config_path) if config_path is not None else path.with_name("tokenizer_config.json")
    config = _read_json(config_file) if config_path is not None or config_file.is_file() else {}
    backend = _HFBackend(_read_tokenizer_json(path))
    bos_id = _config_token_id(config, "bos_token", backend, config_file)
    eos_id = _config_token_id(config, "eos_token", backend, config_file)
    post_bos = bos_id is not None and backend.special.encode("").ids[:1] == [bos_id]
    add_bos = bool(config.get("add_bos_token", post_bos))
    return _build(backend, path, bos_id, eos_id, add_bos, _config_template(config, path.parent))


def _read_tokenizer_json(path: Path) -> tokenizers.Tokenizer:
    _existing_file(path)
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises bare Exception on parse errors
        raise CheckpointError(f"{path}: expected a Hugging Face tokenizer.json, could not parse it: {e}") from e


def _config_token_id(config: dict, key: str, backend: _HFBackend, config_file: Path) -> int | None:
    token = config.get(key)
    if isinstance(token, dict):  # a serialized AddedToken
        token = token.get("content")
    if token is None:
        return None
    token_id = backend.token_id(token)
    if token_id is None:
        raise CheckpointError(f"{config_file}: {key}: expected a token of the vocabulary, found {token!r}")
    return token_id


def _config_template(config: dict, directory: Path) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = "\n".join(t.get("template", "") for t in template)
    jinja = directory / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text()
    return template


def from_gguf(path: str | Path) -> Tokenizer:
    """The byte-level BPE vocabulary of a GGUF file (``tokenizer.ggml.model == "gpt2"``)."""
    path = _existing_file(path)
    fields = _gguf_tokenizer_fields(path)
    model = fields.get("tokenizer.ggml.model", "nothing (key missing)")
    if model != "gpt2":
        raise CheckpointError(
            f"{path}: tokenizer.ggml.model: expected 'gpt2' (byte-level BPE with merges), found {model!r}"
        )
    backend = _HFBackend(_gguf_bpe(fields, path))
    return _build(
        backend, path, fields.get("tokenizer.ggml.bos_token_id"), fields.get("tokenizer.ggml.eos_token_id"),
        bool(fields.get("tokenizer.ggml.add_bos_token", False)), fields.get("tokenizer.chat_template"),
    )


def _gguf_tokenizer_fields(path: Path) -> dict:
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, OSError) as e:
        raise CheckpointError(f"{path}: expected a GGUF file, could not read it: {e}") from e
    return {key: f.contents() for key, f in reader.fields.items() if key.startswith("tokenizer.")}


def _gguf_bpe(fields: dict, path: Path) -> tokenizers.Tokenizer:
    """A tokenizers BPE from the GGUF vocabulary; CONTROL tokens special, USER_DEFINED ones whole."""
    tokens, types, merges = _gguf_vocab(fields, path)
    pre = fields.get("tokenizer.ggml.pre", "default")
    try:  # llama.cpp and Meta's tiktoken take a pre-token found whole in the vocabulary as is for llama3
        bpe = models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=pre in _GGUF_LLAMA3_PRE)
    except Exception as e:  # tokenizers raises bare Exception, e.g. for a merge of unknown tokens
        raise CheckpointError(f"{path}: tokenizer.ggml.merges: expected merges of vocabulary tokens: {e}") from e
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = _gguf_pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    typed = list(zip(tokens, types, strict=True))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in typed if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in typed if ty == _USER_DEFINED])
    return tok


def _gguf_vocab(fields: dict, path: Path) -> tuple[list[str], list[int], list[tuple[str, str]]]:
    """Tokens, their types (all NORMAL if the file has none) and merges, checked."""
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if not fields.get(key):
            raise CheckpointError(f"{path}: {key}: expected a non-empty string array, found none")
    tokens = fields["tokenizer.ggml.tokens"]
    types = fields.get("tokenizer.ggml.token_type") or [int(gguf.TokenType.NORMAL)] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError(f"{path}: tokenizer.ggml.token_type: expected {len(tokens)} types, found {len(types)}")
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"]]
    bad = next((i for i, m in enumerate(merges) if len(m) != 2), None)
    if bad is not None:
        found = fields["tokenizer.ggml.merges"][bad]
        raise CheckpointError(f"{path}: tokenizer.ggml.merges[{bad}]: expected 'left right', found {found!r}")
    return tokens, types, merges


def _gguf_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """How text is split before BPE, per llama.cpp's ``tokenizer.ggml.pre`` (as the HF originals do)."""
    if pre in _GGUF_LLAMA3_PRE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre == "smollm":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre not in _GGUF_GPT2_PRE:
        _warn_unknown_pre(pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


@functools.cache
def _warn_unknown_pre(pre: str) -> None:
    logger.warning("GGUF tokenizer.ggml.pre %r is not known here; splitting text with GPT-2's regex", pre)


# ---------------------------------------------------------------------------------------- files, dispatch


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from a .gguf, tokenizer.model or tokenizer.json file, or a directory holding one of
    them or what ``Tokenizer.save`` wrote."""
    path = Path(path)
    if path.is_dir():
        if (path / META_NAME).is_file():
            return Tokenizer.load(path)
        path = _tokenizer_file_in(path)
    loaders = {".gguf": from_gguf, ".model": from_tiktoken_model, ".json": from_tokenizer_json}
    if path.suffix not in loaders:
        raise CheckpointError(f"{path}: expected a .gguf, tokenizer.model or tokenizer.json file, found {path.name!r}")
    return loaders[path.suffix](path)


def _tokenizer_file_in(directory: Path) -> Path:
    for name in ("tokenizer.json", "tokenizer.model"):
        if (directory / name).is_file():
            return directory / name
    ggufs = sorted(directory.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    found = sorted(p.name for p in directory.iterdir())
    raise CheckpointError(
        f"{directory}: expected {META_NAME}, tokenizer.json, tokenizer.model or one .gguf file, "
        f"found {found[:10]}{' ...' if len(found) > 10 else ''}"
    )


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        found = "a directory" if path.is_dir() else "no such file"
        raise CheckpointError(f"{path}: expected a tokenizer file, found {found}")
    return path


def _read_json(path: Path) -> dict:
    _existing_file(path)
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: expected JSON, could not parse it: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _read_meta(path: Path) -> dict:
    meta = _read_json(path)
    missing = {"format", "kind", "bos_id", "eos_ids", "add_bos", "chat_format", "default_system"} - meta.keys()
    if missing:
        raise CheckpointError(f"{path}: expected keys {sorted(missing)}, found only {sorted(meta)}")
    if meta["format"] != META_FORMAT or meta["kind"] not in _BACKENDS:
        raise CheckpointError(
            f"{path}: expected format {META_FORMAT} and kind in {sorted(_BACKENDS)}, "
            f"found format {meta['format']!r}, kind {meta['kind']!r}"
        )
    return meta
