"""SentencePiece BPE vocabularies (model/tokenizer.py): Llama 2's and Mistral 7B's ``tokenizer.model``, and the
``llama`` GGUF vocabulary llama.cpp's converter makes of it, against SentencePiece itself and transformers.

A tiny SentencePiece BPE is trained with the sentencepiece package the way Llama 2's and Mistral 7B's were (byte
fallback, single digits, no normalization, whitespace kept; Mistral v0.3's control tokens), and written as an HF
directory (tokenizer.model + Mistral v0.3's tokenizer_config.json) and as a GGUF (tokens, scores and types as
convert_hf_to_gguf.py's _set_vocab_sentencepiece writes them; tests/tok_writers.py). On varied text (leading
spaces and whitespace runs, digits, CJK, emoji through byte fallback, typed control strings):

  - both encode to SentencePiece's own ids and decode back to SentencePiece's text;
  - the GGUF's encode like transformers' GGUF tokenizer (special strings matched and as text) and decode like
    it, except where a text starts with a space: there transformers' Metaspace leaves out SentencePiece's "▁"
    prefix, and we keep SentencePiece's (the ids the model was trained on; llama.cpp does the same);
  - save()/load() round trips; add_space_prefix, add_eos, a legacy tokenizer_config.json, a model without byte
    fallback; bad files refused with one line naming the file.
Chat templates over this vocabulary (Mistral-7B-Instruct-v0.3's): tests/test_chat.py; packing and running a
Mistral-shaped checkpoint with it: tests/test_architectures.py.

Needs sentencepiece (skipped without it) and transformers with protobuf for the HF references.
Run: python -m pytest -q tests/test_sentencepiece.py
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import tok_writers

from model.errors import CheckpointError
from model.tokenizer import META_NAME, Tokenizer, from_gguf, from_sentencepiece_model, load_tokenizer

sentencepiece = pytest.importorskip("sentencepiece")

# "▁" typed in a text is a space to SentencePiece: it decodes as one.
TEXTS = [*tok_writers.SAMPLES, "   three leading spaces", "\u2581already marked", "x\u2581y", "\n\nnewlines first",
         " \t mixed whitespace \t ", "emoji 🙂👍🏽 🦜 𝄞 and 12345 digits", "日本語 中文 한국어",
         "[INST] hi [/INST]</s><s>", "<unk> and <0x41> typed"]


class Files:
    """The trained model, SentencePiece's processor of it, and our tokenizers of its HF directory and GGUF."""

    def __init__(self, root: Path) -> None:
        self.proto = tok_writers.train_sentencepiece()
        self.sp = sentencepiece.SentencePieceProcessor(model_proto=self.proto)
        self.config = tok_writers.mistral_config(self.proto)
        self.hf_dir = tok_writers.write_sentencepiece_hf_dir(root / "hf", self.proto, self.config)
        self.gguf = tok_writers.write_sentencepiece_gguf(root / "m.gguf", self.proto, self.config)
        self.from_dir, self.from_gguf = load_tokenizer(self.hf_dir), load_tokenizer(self.gguf)

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.sp.id_to_piece(i) for i in ids]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    return Files(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def hf_gguf(files: Files):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(files.gguf.parent), gguf_file=files.gguf.name)


def test_encode_decode_match_sentencepiece(files: Files) -> None:
    sp = files.sp
    for ours in (files.from_dir, files.from_gguf):
        for text in TEXTS:
            ids = ours.encode(text, bos=False)
            assert ids == sp.encode(text), (text, files.pieces(ids), files.pieces(sp.encode(text)))
            assert ours.decode(ids) == sp.decode(ids) == text.replace("\u2581", " ")
            assert ours.encode(text) == [sp.bos_id(), *ids]
    assert "".join(files.pieces(files.from_gguf.encode("  a", bos=False))) == "\u2581" * 3 + "a"  # prefix, 2 spaces
    emoji = files.from_gguf.encode("🦜", bos=False)
    assert len(emoji) == 5 and all(sp.is_byte(i) for i in emoji[1:])  # "▁", then the four bytes of U+1F99C


def test_metadata(files: Files, hf_gguf) -> None:
    for ours in (files.from_dir, files.from_gguf):
        assert (ours.bos_id, ours.eos_id, ours.eos_ids) == (1, 2, {2}) == (hf_gguf.bos_token_id, hf_gguf.eos_token_id,
                                                                           {hf_gguf.eos_token_id})
        assert (ours.add_bos, ours.add_eos, ours.vocab_size) == (True, False, files.sp.get_piece_size())
        assert ours.chat_format is None  # no template in this config (tests/test_chat.py renders Mistral's)
    assert files.from_gguf.vocabulary_digest() == files.from_dir.vocabulary_digest()
    assert len(hf_gguf) == files.sp.get_piece_size()


def test_gguf_matches_transformers(files: Files, hf_gguf) -> None:
    """Our GGUF tokenizer against transformers' GGUF loader, except for texts that start with a space."""
    ours = files.from_gguf
    compared = 0
    for text in TEXTS:
        if not text.startswith((" ", "\u2581")):
            compared += 1
            assert ours.encode(text, bos=False) == hf_gguf.encode(text, add_special_tokens=False,
                                                                  split_special_tokens=True), text
            assert ours.encode(text, bos=False, allow_special=True) == hf_gguf.encode(text, add_special_tokens=False)
            assert ours.encode(text) == hf_gguf.encode(text, split_special_tokens=True)
        ids = ours.encode(text, allow_special=True)
        assert ours.decode(ids) == hf_gguf.decode(ids)
        assert ours.decode(ids, skip_special=True) == hf_gguf.decode(ids, skip_special_tokens=True)
    assert compared > 25


def test_control_strings_are_text_unless_allowed(files: Files) -> None:
    ours, inst = files.from_gguf, files.sp.piece_to_id("[INST]")
    assert ours.encode("[INST]", bos=False, allow_special=True) == [inst]
    assert inst not in ours.encode("[INST]", bos=False)
    ids = ours.encode("a[INST]b</s>", bos=False, allow_special=True)
    assert files.pieces(ids) == ["\u2581a", "[INST]", "b", "</s>"]  # no "▁" after a special token
    assert ours.decode(ids, skip_special=True) == "ab"


def test_save_load_round_trip(files: Files, tmp_path: Path) -> None:
    for i, ours in enumerate((files.from_dir, files.from_gguf)):
        out = tmp_path / str(i)
        assert sorted(ours.save(out)) == ["tokenizer.json", META_NAME]
        assert json.loads((out / META_NAME).read_text())["kind"] == "sentencepiece"
        loaded = Tokenizer.load(out)
        assert (loaded.bos_id, loaded.eos_id, loaded.add_bos, loaded.add_eos, loaded.vocab_size) == (
            ours.bos_id, ours.eos_id, ours.add_bos, ours.add_eos, ours.vocab_size)
        assert loaded.vocabulary_digest() == ours.vocabulary_digest()
        for text in TEXTS:
            for allow_special in (False, True):
                ids = ours.encode(text, allow_special=allow_special)
                assert loaded.encode(text, allow_special=allow_special) == ids
                assert loaded.decode(ids) == ours.decode(ids)


def test_gguf_merges_when_the_file_has_them(files: Files, tmp_path: Path) -> None:
    """A ``llama`` GGUF with tokenizer.ggml.merges (converted from a tokenizer.json, whose scores llama.cpp's
    converter writes as -1000 placeholders) encodes by its merges."""
    tokens, _, types = tok_writers.sentencepiece_vocab(files.proto, files.config)
    merges = json.loads(files.from_gguf.backend.special.to_str())["model"]["merges"]
    path = tmp_path / "merges.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([-1000.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_token_merges([" ".join(m) for m in merges])
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        write()
    writer.close()
    ours = from_gguf(path)
    for text in TEXTS:
        assert ours.encode(text, bos=False) == files.sp.encode(text), text


def test_placeholder_scores_without_merges_warn(files: Files, tmp_path: Path, caplog) -> None:
    tokens, _, types = tok_writers.sentencepiece_vocab(files.proto, files.config)
    path = _gguf(tmp_path / "v.gguf", {"tokenizer.ggml.tokens": tokens,
                                       "tokenizer.ggml.scores": [-1000.0] * len(tokens)})
    with caplog.at_level("WARNING", logger="model.tokenizer"):
        from_gguf(path)
    assert "every normal piece scores -1000.0 and the file has no merges" in caplog.text


def test_no_space_prefix(tmp_path: Path) -> None:
    """A model trained without the "▁" prefix, as a GGUF saying tokenizer.ggml.add_space_prefix false (which
    transformers' GGUF loader does not read; llama.cpp does): SentencePiece's ids and text."""
    proto = tok_writers.train_sentencepiece(add_dummy_prefix=False)
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    path = tok_writers.write_sentencepiece_gguf(tmp_path / "np.gguf", proto, tok_writers.mistral_config(proto),
                                                add_space_prefix=False)
    (tmp_path / "tokenizer.model").write_bytes(proto)
    for ours in (from_gguf(path), from_sentencepiece_model(tmp_path / "tokenizer.model")):
        for text in TEXTS:
            ids = ours.encode(text, bos=False)
            assert ids == sp.encode(text), text
            assert ours.decode(ids) == sp.decode(ids) == text.replace("\u2581", " ")
        assert ours.backend.token(ours.encode("hello", bos=False)[0])[0] != "\u2581"


def test_add_eos(files: Files, tmp_path: Path) -> None:
    """tokenizer.ggml.add_eos_token: EOS ends every encoded text, as transformers' GGUF tokenizer adds it; a
    chat's ids are the template's alone; saved and loaded."""
    transformers = pytest.importorskip("transformers")
    config = tok_writers.mistral_config(files.proto, add_eos_token=True, chat_template="{{ messages[0].content }}")
    path = tok_writers.write_sentencepiece_gguf(tmp_path / "eos.gguf", files.proto, config)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    ours = from_gguf(path)
    assert ours.add_eos and ours.encode("hi there") == hf.encode("hi there") == [1, *files.sp.encode("hi there"), 2]
    assert ours.encode("hi", eos=False)[-1] != 2
    assert ours.encode_chat([{"role": "user", "content": "hi"}]) == files.sp.encode("hi")
    ours.save(tmp_path / "saved")
    assert Tokenizer.load(tmp_path / "saved").encode("hi there") == ours.encode("hi there")


def test_legacy_config_matches_transformers(files: Files, tmp_path: Path) -> None:
    """A tokenizer_config.json with "legacy": true: a "▁" after each special token too, as transformers reads it."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")
    d = tok_writers.write_sentencepiece_hf_dir(tmp_path, files.proto, {**files.config, "legacy": True})
    hf, ours = transformers.AutoTokenizer.from_pretrained(str(d)), load_tokenizer(d)
    for text in ["[INST] hi [/INST]x</s>y<s> z", "hi[INST]there", *TEXTS]:
        if not text.startswith((" ", "\u2581")):
            assert ours.encode(text, bos=False, allow_special=True) == hf.encode(text, add_special_tokens=False), text
    assert files.pieces(ours.encode("[INST]hi", bos=False, allow_special=True)) == ["[INST]", "\u2581h", "i"]


def test_without_byte_fallback(tmp_path: Path) -> None:
    """A model without byte pieces: a character outside the vocabulary is <unk>, a run of them one <unk>."""
    proto = tok_writers.train_sentencepiece(byte_fallback=False)
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    (tmp_path / "tokenizer.model").write_bytes(proto)
    ours = from_sentencepiece_model(tmp_path / "tokenizer.model")
    for text in [*TEXTS, "ᚠᚢᚦ runes ᚨ"]:
        assert ours.encode(text, bos=False) == sp.encode(text), text
    assert ours.encode("ᚠᚢᚦ", bos=False).count(sp.unk_id()) == 1


def test_user_defined_pieces_are_whole(tmp_path: Path) -> None:
    """User-defined pieces of the model are matched whole, after the "▁" prefix, as SentencePiece does."""
    proto = tok_writers.train_sentencepiece(user_defined_symbols=("<tool_call>",))
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    (tmp_path / "tokenizer.model").write_bytes(proto)
    ours = from_sentencepiece_model(tmp_path / "tokenizer.model")
    for text in ["<tool_call>{\"a\": 1}", "x<tool_call>y", " <tool_call>", *TEXTS]:
        assert ours.encode(text, bos=False) == sp.encode(text), text
    assert sp.piece_to_id("<tool_call>") in ours.encode("<tool_call>", bos=False)


def test_plain_text_never_makes_a_control_token(tmp_path: Path) -> None:
    """SentencePiece never merges pieces into a control piece. Merges taken from every piece's score would join
    "<" and "s>" into <s> (a control piece's score, 0, is the best), so a typed "</s>" would end a turn."""
    path = tmp_path / "v.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>", "\u2581", "<", "/", "s", ">", "s>", "</", "\u2581<"])
    writer.add_token_scores([0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0])
    writer.add_token_types([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
                           + [gguf.TokenType.NORMAL] * 8)
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        write()
    writer.close()
    ours = from_gguf(path)
    ids = ours.encode("</s><s>", bos=False)
    assert ids == [3, 9, 8, 4, 8] and ours.decode(ids) == "</s><s>"  # ▁ </ s> < s>: best scores first
    assert ours.encode("</s><s>", bos=False, allow_special=True) == [2, 1]


# ---------------------------------------------------------------------------------------------- bad input


def _refused(path: Path, loader, needle: str) -> None:
    with pytest.raises(CheckpointError, match=needle) as err:
        loader(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("options,needle", [
    ({"model_type": "unigram"}, r"trainer_spec.model_type: expected BPE \(2\), found unigram"),
    ({"normalization_rule_name": "nmt_nfkc"}, "normalizer_spec: expected the identity normalization.*'nmt_nfkc'"),
    ({"remove_extra_whitespaces": True}, "normalizer_spec.remove_extra_whitespaces: expected false, found true"),
])
def test_models_encoding_otherwise_are_refused(tmp_path: Path, options: dict, needle: str) -> None:
    path = tmp_path / "tokenizer.model"
    path.write_bytes(tok_writers.train_sentencepiece(**options))
    _refused(path, load_tokenizer, needle)


def test_corrupt_model_is_refused(files: Files, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.model"
    path.write_bytes(files.proto[:len(files.proto) // 2])
    _refused(path, load_tokenizer, "expected a SentencePiece model .protobuf., found .*cut short")


@pytest.mark.parametrize("entry,needle", [
    ({"3": {"content": "[NOT_INST]", "special": True}}, r"added_tokens_decoder\['3'\]: expected the model's piece "
                                                         r"'\[INST\]', found '\[NOT_INST\]'"),
    ({"1300": {"content": "<pad>", "special": True}}, r"expected an id up to 1200 .*found 1300"),
    ({"x": {"content": "<pad>"}}, r"added_tokens_decoder\['x'\]: expected an id and"),
])
def test_bad_added_tokens_are_refused(files: Files, tmp_path: Path, entry: dict, needle: str) -> None:
    config = {**files.config, "added_tokens_decoder": {**files.config["added_tokens_decoder"], **entry}}
    d = tok_writers.write_sentencepiece_hf_dir(tmp_path, files.proto, config)
    with pytest.raises(CheckpointError, match=needle) as err:
        load_tokenizer(d)
    assert str(d / "tokenizer_config.json") in str(err.value)


def test_added_token_after_the_model(files: Files, tmp_path: Path) -> None:
    """An added token with the id after the model's pieces (a fine-tune's <pad>) is a new special token."""
    config = {**files.config, "added_tokens_decoder": {**files.config["added_tokens_decoder"],
                                                       "1200": {"content": "<pad>", "special": True}}}
    ours = load_tokenizer(tok_writers.write_sentencepiece_hf_dir(tmp_path, files.proto, config))
    assert ours.vocab_size == 1201 and ours.encode("<pad>", bos=False, allow_special=True) == [1200]


def _gguf(path: Path, fields: dict) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    for key, value in fields.items():
        writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING
                             if isinstance(value[0], str) else gguf.GGUFValueType.FLOAT32)
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        write()
    writer.close()
    return path


@pytest.mark.parametrize("fields,needle", [
    ({"tokenizer.ggml.tokens": ["<unk>", "a"]}, r"tokenizer.ggml.scores: expected 2 scores .*, found 0"),
    ({"tokenizer.ggml.tokens": ["<unk>", "a", "a"], "tokenizer.ggml.scores": [0.0, -1.0, -2.0]},
     "tokenizer.ggml.tokens: expected distinct pieces, found 'a' at ids 1 and 2"),
])
def test_bad_gguf_vocabularies_are_refused(tmp_path: Path, fields: dict, needle: str) -> None:
    _refused(_gguf(tmp_path / "v.gguf", fields), from_gguf, needle)
