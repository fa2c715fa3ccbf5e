"""Synthetic tokenizers of the model families run here, written the ways their checkpoints ship them.

Not a test module: test files import these helpers.

  FAMILIES                 each family's pre-tokenizer as its Hugging Face original writes it (the split regex
                           copied from the original tokenizer.json, not from model/tokenizer.py), its control
                           and other added tokens, its llama.cpp ``tokenizer.ggml.pre`` name
  train(family)            a byte-level BPE trained on varied text with that normalizer and pre-tokenizer, the
                           family's added tokens after it: the reference "HF tokenizer.json"
  write_hf_dir(dir, ...)   tokenizer.json + tokenizer_config.json (BOS/EOS, chat template) as HF repos hold them
  write_gguf(path, ...)    the same vocabulary as GGUF fields, the way llama.cpp's converter writes them
                           (tokens in id order, CONTROL / USER_DEFINED / NORMAL types, merges as "a b",
                           tokenizer.ggml.pre, BOS/EOS ids, add_bos, chat templates)
  train_sentencepiece()    a SentencePiece BPE model (the sentencepiece package) trained like Llama 2's and
                           Mistral 7B's, with Mistral v0.3's control tokens: the reference "tokenizer.model"
  mistral_config(proto)    its tokenizer_config.json as Mistral-7B-Instruct-v0.3's repository has it
  write_sentencepiece_hf_dir / write_sentencepiece_gguf
                           tokenizer.model + tokenizer_config.json, and the GGUF llama.cpp's converter makes of
                           them (tokenizer.ggml.model "llama": tokens, scores, types, BOS/EOS/UNK, add_bos/add_eos)

The corpus mixes English prose (tests/data's novel), code, numbers, CJK, accents, emoji and whitespace runs,
so that merges across every kind of split exist and a wrong split shows as different ids.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers

DATA = Path(__file__).resolve().parent / "data"

# Meta's Llama-3 split (llama-models llama3/tokenizer.py), also the Split of Llama-3's tokenizer.json.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2/2.5/3's tokenizer.json: the Split before ByteLevel, after an NFC normalizer.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Mistral-Nemo-Instruct-2407's tokenizer.json (tekken): the Split before ByteLevel; its BPE ignores merges.
TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

_MISTRAL_CONTROL = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]"]
_LLAMA3_CONTROL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]


@dataclass(frozen=True)
class Family:
    split: str | None  # the Split regex before ByteLevel; None: ByteLevel's own (GPT-2) regex
    gguf_pre: str
    control: tuple[str, ...] = ()  # special added tokens (after the trained vocabulary)
    added: tuple[str, ...] = ()  # non-special added tokens
    nfc: bool = False
    ignore_merges: bool = False
    digits: bool = False  # SmolLM's individual digits before ByteLevel
    control_first: bool = False  # Mistral's control tokens take the first ids, before the vocabulary


FAMILIES = {
    "llama3": Family(LLAMA3_SPLIT, "llama-bpe", tuple(_LLAMA3_CONTROL), ignore_merges=True),
    "qwen2": Family(QWEN2_SPLIT, "qwen2", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                    ("<tool_call>", "</tool_call>", "<think>", "</think>"), nfc=True),
    "tekken": Family(TEKKEN_SPLIT, "tekken", tuple(_MISTRAL_CONTROL), ignore_merges=True, control_first=True),
    "smollm": Family(None, "smollm", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), digits=True),
    "gpt2": Family(None, "gpt-2", ("<|endoftext|>",)),
}

# Text the tests encode, beyond the corpus: digits, CJK, whitespace runs, contractions, case changes,
# decomposed accents (NFC), special-token strings inside text.
SAMPLES = [
    "Hello, world!", "The quick brown fox jumps over the lazy dog.", "12345", "1234567890 and 3.14159",
    "Call 555-0199 or pay $1,234.56 by 2024-06-30; x2 = 3.14159", "def f(x):\n    return x * 2\n",
    "\tif (a && b) {\n\t\treturn;\n\t}", "multiple   spaces    here", "  leading spaces", "trailing spaces   ",
    "line one\nline two\r\nline three\n\n\nend", "naïve café, Ελληνικά, русский", "cafe\u0301 and Cafe\u0301",
    "日本語のテキストと中文字符", "中文，标点。还有「引号」", "emoji 🙂👍🏽 and 🇫🇷 flags",
    "I'm sure you've heard they'll say it's DONE'S", "MiXeD CaSe and ALLCAPS, iPhone HTTPServerError McDonald's",
    "camelCaseWords and snake_case_words", "path/to/file.txt and http://example.com/a?b=1&c=2#frag",
    "<|im_start|>user\nhi<|im_end|>", "text with <|endoftext|> inside and <|im_end|>\n", "[INST] hi [/INST]</s>",
    "<tool_call>{\"name\": \"f\"}</tool_call>", "", " ", "a\u00a0non-breaking\u2003space and zero\u200bwidth",
]

_EXTRA_CORPUS = [
    "def tokenize(text: str) -> list[int]:\n    return [ord(c) for c in text]  # 2024-01-01\n",
    "for (int i = 0; i < 1024; ++i) {\n\tsum += a[i] * b[i];\n}\n",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다。",
    "Ελληνικά κείμενα, русский текст, naïve café résumé über straße",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 12345 3.14159 2.71828 $1,234.56",
    "CamelCase HTTPServer iPhone JSONParser XMLHttpRequest McDonald's O'Reilly",
    "    indented    text\twith\ttabs\n\n\nand   runs   of   spaces   ",
    "emoji 🙂👍🏽🇫🇷 ✓ → ≤ ≥ ∑ ∫",
]


@functools.cache
def _corpus() -> tuple[str, ...]:
    novel = (DATA / "pride_and_prejudice_1-15.txt").read_text().split("\n\n")[:400]
    return tuple(novel + _EXTRA_CORPUS * 20)


def _pre_tokenizer(family: Family) -> pre_tokenizers.PreTokenizer:
    if family.split is None:
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    else:
        steps = [pre_tokenizers.Split(Regex(family.split), behavior="isolated", invert=False),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    if family.digits:
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    return pre_tokenizers.Sequence(steps)


def train(name: str, vocab_size: int = 1500) -> tokenizers.Tokenizer:
    """Family ``name``'s tokenizer: a byte-level BPE trained on the corpus, its added tokens after the
    vocabulary (Mistral's control tokens first, as in its tokenizer.json)."""
    family = FAMILIES[name]
    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=family.ignore_merges))
    if family.nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer(family)
    tok.decoder = decoders.ByteLevel()
    first = [AddedToken(t, special=True, normalized=False) for t in family.control] if family.control_first else []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=first,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    tok.model.ignore_merges = family.ignore_merges  # training builds a new BPE model
    if not family.control_first:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in family.control])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in family.added])
    return tok


def write_hf_dir(directory: Path, tok: tokenizers.Tokenizer, config: dict) -> Path:
    """tokenizer.json and tokenizer_config.json (``config``, with the class transformers loads it as)."""
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config}, indent=1))
    return directory


def _looks_special(token: str) -> bool:
    """llama.cpp's converter: an added token also counts as CONTROL when it looks like one."""
    return token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))


def write_gguf(path: Path, tok: tokenizers.Tokenizer, pre: str, bos: str | None, eos: str | None,
               add_bos: bool, templates: dict[str, str] | None = None, pad_to: int | None = None) -> Path:
    """The vocabulary as llama.cpp's converter writes a gpt2 tokenizer: every id's token (``[PAD{i}]``
    USER_DEFINED up to ``pad_to``, a config vocab_size above the tokenizer's), CONTROL for special added
    tokens and those that look special, USER_DEFINED for the other added tokens, the merges as "a b"."""
    added = tok.get_added_tokens_decoder()
    n = tok.get_vocab_size(with_added_tokens=True)
    tokens, types = [], []
    for i in range(max(n, pad_to or 0)):
        t = tok.id_to_token(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.USER_DEFINED)
        elif i in added:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if added[i].special or _looks_special(t)
                         else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if bos is not None:
        writer.add_bos_token_id(tok.token_to_id(bos))
    if eos is not None:
        writer.add_eos_token_id(tok.token_to_id(eos))
    writer.add_add_bos_token(add_bos)
    for name, template in (templates or {}).items():
        writer.add_key_value(f"tokenizer.chat_template{'' if name == 'default' else '.' + name}", template,
                             gguf.GGUFValueType.STRING)
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        write()
    writer.close()
    return path


# ------------------------------------------------------------------------------------- SentencePiece (Mistral 7B)

# Mistral-7B-Instruct-v0.3's tokenizer.model: <unk> <s> </s>, its control tokens, then [control_N] ones (to 768
# there; a few here), then the bytes and the pieces.
MISTRAL_V3_CONTROL = ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                      "[/TOOL_RESULTS]", *(f"[control_{i}]" for i in range(8, 12)))


@functools.cache
def train_sentencepiece(vocab_size: int = 1200, **options) -> bytes:
    """A serialized SentencePiece model trained on the corpus the way Llama 2's and Mistral 7B's were: BPE, byte
    fallback, single digits, no normalization, whitespace kept (runs as pieces), a "▁" prefix; Mistral v0.3's
    control tokens after <unk> <s> </s>. ``options``: other SentencePieceTrainer options (model_type,
    byte_fallback, add_dummy_prefix, user_defined_symbols as a tuple, ...)."""
    import io

    import sentencepiece

    out = io.BytesIO()
    settings = dict(model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
                    remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, add_dummy_prefix=True,
                    control_symbols=list(MISTRAL_V3_CONTROL), max_sentence_length=1 << 16, minloglevel=2,
                    num_threads=1)
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}  # tuples: cache keys
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(_corpus()), model_writer=out,
                                             vocab_size=vocab_size, **{**settings, **options})
    return out.getvalue()


def mistral_config(proto: bytes, **overrides) -> dict:
    """tokenizer_config.json as Mistral-7B-Instruct-v0.3 ships it: BOS/EOS/UNK, add_bos, not legacy, its
    control pieces (and <unk> <s> </s>) listed special in added_tokens_decoder; then ``overrides`` (a
    chat_template)."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    added = {str(i): {"content": sp.id_to_piece(i), "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}
             for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)}
    config = {"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added, "bos_token": "<s>",
              "eos_token": "</s>", "unk_token": "<unk>", "legacy": False, "tokenizer_class": "LlamaTokenizer",
              "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False}
    return {**config, **overrides}


def write_sentencepiece_hf_dir(directory: Path, proto: bytes, config: dict) -> Path:
    """tokenizer.model and tokenizer_config.json, as a SentencePiece model's HF repository holds them."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(proto)
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return directory


def sentencepiece_vocab(proto: bytes, config: dict) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types as llama.cpp's converter reads a tokenizer.model (convert_hf_to_gguf.py,
    _create_vocab_sentencepiece): UNKNOWN, CONTROL, UNUSED, BYTE or else NORMAL (a user-defined piece too);
    then tokenizer_config.json's added_tokens_decoder: CONTROL where special or looking special, else
    USER_DEFINED with "▁" as spaces, each scored -1000."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        kind = gguf.TokenType.NORMAL
        for test, token_type in ((sp.is_unknown, gguf.TokenType.UNKNOWN), (sp.is_control, gguf.TokenType.CONTROL),
                                 (sp.is_unused, gguf.TokenType.UNUSED), (sp.is_byte, gguf.TokenType.BYTE)):
            if test(i):
                kind = token_type
                break
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(kind)
    for key, entry in config.get("added_tokens_decoder", {}).items():
        i, token = int(key), entry["content"]
        if entry.get("special") or _looks_special(token):
            types[i] = gguf.TokenType.CONTROL
        else:
            token, types[i] = token.replace("\u2581", " "), gguf.TokenType.USER_DEFINED
        tokens[i], scores[i] = token, -1000.0
    return tokens, scores, types


def write_sentencepiece_gguf(path: Path, proto: bytes, config: dict, templates: dict[str, str] | None = None,
                             add_space_prefix: bool | None = None) -> Path:
    """A GGUF holding only the vocabulary (``add_sentencepiece_vocab``)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    add_sentencepiece_vocab(writer, proto, config, templates, add_space_prefix)
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        write()
    writer.close()
    return path


def add_sentencepiece_vocab(writer: gguf.GGUFWriter, proto: bytes, config: dict,
                            templates: dict[str, str] | None = None, add_space_prefix: bool | None = None) -> None:
    """The vocabulary as llama.cpp's converter writes a SentencePiece one (_set_vocab_sentencepiece):
    tokenizer.ggml.model "llama", pre "default", tokens, scores and types, then what gguf.SpecialVocab reads from
    tokenizer_config.json: BOS/EOS/UNK ids, add_bos/add_eos, the chat template (``templates``: named ones
    instead); tokenizer.ggml.add_space_prefix if given."""
    tokens, scores, types = sentencepiece_vocab(proto, config)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("unk_token", writer.add_unk_token_id)):
        if config.get(key) is not None:
            add(tokens.index(config[key]))
    for key, add in (("add_bos_token", writer.add_add_bos_token), ("add_eos_token", writer.add_add_eos_token)):
        if key in config:
            add(config[key])
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    if templates is None and isinstance(config.get("chat_template"), str):
        templates = {"default": config["chat_template"]}
    for name, template in (templates or {}).items():
        writer.add_key_value(f"tokenizer.chat_template{'' if name == 'default' else '.' + name}", template,
                             gguf.GGUFValueType.STRING)
