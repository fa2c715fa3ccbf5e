"""Tokenizer: text <-> token ids, and chat prompts, built from the files a checkpoint ships with.

Three sources, one ``Tokenizer`` over one of two backends:
  - Meta Llama-3 ``tokenizer.model`` (tiktoken BPE ranks, Meta's split pattern and 256 special tokens)
    -> tiktoken backend (``from_tiktoken_model``).
  - Hugging Face ``tokenizer.json`` (its own normalizer and pre-tokenizer: Llama-3's, Qwen2's, tekken's, ...)
    + ``tokenizer_config.json`` for BOS/EOS, add_bos and the chat template (or ``chat_template.jinja`` and
    ``additional_chat_templates/tool_use.jinja`` beside it, which win as in transformers)
    -> ``tokenizers`` backend (``from_tokenizer_json``).
  - GGUF vocabulary metadata of a byte-level BPE (``tokenizer.ggml.model == "gpt2"``) -> a ``tokenizers``
    BPE rebuilt from ``tokenizer.ggml.tokens``/``merges``, normalized and split the way the HF original of
    ``tokenizer.ggml.pre`` does (``_GGUF_PRE``), its chat template from ``tokenizer.chat_template`` (and
    ``tokenizer.chat_template.tool_use``) (``from_gguf``).
``load_tokenizer`` picks one from a path. ``Tokenizer.save`` writes the backend's file (``tokenizer.json``
or ``tokenizer.model``) plus ``tokenizer_meta.json`` (ids, chat templates) into a directory (beside a packed
image's manifest); ``Tokenizer.load`` reads them back and encodes, decodes and renders chats identically.
Format 1 meta files (before chat templates) still load, with the hand-written format they named.

Chat prompts (``encode_chat``): the model's own template, "default" (or "tool_use" when tools are given and the
model has one), rendered as transformers' apply_chat_template renders it (model/chat.py); without a template,
a hand-written fallback (llama3 or chatml) chosen by the vocabulary's tokens. Special-token strings inside the
messages are encoded as plain text, so a message cannot inject ``<|eot_id|>``; other messages give exactly
transformers' ids.

Runs in the client process; owns nothing shared. Bad files raise ``CheckpointError`` naming the file and
what was expected and found.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import gguf
import jinja2
import tiktoken
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from model import chat
from model.errors import CheckpointError

logger = logging.getLogger(__name__)

META_NAME = "tokenizer_meta.json"
META_FORMAT = 2  # 2: chat templates (chat_templates, eos_id); 1 (a hand-written format only) still loads
_META_KEYS = {1: frozenset({"format", "kind", "bos_id", "eos_ids", "add_bos", "chat_format", "default_system"})}
_META_KEYS[2] = _META_KEYS[1] | {"chat_templates", "eos_id"}

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2 / Qwen2.5 / Qwen3's tokenizer.json: Llama-3's split with single digits.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Mistral's tekken (Mistral-Nemo, Mistral-Small 3): words split at case changes, single digits.
TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
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
_TEMPLATE_NAMES = ("default", "tool_use")  # the named templates kept (transformers picks tool_use for tools)
_CONTROL, _USER_DEFINED = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)


@dataclass(frozen=True)
class _Pre:
    """How the HF original of a GGUF ``tokenizer.ggml.pre`` normalizes and splits text before its BPE:
    ``pattern`` a Split regex before the byte-level step (None: GPT-2's regex in the byte-level step),
    ``digits`` every digit its own piece first, ``nfc`` NFC-normalized first, ``ignore_merges`` a piece found
    whole in the vocabulary taken as is (tiktoken's rule, as llama.cpp applies it to these)."""

    pattern: str | None = None
    digits: bool = False
    nfc: bool = False
    ignore_merges: bool = False
    add_bos: bool = False  # llama.cpp's default where the file has no tokenizer.ggml.add_bos_token


# llama.cpp's names (src/llama-vocab.cpp) for the families run here. Qwen2's tokenizer.json NFC-normalizes
# (llama.cpp does not): we follow the HF original, which the model was trained with.
_GGUF_PRE = {
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3"), _Pre(LLAMA3_PATTERN, ignore_merges=True, add_bos=True)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _Pre(QWEN2_PATTERN, nfc=True)),
    "tekken": _Pre(TEKKEN_PATTERN, ignore_merges=True, add_bos=True),
    "smollm": _Pre(digits=True),
    **dict.fromkeys(("gpt2", "gpt-2", "default"), _Pre()),
}


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

    def token(self, token_id: int) -> str | None:
        return self.special.id_to_token(token_id)

    @functools.cached_property
    def control_tokens(self) -> dict[str, int]:
        """The special added tokens (GGUF CONTROL ones): what ``encode(allow_special=False)`` reads as text."""
        return {t.content: i for i, t in self.special.get_added_tokens_decoder().items() if t.special}

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

    def token(self, token_id: int) -> str | None:
        return next((t for t, i in self.specials.items() if i == token_id), None)

    @property
    def control_tokens(self) -> dict[str, int]:
        return self.specials

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
    """Encode, decode and chat-format for one model. ``source`` is the file or directory it came from.

    ``chat_format``: "template" (``chat_templates`` holds the model's "default" and maybe its "tool_use"), a
    hand-written fallback "llama3" or "chatml" (model/chat.py), or None (no chat). ``eos_id``: the end token
    the template knows as ``eos_token`` (``eos_ids`` holds every token that ends generation)."""

    backend: _Backend = field(repr=False)
    bos_id: int | None
    eos_ids: frozenset[int]
    add_bos: bool
    chat_format: str | None
    default_system: str | None = None  # the chatml fallback's default system message (format 1 images)
    source: str = ""
    chat_templates: dict[str, str] = field(default_factory=dict, repr=False)
    eos_id: int | None = None

    def __post_init__(self) -> None:
        if self.chat_format not in (None, "template", *chat.FALLBACK_TEMPLATES):
            found = self.chat_format
            raise CheckpointError(f"{self.source}: chat_format: expected template, llama3, chatml or None, "
                                  f"found {found!r}")
        if (self.chat_format == "template") != ("default" in self.chat_templates):
            raise CheckpointError(f"{self.source}: chat_format {self.chat_format!r} with chat templates "
                                  f"{sorted(self.chat_templates)}: expected a 'default' one exactly with 'template'")
        if self.add_bos and self.bos_id is None:
            raise CheckpointError(f"{self.source}: add_bos is set but the tokenizer has no BOS token id")
        for name, template in self.chat_templates.items():
            try:
                chat.compile_template(template)
            except jinja2.TemplateSyntaxError as e:
                raise CheckpointError(f"{self.source}: chat template {name!r}: jinja2 cannot parse it: line "
                                      f"{e.lineno}: {e.message}") from None
        missing = [t for t in chat.FALLBACK_TOKENS.get(self.chat_format, ()) if self.backend.token_id(t) is None]
        if missing:
            raise CheckpointError(f"{self.source}: chat format {self.chat_format} needs the tokens {missing}, "
                                  "not in the vocabulary")

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

    def answer_text(self, ids: list[int]) -> str:
        """The text of generated ids as it is printed and served: the tokens that end generation left out."""
        return self.decode([i for i in ids if i not in self.eos_ids])

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
                    variables: dict | None = None) -> list[int]:
        """Ids of a conversation ``[{"role": ..., "content": ...}, ...]`` in this model's chat format, ending
        with the assistant's header if ``add_generation_prompt``. ``tools``: OpenAI-style tool definitions for
        the template (its "tool_use" one if it has one); ``variables``: more template variables (e.g. Qwen3's
        ``enable_thinking``). ``ValueError`` (one line) for malformed messages or what the template refuses."""
        messages, tools = chat.check_messages(messages), chat.check_tools(tools)
        template = self._template(messages, tools)
        tokens = {name: self.backend.token(i) for name, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id))
                  if i is not None}
        if self.chat_format in chat.FALLBACK_TEMPLATES:
            variables = {**(variables or {}), "default_system": self.default_system}
        pieces = chat.render(template, messages, self.backend.control_tokens, tools=tools,
                             add_generation_prompt=add_generation_prompt, variables=variables, tokens=tokens)
        ids: list[int] = []
        for i, (text, plain) in enumerate(pieces):
            ids += self._encode_piece(text, plain, first=i == 0)
        return ids

    def _template(self, messages: list[dict], tools: list[dict] | None) -> str:
        if self.chat_format == "template":
            return self.chat_templates["tool_use" if tools is not None and "tool_use" in self.chat_templates
                                       else "default"]
        if self.chat_format is None:
            raise CheckpointError(
                f"{self.source}: expected a chat format (a chat template, or the tokens of the llama3 or chatml "
                f"format: {' '.join(t for ts in chat.FALLBACK_TOKENS.values() for t in ts)}), found none"
            )
        if tools is not None:
            raise ValueError(f"tools: the tokenizer ships no chat template (the built-in {self.chat_format} format "
                             "is used), so it has no way to show tool definitions")
        bad = next((i for i, m in enumerate(messages) if not isinstance(m.get("content"), str)), None)
        if bad is not None:
            raise ValueError(f"chat message {bad}: the built-in {self.chat_format} format takes string contents, "
                             f"found {messages[bad]!r:.100}")
        return chat.FALLBACK_TEMPLATES[self.chat_format]

    def _encode_piece(self, text: str, plain: bool, first: bool) -> list[int]:
        """A piece of a rendered chat: template text with its control tokens, or (``plain``) a control token
        string from a message, as text. A piece after the first is encoded after a newline that is then taken
        off, so that a tokenizer that marks the start of its input (SentencePiece's prefix space) does not
        mark the middle of a chat; where the newline joins the piece's first token, the piece alone."""
        ids = self.backend.encode(text, not plain)
        if not first:
            newline = self.backend.encode("\n", False)
            joined = self.backend.encode("\n" + text, not plain)
            if joined[:len(newline)] == newline:
                ids = joined[len(newline):]
        control = self.backend.control_tokens.get(text) if plain else None
        if control is not None and control in ids:
            raise ValueError(f"chat message text {text!r}: this tokenizer turns it into its control token even "
                             "as plain text")
        return ids

    def save(self, directory: str | Path) -> list[str]:
        """Write the backend's file and ``tokenizer_meta.json`` into ``directory``; return their names."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": META_FORMAT, "kind": self.backend.kind, "bos_id": self.bos_id, "eos_id": self.eos_id,
            "eos_ids": sorted(self.eos_ids), "add_bos": self.add_bos, "chat_format": self.chat_format,
            "default_system": self.default_system, "chat_templates": self.chat_templates,
            **self.backend.save(directory),
        }
        (directory / META_NAME).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
        return [self.backend.file_name, META_NAME]

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Read a directory written by ``save`` (tokenizer format 1 or 2)."""
        directory = Path(directory)
        meta = _read_meta(directory / META_NAME)
        backend = _BACKENDS[meta["kind"]].load(directory, meta)
        return cls(
            backend, meta["bos_id"], frozenset(meta["eos_ids"]), meta["add_bos"], meta["chat_format"],
            meta["default_system"], str(directory), meta.get("chat_templates", {}), meta.get("eos_id"),
        )


def _build(backend: _Backend, source: Path, bos_id: int | None, eos_id: int | None, add_bos: bool,
           templates: dict[str, str]) -> Tokenizer:
    """A Tokenizer with every end token the vocabulary has, rendering the model's chat template if it ships
    one, else the fallback format whose tokens the vocabulary has."""
    eos_ids = {backend.token_id(t) for t in _END_TOKENS} | {eos_id}
    chat_format = "template" if templates else _fallback_format(backend)
    return Tokenizer(backend, bos_id, frozenset(eos_ids - {None}), add_bos, chat_format, None, str(source),
                     templates, eos_id)


def _fallback_format(backend: _Backend) -> str | None:
    """The hand-written format whose tokens the vocabulary has (all of them), if any."""
    return next((f for f, tokens in chat.FALLBACK_TOKENS.items()
                 if all(backend.token_id(t) is not None for t in tokens)), None)


def _named_templates(named: dict, where: str) -> dict[str, str]:
    """The kept templates ("default", "tool_use") of a model's named ones; refused without a "default" (as
    transformers refuses them: it would not know which to use)."""
    if named and "default" not in named:
        raise CheckpointError(f"{where}: expected a chat template named 'default' among the named templates, "
                              f"found {sorted(named)}")
    return {name: named[name] for name in _TEMPLATE_NAMES if name in named}


# ---------------------------------------------------------------------------------------------- sources


def from_tiktoken_model(path: str | Path) -> Tokenizer:
    """Meta Llama-3 ``tokenizer.model``: ranks, then Meta's 256 special tokens numbered after them."""
    path = _existing_file(path)
    ranks = _read_tiktoken_ranks(path)
    specials = {name: len(ranks) + i for i, name in enumerate(_llama3_special_names())}
    backend = _TiktokenBackend(ranks, specials, LLAMA3_PATTERN)
    return _build(backend, path, specials["<|begin_of_text|>"], specials["<|end_of_text|>"], True, {})


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
    return _build(backend, path, bos_id, eos_id, add_bos, _config_templates(config, config_file))


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


def _config_templates(config: dict, config_file: Path) -> dict[str, str]:
    """The chat templates of an HF tokenizer, as transformers finds them: ``chat_template.jinja`` (the default)
    and ``additional_chat_templates/NAME.jinja`` beside the config win over its ``chat_template``, a string
    (the default) or a list of ``{"name": ..., "template": ...}``."""
    directory = config_file.parent
    files = {"default": directory / "chat_template.jinja",
             **{p.stem: p for p in sorted((directory / "additional_chat_templates").glob("*.jinja"))}}
    named = {name: p.read_text(encoding="utf-8") for name, p in files.items() if p.is_file()}
    if named:
        return _named_templates(named, str(directory))
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return {} if template is None else {"default": template}
    ok = isinstance(template, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in template)
    if not ok:
        raise CheckpointError(f"{config_file}: chat_template: expected a string or a list of {{'name': str, "
                              f"'template': str}}, found {template!r:.100}")
    return _named_templates({t["name"]: t["template"] for t in template}, f"{config_file}: chat_template")


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
    # llama.cpp's converter writes the default template as tokenizer.chat_template, named ones beside it
    named = {name: fields.get("tokenizer.chat_template" + suffix)
             for name, suffix in (("default", ""), ("tool_use", ".tool_use"))}
    templates = _named_templates({k: v for k, v in named.items() if v is not None}, f"{path}: tokenizer.chat_template")
    pre = _gguf_pre(fields.get("tokenizer.ggml.pre", "default"))
    return _build(
        backend, path, fields.get("tokenizer.ggml.bos_token_id"), fields.get("tokenizer.ggml.eos_token_id"),
        bool(fields.get("tokenizer.ggml.add_bos_token", pre.add_bos)), templates,
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
    pre = _GGUF_PRE.get(fields.get("tokenizer.ggml.pre", "default"), _Pre())  # from_gguf warned for an unknown one
    try:
        bpe = models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=pre.ignore_merges)
    except Exception as e:  # tokenizers raises bare Exception, e.g. for a merge of unknown tokens
        raise CheckpointError(f"{path}: tokenizer.ggml.merges: expected merges of vocabulary tokens: {e}") from e
    tok = tokenizers.Tokenizer(bpe)
    if pre.nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer(pre)
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


def _gguf_pre(name: str) -> _Pre:
    """The split ``tokenizer.ggml.pre`` names; GPT-2's (with a warning, once) for a name not known here."""
    if name not in _GGUF_PRE:
        _warn_unknown_pre(name)
    return _GGUF_PRE.get(name, _Pre())


def _pre_tokenizer(pre: _Pre) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer as the HF originals write it: a Split on the family's regex, then bytes; or GPT-2's
    byte-level regex, after single digits for SmolLM."""
    if pre.pattern is not None:
        steps = [pre_tokenizers.Split(Regex(pre.pattern), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    else:
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if pre.digits:
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    return pre_tokenizers.Sequence(steps)


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
    if meta.get("format") not in _META_KEYS or meta.get("kind") not in _BACKENDS:
        raise CheckpointError(
            f"{path}: expected format in {sorted(_META_KEYS)} and kind in {sorted(_BACKENDS)}, "
            f"found format {meta.get('format')!r}, kind {meta.get('kind')!r}"
        )
    missing = _META_KEYS[meta["format"]] - meta.keys()
    if missing:
        raise CheckpointError(f"{path}: expected keys {sorted(missing)}, found only {sorted(meta)}")
    return meta
