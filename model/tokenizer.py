"""Tokenizer: text <-> token ids, and chat prompts, built from the files a checkpoint ships with.

Four sources, one ``Tokenizer`` over one of three backends:
  - Meta Llama-3 ``tokenizer.model`` (tiktoken BPE ranks, Meta's split pattern and 256 special tokens)
    -> tiktoken backend (``from_tiktoken_model``).
  - SentencePiece BPE ``tokenizer.model`` (Llama 2, Mistral 7B v0.1-v0.3: a protobuf, read here) with the
    ``tokenizer_config.json`` beside it if any -> sentencepiece backend (``from_sentencepiece_model``).
  - Hugging Face ``tokenizer.json`` (its own normalizer and pre-tokenizer: Llama-3's, Qwen2's, tekken's, ...)
    + ``tokenizer_config.json`` for BOS/EOS, add_bos and the chat template (or ``chat_template.jinja`` and
    ``additional_chat_templates/tool_use.jinja`` beside it, which win as in transformers)
    -> ``tokenizers`` backend (``from_tokenizer_json``).
  - GGUF vocabulary metadata of a byte-level BPE (``tokenizer.ggml.model == "gpt2"``) -> a ``tokenizers``
    BPE rebuilt from ``tokenizer.ggml.tokens``/``merges``, normalized and split the way the HF original of
    ``tokenizer.ggml.pre`` does (``_GGUF_PRE``), its chat template from ``tokenizer.chat_template`` (and
    ``tokenizer.chat_template.tool_use``) (``from_gguf``).
  - GGUF vocabulary metadata of a SentencePiece BPE (``tokenizer.ggml.model == "llama"``, as llama.cpp converts
    Llama 2 and Mistral 7B) -> the sentencepiece backend rebuilt from its tokens, scores and types (``from_gguf``).
The sentencepiece backend is a ``tokenizers`` BPE built the way transformers builds these (its LlamaTokenizer):
merges ranked by the scores of the pieces they make, "▁" for spaces (Metaspace), bytes (``<0xNN>``) for
characters outside the vocabulary; it encodes plain text as SentencePiece itself does (``_SentencePieceBackend``).
``load_tokenizer`` picks one from a path. ``Tokenizer.save`` writes the backend's file (``tokenizer.json``
or ``tokenizer.model``) plus ``tokenizer_meta.json`` (ids, add_bos/add_eos, chat templates) into a directory
(beside a packed image's manifest); ``Tokenizer.load`` reads them back and encodes, decodes and renders chats
identically. Format 1 meta files (before chat templates) still load, with the hand-written format they named;
format 2 ones (before add_eos) without adding EOS.

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
import struct
from collections.abc import Iterator
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
META_FORMAT = 3  # 3: add_eos; 2: chat templates (chat_templates, eos_id); 1 (a hand-written format only)
_META_KEYS = {1: frozenset({"format", "kind", "bos_id", "eos_ids", "add_bos", "chat_format", "default_system"})}
_META_KEYS[2] = _META_KEYS[1] | {"chat_templates", "eos_id"}
_META_KEYS[3] = _META_KEYS[2] | {"add_eos"}

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
# GGUF token types; SentencePiece's ModelProto numbers its piece types the same way.
_NORMAL, _UNKNOWN, _CONTROL = int(gguf.TokenType.NORMAL), int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.CONTROL)
_USER_DEFINED, _UNUSED = int(gguf.TokenType.USER_DEFINED), int(gguf.TokenType.UNUSED)
SPIECE_SPACE = "\u2581"  # "▁": SentencePiece's spelling of a space


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


@dataclass(frozen=True, eq=False)
class _SentencePieceBackend(_HFBackend):
    """A SentencePiece BPE as a ``tokenizers`` BPE (``_sentencepiece_bpe``), saved as its tokenizer.json.

    SentencePiece marks the start of its input with a "▁" also where the input starts with a space or with a
    user-defined piece (and so does llama.cpp for a space); tokenizers' Metaspace adds none there, so
    transformers encodes "  a" as "▁▁a" where the model was trained on "▁▁▁a". ``encode`` adds that "▁" itself.
    After a special token (a chat template's ``[INST] hi``) no "▁" is added, as in transformers and Mistral's
    own tokenizer (mistral-common)."""

    kind: ClassVar[str] = "sentencepiece"

    @functools.cached_property
    def _unmarked_starts(self) -> tuple[str, ...]:
        """The starts of a text to which Metaspace adds no "▁" (none if it never adds one)."""
        pre = self.special.pre_tokenizer
        if not isinstance(pre, pre_tokenizers.Metaspace) or pre.prepend_scheme == "never":
            return ()
        user_defined = [t.content for t in self.special.get_added_tokens_decoder().values() if not t.special]
        return (" ", SPIECE_SPACE, *user_defined)

    def encode(self, text: str, allow_special: bool) -> list[int]:
        if text.startswith(self._unmarked_starts):
            text = SPIECE_SPACE + text
        return super().encode(text, allow_special)


_Backend = _HFBackend | _TiktokenBackend
_BACKENDS = {b.kind: b for b in (_HFBackend, _TiktokenBackend, _SentencePieceBackend)}


# --------------------------------------------------------------------------------------------- Tokenizer


@dataclass(frozen=True, eq=False)
class Tokenizer:
    """Encode, decode and chat-format for one model. ``source`` is the file or directory it came from.

    ``chat_format``: "template" (``chat_templates`` holds the model's "default" and maybe its "tool_use"), a
    hand-written fallback "llama3" or "chatml" (model/chat.py), or None (no chat). ``eos_id``: the end token
    the template knows as ``eos_token`` (``eos_ids`` holds every token that ends generation); ``add_eos``: it
    ends every encoded text (a chat's ids are the template's alone)."""

    backend: _Backend = field(repr=False)
    bos_id: int | None
    eos_ids: frozenset[int]
    add_bos: bool
    chat_format: str | None
    default_system: str | None = None  # the chatml fallback's default system message (format 1 images)
    source: str = ""
    chat_templates: dict[str, str] = field(default_factory=dict, repr=False)
    eos_id: int | None = None
    add_eos: bool = False

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
        if self.add_eos and self.eos_id is None:
            raise CheckpointError(f"{self.source}: add_eos is set but the tokenizer has no EOS token id")
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

    def encode(self, text: str, bos: bool | None = None, allow_special: bool = False,
               eos: bool | None = None) -> list[int]:
        """Token ids of ``text``; BOS first if ``bos`` (default ``add_bos``), EOS last if ``eos`` (default
        ``add_eos``). Special-token strings are plain text unless ``allow_special``."""
        ids = self.backend.encode(text, allow_special)
        if self.add_bos if bos is None else bos:
            if self.bos_id is None:
                raise CheckpointError(f"{self.source}: BOS requested, but the tokenizer has no BOS token")
            ids = [self.bos_id, *ids]
        if self.add_eos if eos is None else eos:
            if self.eos_id is None:
                raise CheckpointError(f"{self.source}: EOS requested, but the tokenizer has no EOS token")
            ids = [*ids, self.eos_id]
        return ids

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
            "eos_ids": sorted(self.eos_ids), "add_bos": self.add_bos, "add_eos": self.add_eos,
            "chat_format": self.chat_format,
            "default_system": self.default_system, "chat_templates": self.chat_templates,
            **self.backend.save(directory),
        }
        (directory / META_NAME).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
        return [self.backend.file_name, META_NAME]

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Read a directory written by ``save`` (tokenizer format 1, 2 or 3)."""
        directory = Path(directory)
        meta = _read_meta(directory / META_NAME)
        backend = _BACKENDS[meta["kind"]].load(directory, meta)
        return cls(
            backend, meta["bos_id"], frozenset(meta["eos_ids"]), meta["add_bos"], meta["chat_format"],
            meta["default_system"], str(directory), meta.get("chat_templates", {}), meta.get("eos_id"),
            meta.get("add_eos", False),
        )


def _build(backend: _Backend, source: Path, bos_id: int | None, eos_id: int | None, add_bos: bool,
           templates: dict[str, str], add_eos: bool = False) -> Tokenizer:
    """A Tokenizer with every end token the vocabulary has, rendering the model's chat template if it ships
    one, else the fallback format whose tokens the vocabulary has."""
    eos_ids = {backend.token_id(t) for t in _END_TOKENS} | {eos_id}
    chat_format = "template" if templates else _fallback_format(backend)
    return Tokenizer(backend, bos_id, frozenset(eos_ids - {None}), add_bos, chat_format, None, str(source),
                     templates, eos_id, add_eos)


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
            f"{path}: line {n}: expected '<base64 token> <rank>' (tiktoken BPE), found {line[:80]!r}"
        ) from None


def from_tokenizer_json(path: str | Path, config_path: str | Path | None = None) -> Tokenizer:
    """HF ``tokenizer.json``; BOS/EOS, add_bos, add_eos and the chat template from ``tokenizer_config.json``
    (``config_path``, else the one beside it if present). Without ``add_bos_token`` (``add_eos_token``) in the
    config, BOS (EOS) is added when the file's post-processor adds it."""
    path = _existing_file(path)
    config, config_file = _tokenizer_config(path, config_path)
    backend = _HFBackend(_read_tokenizer_json(path))
    bos_id = _config_token_id(config, "bos_token", backend, config_file)
    eos_id = _config_token_id(config, "eos_token", backend, config_file)
    post = backend.special.encode("").ids
    post_bos = bos_id is not None and post[:1] == [bos_id]
    post_eos = eos_id is not None and len(post) > post_bos and post[-1] == eos_id
    add_bos, add_eos = bool(config.get("add_bos_token", post_bos)), bool(config.get("add_eos_token", post_eos))
    return _build(backend, path, bos_id, eos_id, add_bos, _config_templates(config, config_file), add_eos)


def _tokenizer_config(path: Path, config_path: str | Path | None) -> tuple[dict, Path]:
    """``tokenizer_config.json``: ``config_path``, else the one beside ``path`` if there is one (else {})."""
    config_file = Path(config_path) if config_path is not None else path.with_name("tokenizer_config.json")
    return _read_json(config_file) if config_path is not None or config_file.is_file() else {}, config_file


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
    """The vocabulary of a GGUF file: a byte-level BPE (``tokenizer.ggml.model == "gpt2"``) or a SentencePiece
    BPE (``"llama"``). Without ``tokenizer.ggml.add_bos_token``, BOS is added where llama.cpp adds it; a
    SentencePiece vocabulary without BOS/EOS ids has llama.cpp's (1 and 2)."""
    path = _existing_file(path)
    fields = _gguf_tokenizer_fields(path)
    model = fields.get("tokenizer.ggml.model", "nothing (key missing)")
    if model == "gpt2":
        pre = _gguf_pre(fields.get("tokenizer.ggml.pre", "default"))
        backend, (add_bos, bos_id, eos_id) = _HFBackend(_gguf_bpe(fields, path)), (pre.add_bos, None, None)
    elif model == "llama":
        backend, (add_bos, bos_id, eos_id) = _gguf_sentencepiece(fields, path), (True, 1, 2)
    else:
        raise CheckpointError(f"{path}: tokenizer.ggml.model: expected 'gpt2' (byte-level BPE with merges) or "
                              f"'llama' (SentencePiece BPE with scores), found {model!r}")
    # llama.cpp's converter writes the default template as tokenizer.chat_template, named ones beside it
    named = {name: fields.get("tokenizer.chat_template" + suffix)
             for name, suffix in (("default", ""), ("tool_use", ".tool_use"))}
    templates = _named_templates({k: v for k, v in named.items() if v is not None}, f"{path}: tokenizer.chat_template")
    bos_id, eos_id = (_gguf_token_id(fields, key, default, backend, path)
                      for key, default in (("bos_token_id", bos_id), ("eos_token_id", eos_id)))
    return _build(backend, path, bos_id, eos_id, bool(fields.get("tokenizer.ggml.add_bos_token", add_bos)),
                  templates, bool(fields.get("tokenizer.ggml.add_eos_token", False)))


def _gguf_token_id(fields: dict, key: str, default: int | None, backend: _Backend, path: Path) -> int | None:
    """``tokenizer.ggml.KEY``, checked against the vocabulary; else ``default`` where it names a token."""
    token_id = fields.get(f"tokenizer.ggml.{key}")
    if token_id is None:
        return default if default is not None and backend.token(default) is not None else None
    if backend.token(token_id) is None:
        raise CheckpointError(f"{path}: tokenizer.ggml.{key}: expected a token id 0..{backend.vocab_size - 1}, "
                              f"found {token_id}")
    return token_id


def _gguf_tokenizer_fields(path: Path) -> dict:
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, OSError) as e:
        raise CheckpointError(f"{path}: expected a GGUF file, could not read it: {e}") from e
    return {key: f.contents() for key, f in reader.fields.items() if key.startswith("tokenizer.")}


def _gguf_bpe(fields: dict, path: Path) -> tokenizers.Tokenizer:
    """A tokenizers BPE from the GGUF vocabulary; CONTROL tokens special, USER_DEFINED ones whole."""
    tokens, types = _gguf_tokens(fields, path)
    merges = _gguf_merges(fields, path)
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


def _gguf_tokens(fields: dict, path: Path) -> tuple[list[str], list[int]]:
    """Tokens and their types (all NORMAL if the file has none), checked."""
    if not fields.get("tokenizer.ggml.tokens"):
        raise CheckpointError(f"{path}: tokenizer.ggml.tokens: expected a non-empty string array, found none")
    tokens = fields["tokenizer.ggml.tokens"]
    types = fields.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError(f"{path}: tokenizer.ggml.token_type: expected {len(tokens)} types, found {len(types)}")
    return tokens, [int(t) for t in types]


def _gguf_merges(fields: dict, path: Path) -> list[tuple[str, str]]:
    if not fields.get("tokenizer.ggml.merges"):
        raise CheckpointError(f"{path}: tokenizer.ggml.merges: expected a non-empty string array, found none")
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"]]
    bad = next((i for i, m in enumerate(merges) if len(m) != 2), None)
    if bad is not None:
        found = fields["tokenizer.ggml.merges"][bad]
        raise CheckpointError(f"{path}: tokenizer.ggml.merges[{bad}]: expected 'left right', found {found!r}")
    return merges


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


# ------------------------------------------------------------------------------------------- SentencePiece


def _sentencepiece_bpe(pieces: list[str], scores: list[float], types: list[int], unk_id: int | None,
                       prefix: str, where: str, merges: list[tuple[str, str]] | None = None) -> _SentencePieceBackend:
    """A SentencePiece BPE vocabulary as a tokenizers BPE, as transformers builds it (LlamaTokenizer): merges
    from the scores (or ``merges``), bytes (``<0xNN>``) for characters outside the vocabulary, else ``<unk>``;
    spaces as "▁" (Metaspace; ``prefix`` its prepend_scheme: "first" a "▁" at the start, "always" also after
    each special token, transformers' legacy, "never" none) and back; CONTROL and UNKNOWN pieces special,
    USER_DEFINED ones matched whole (as llama.cpp and transformers read these types)."""
    vocab = {}
    for i, piece in enumerate(pieces):
        if vocab.setdefault(piece, i) != i:
            raise CheckpointError(f"{where}: expected distinct pieces, found {piece!r} at ids {vocab[piece]} and {i}")
    unk = None if unk_id is None else pieces[unk_id]
    merges = _merges_by_score(pieces, scores, types, vocab) if merges is None else merges
    try:
        bpe = models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    except Exception as e:  # tokenizers raises bare Exception, e.g. for a merge of unknown tokens
        raise CheckpointError(f"{where}: expected merges of vocabulary pieces: {e}") from e
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE_SPACE, prepend_scheme=prefix, split=False)
    steps = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix != "never" else []))
    typed = list(zip(pieces, types, strict=True))
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False)
                            for p, t in typed if t in (_CONTROL, _UNKNOWN)])
    tok.add_tokens([AddedToken(p, special=False, normalized=False) for p, t in typed if t == _USER_DEFINED])
    return _SentencePieceBackend(tok)


def _merges_by_score(pieces: list[str], scores: list[float], types: list[int], vocab: dict[str, int]
                     ) -> list[tuple[str, str]]:
    """The merges of a SentencePiece BPE. SentencePiece joins the adjacent pair whose joined piece scores
    highest (a normal, user-defined or unused piece: never a control, unknown or byte one), so each split of
    such a piece into two pieces is a merge, ranked by the piece's score; ties as transformers orders them
    (longer left part first, then by id)."""
    ranked = []
    for i, (piece, score, kind) in enumerate(zip(pieces, scores, types, strict=True)):
        if kind not in (_NORMAL, _USER_DEFINED, _UNUSED):
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                ranked.append((-score, -k, k - len(piece), i, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _gguf_sentencepiece(fields: dict, path: Path) -> _SentencePieceBackend:
    """The SentencePiece BPE of a GGUF's tokens, scores and types (llama.cpp's converter writes the model's
    pieces in id order, unused ``[PADn]`` ones up to the config's vocab_size); merges from the scores, or
    ``tokenizer.ggml.merges`` where the file has them (as transformers reads it); no "▁" at the start where
    ``tokenizer.ggml.add_space_prefix`` is false. Scores that are all one value give no merge order (llama.cpp's
    converter writes -1000 for every piece of a vocabulary it took from a tokenizer.json): warned."""
    tokens, types = _gguf_tokens(fields, path)
    scores = fields.get("tokenizer.ggml.scores") or []
    if len(scores) != len(tokens):
        raise CheckpointError(f"{path}: tokenizer.ggml.scores: expected {len(tokens)} scores (one a token), "
                              f"found {len(scores)}")
    unk_id = fields.get("tokenizer.ggml.unknown_token_id", next((i for i, t in enumerate(types) if t == _UNKNOWN),
                                                                 None))
    if unk_id is not None and not 0 <= unk_id < len(tokens):
        raise CheckpointError(f"{path}: tokenizer.ggml.unknown_token_id: expected 0..{len(tokens) - 1}, "
                              f"found {unk_id}")
    prefix = "first" if fields.get("tokenizer.ggml.add_space_prefix", True) else "never"
    merges = _gguf_merges(fields, path) if "tokenizer.ggml.merges" in fields else None
    if merges is None and len({s for s, t in zip(scores, types) if t == _NORMAL}) == 1:
        logger.warning("%s: tokenizer.ggml.scores: every normal piece scores %s and the file has no merges; "
                       "merging the longest pieces first, which may not be how the model was trained", path,
                       next(s for s, t in zip(scores, types) if t == _NORMAL))
    return _sentencepiece_bpe(tokens, [float(s) for s in scores], types, unk_id, prefix,
                              f"{path}: tokenizer.ggml.tokens", merges)


@dataclass(frozen=True)
class _SentencePieceModel:
    """What a SentencePiece ``tokenizer.model`` (a serialized ``sentencepiece.ModelProto``) says that encoding
    needs; the field numbers and defaults of sentencepiece_model.proto."""

    pieces: list[str]
    scores: list[float]
    types: list[int]
    trainer: dict[int, int | bytes]  # TrainerSpec: 3 model_type, 24 treat_whitespace_as_suffix, 40-42 unk/bos/eos id
    normalizer: dict[int, int | bytes]  # NormalizerSpec: 1 name, 2 precompiled_charsmap, 3 add_dummy_prefix, ...

    def piece_id(self, field: int, default: int) -> int | None:
        """A TrainerSpec id (int32, -1 for none) if it names a piece."""
        value = _int32(self.trainer.get(field, default))
        return value if 0 <= value < len(self.pieces) else None


def from_sentencepiece_model(path: str | Path, config_path: str | Path | None = None) -> Tokenizer:
    """A SentencePiece BPE ``tokenizer.model`` (Llama 2's, Mistral 7B's), read here from its protobuf, with
    ``tokenizer_config.json`` as from_tokenizer_json reads it (``config_path``, else the one beside it if any):
    BOS/EOS (else the model's), add_bos (default: true with a BOS, as transformers and llama.cpp), add_eos, the chat
    template, ``added_tokens_decoder`` (special ones CONTROL, others USER_DEFINED), ``legacy`` and
    ``add_prefix_space`` (where the "▁" prefix goes, as transformers' LlamaTokenizer reads them). Models that
    encode otherwise than that BPE (unigram, a normalization rule, whitespace handling) are refused."""
    path = _existing_file(path)
    model = _read_sentencepiece(path)
    _check_sentencepiece(model, path)
    config, config_file = _tokenizer_config(path, config_path)
    pieces, scores, types = _with_added_tokens(model, config.get("added_tokens_decoder") or {}, config_file)
    add_prefix = _proto_bool(model.normalizer, 3, True) and config.get("add_prefix_space") is not False
    prefix = ("always" if config.get("legacy") is True else "first") if add_prefix else "never"
    backend = _sentencepiece_bpe(pieces, scores, types, model.piece_id(40, 0), prefix, str(path))
    bos_id, eos_id = model.piece_id(41, 1), model.piece_id(42, 2)
    if "bos_token" in config:
        bos_id = _config_token_id(config, "bos_token", backend, config_file)
    if "eos_token" in config:
        eos_id = _config_token_id(config, "eos_token", backend, config_file)
    add_bos = bool(config.get("add_bos_token", bos_id is not None))
    return _build(backend, path, bos_id, eos_id, add_bos, _config_templates(config, config_file),
                  bool(config.get("add_eos_token", False)))


def _check_sentencepiece(model: _SentencePieceModel, path: Path) -> None:
    """Refuse what ``_sentencepiece_bpe`` would encode otherwise than SentencePiece: another model type, a
    normalization rule other than identity (Llama 2's and Mistral's), whitespace removal or suffix marks."""
    model_type = model.trainer.get(3, 1)
    if model_type != 2:
        name = {1: "unigram", 3: "word", 4: "char"}.get(model_type, str(model_type))
        raise CheckpointError(f"{path}: trainer_spec.model_type: expected BPE (2), found {name}; only SentencePiece "
                              "BPE models are supported")
    name = _proto_text(model.normalizer, 1, path, b"")
    if model.normalizer.get(2) or name not in ("", "identity"):
        raise CheckpointError(f"{path}: normalizer_spec: expected the identity normalization (no precompiled rule), "
                              f"found {name!r}")
    for number, field_name, supported in ((4, "remove_extra_whitespaces", False), (5, "escape_whitespaces", True)):
        if _proto_bool(model.normalizer, number, True) != supported:
            raise CheckpointError(f"{path}: normalizer_spec.{field_name}: expected {str(supported).lower()}, "
                                  f"found {str(not supported).lower()}")
    if _proto_bool(model.trainer, 24, False):
        raise CheckpointError(f"{path}: trainer_spec.treat_whitespace_as_suffix: expected false, found true")


def _with_added_tokens(model: _SentencePieceModel, added: dict, config_file: Path
                       ) -> tuple[list[str], list[float], list[int]]:
    """The model's pieces with tokenizer_config.json's ``added_tokens_decoder`` ({id: {"content", "special"}}):
    a piece of the model marked CONTROL (special) or USER_DEFINED, a new id after the model's a new token."""
    pieces, scores, types = list(model.pieces), list(model.scores), list(model.types)
    for key, entry in sorted(added.items(), key=lambda item: int(item[0]) if str(item[0]).isdigit() else -1):
        where = f"{config_file}: added_tokens_decoder[{key!r}]"
        if not str(key).isdigit() or not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise CheckpointError(f"{where}: expected an id and {{'content': str, 'special': bool}}, "
                                  f"found {entry!r:.80}")
        i, content = int(key), entry["content"]
        if i > len(pieces):
            raise CheckpointError(f"{where}: expected an id up to {len(pieces)} (the model has {len(model.pieces)} "
                                  f"pieces, the ids after them in order), found {i}")
        if i == len(pieces):
            pieces, scores, types = [*pieces, content], [*scores, 0.0], [*types, _NORMAL]
        elif pieces[i] != content:
            raise CheckpointError(f"{where}: expected the model's piece {pieces[i]!r}, found {content!r}")
        types[i] = _CONTROL if entry.get("special") else _USER_DEFINED
    return pieces, scores, types


def _read_sentencepiece(path: Path) -> _SentencePieceModel:
    """The pieces (text, score, type), TrainerSpec and NormalizerSpec of a ModelProto."""
    pieces, scores, types, specs = [], [], [], {2: {}, 3: {}}
    for number, value in _proto_fields(path.read_bytes(), path):
        if number == 1:
            piece = dict(_proto_fields(_proto(value, bytes, path, "a piece"), path))
            pieces.append(_proto_text(piece, 1, path))
            scores.append(struct.unpack("<f", _proto(piece.get(2, bytes(4)), bytes, path, "a piece's score"))[0])
            types.append(_proto(piece.get(3, _NORMAL), int, path, "a piece's type"))
        elif number in specs:
            specs[number] = dict(_proto_fields(_proto(value, bytes, path, "a trainer or normalizer spec"), path))
    if not pieces:
        raise CheckpointError(f"{path}: expected a SentencePiece model with pieces, found none")
    used = {2: {3: int, 24: int, 40: int, 41: int, 42: int}, 3: {1: bytes, 2: bytes, 3: int, 4: int, 5: int}}
    for spec, kinds in used.items():  # the fields read later, of the wire types they have
        for number in kinds.keys() & specs[spec].keys():
            _proto(specs[spec][number], kinds[number], path, f"spec {spec} field {number}")
    return _SentencePieceModel(pieces, scores, types, specs[2], specs[3])


def _proto_fields(data: bytes, path: Path) -> Iterator[tuple[int, int | bytes]]:
    """The (field number, value) pairs of a protobuf message: varints as ints, the other wire types as bytes."""
    at = 0
    while at < len(data):
        key, at = _varint(data, at, path)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(data, at, path)
        elif wire in (1, 2, 5):
            size, at = _varint(data, at, path) if wire == 2 else ({1: 8, 5: 4}[wire], at)
            value, at = data[at:at + size], at + size
            if at > len(data):
                raise CheckpointError(f"{path}: expected a SentencePiece model (protobuf), found one cut short")
        else:
            raise CheckpointError(f"{path}: expected a SentencePiece model (protobuf), found wire type {wire} "
                                  f"(field {number})")
        yield number, value


def _varint(data: bytes, at: int, path: Path) -> tuple[int, int]:
    value = shift = 0
    while at < len(data) and shift < 64:
        byte = data[at]
        value, shift, at = value | (byte & 0x7F) << shift, shift + 7, at + 1
        if byte < 0x80:
            return value, at
    raise CheckpointError(f"{path}: expected a SentencePiece model (protobuf), found a varint cut short or overlong")


def _int32(value: int) -> int:
    """A protobuf int32 from its varint (negative ones are 64-bit two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _proto(value: int | bytes, kind: type, path: Path, what: str) -> int | bytes:
    """``value`` if it has the wire type of ``what`` (a float: 4 bytes)."""
    if not isinstance(value, kind) or what.endswith("score") and len(value) != 4:
        raise CheckpointError(f"{path}: expected a SentencePiece model (protobuf), found {what} of another wire "
                              f"type: {value!r:.40}")
    return value


def _proto_text(message: dict, number: int, path: Path, default: bytes | None = None) -> str:
    value = message.get(number, default)
    try:
        return _proto(value, bytes, path, f"text field {number}").decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: expected a SentencePiece model (protobuf), found text field {number} not "
                              f"UTF-8: {value!r:.40}") from None


def _proto_bool(message: dict, number: int, default: bool) -> bool:
    return bool(message.get(number, default))


# ---------------------------------------------------------------------------------------- files, dispatch


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from a .gguf, tokenizer.model or tokenizer.json file, or a directory holding one of
    them or what ``Tokenizer.save`` wrote."""
    path = Path(path)
    if path.is_dir():
        if (path / META_NAME).is_file():
            return Tokenizer.load(path)
        path = _tokenizer_file_in(path)
    loaders = {".gguf": from_gguf, ".model": from_tokenizer_model, ".json": from_tokenizer_json}
    if path.suffix not in loaders:
        raise CheckpointError(f"{path}: expected a .gguf, tokenizer.model or tokenizer.json file, found {path.name!r}")
    return loaders[path.suffix](path)


def from_tokenizer_model(path: str | Path) -> Tokenizer:
    """A ``tokenizer.model``: SentencePiece (a protobuf ModelProto, which starts with its first piece: byte
    0x0a, field 1 of wire type 2) or Meta's tiktoken ranks (lines of base64 text)."""
    path = _existing_file(path)
    with path.open("rb") as f:
        sentencepiece = f.read(1) == b"\n"
    return from_sentencepiece_model(path) if sentencepiece else from_tiktoken_model(path)


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
