"""An image's tokenizer: saved by ``pack`` in the directory beside the manifest (``IMAGE.tokenizer/``), named in
the manifest, loaded here (model/tokenizer.py reads it). Torch-free; runs in the launch.py process."""

from __future__ import annotations

from pathlib import Path

from model.errors import UserError
from model.tokenizer import Tokenizer
from runtime.format.image import Image


def tokenizer_dir_for(manifest_path: Path) -> Path:
    """Where the tokenizer of the image whose manifest is ``manifest_path`` is saved."""
    name = manifest_path.name.removesuffix(".json").removesuffix(".manifest")
    return manifest_path.with_name(name + ".tokenizer")


def image_tokenizer(image: Image, required: bool) -> Tokenizer | None:
    """The image's tokenizer; None when it has none (UserError with ``required``: give token ids instead)."""
    name = image.manifest.get("tokenizer")
    if not name:
        if required:
            raise UserError(f"{image.manifest_path}: the image has no tokenizer; give --prompt-ids")
        return None
    return Tokenizer.load(tokenizer_dir_for(image.manifest_path).with_name(name))


def read_chat_template(path: str) -> str:
    """The Jinja chat template in file ``path`` (``--chat-template``), checked: ConfigError naming the flag and
    the file when it cannot be read or parsed."""
    import jinja2

    from model.chat import compile_template
    from model.errors import ConfigError

    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--chat-template {path}: cannot read it ({e})") from None
    try:
        compile_template(text)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"--chat-template {path}: jinja2 cannot parse it: line {e.lineno}: {e.message}") from None
    return text


def with_chat_template(tok: Tokenizer | None, path: str) -> Tokenizer:
    """``tok`` rendering chats with the template in file ``path`` instead of its own (``--chat-template``: e.g.
    one that renders tools); ConfigError naming the flag when it cannot."""
    import dataclasses

    from model.errors import ConfigError

    if tok is None:
        raise ConfigError(f"--chat-template {path}: the image has no tokenizer to render chats with")
    return dataclasses.replace(tok, chat_format="template", chat_templates={"default": read_chat_template(path)},
                               source=f"{tok.source} with --chat-template {path}")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (each byte a printable character) back to the bytes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def token_bytes(tok: Tokenizer) -> list[bytes]:
    """Each token id's bytes (what it adds to the text; a special token's name as UTF-8): the vocabulary a grammar
    library masks over, and the ``bytes`` of an answer's log-probabilities. Byte-level BPE (tokenizers) and
    tiktoken ranks are exact; another tokenizers model falls back to decoding each id alone."""
    b = tok.backend
    n = tok.vocab_size
    if hasattr(b, "ranks"):  # tiktoken
        out = [b""] * n
        for t, i in b.ranks.items():
            out[i] = t
        for t, i in b.specials.items():
            out[i] = t.encode()
        return out
    hf = b.special
    dec = _byte_decoder()
    added = {i for i in hf.get_added_tokens_decoder()}
    out = []
    for i in range(n):
        s = hf.id_to_token(i)
        if s is None:
            out.append(b"")
        elif i not in added and all(c in dec for c in s):
            out.append(bytes(dec[c] for c in s))
        elif i in added:
            out.append(s.encode())
        else:
            out.append(tok.decode([i]).encode())
    return out
