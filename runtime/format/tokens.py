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
