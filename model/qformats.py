"""Quantized weight formats, torch-free: their names, block sizes and storage layout, and which tensors may take
them (model/quant.py quantizes and dequantizes; the image layout, runtime/format/image.py, and the pool's
processes need only the sizes).

    q8_0 q4_0 q4_1 q5_0 q5_1    llama.cpp's blocks of 32 values (GGUF types 8, 2, 3, 6, 7), kept as stored
    q4_k q5_k q6_k              llama.cpp's super-blocks of 256 values (GGUF types 12, 13, 14)
    int8                        ours: symmetric, one fp16 scale per group of a row: q int8 [rows, cols], then
                                scales fp16 [rows, cols / group]
    int4                        ours: asymmetric, 16 levels, w = q * scale + minimum: q packed two a byte
                                [rows, cols / 2] (low nibble: the even column), scales fp16, minima fp16

A matrix of logical shape (rows, cols) is stored row-major, each row's blocks (or groups) contiguous: how a GGUF
file stores a weight of ggml shape [cols, rows].
"""

from __future__ import annotations

from model.errors import ConfigError

GGUF_SCHEMES = {"q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q4_k": 12, "q5_k": 13, "q6_k": 14}
GGML_BLOCKS = {"q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24), "q8_0": (32, 34),
               "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210)}  # values, bytes per block (ggml)
OURS = ("int8", "int4")
SCHEMES = (*GGUF_SCHEMES, *OURS)
GROUP_SIZES = (32, 64, 128)
# A quantized matrix is used by dequantizing at most this many values (whole rows) at a time into scratch in the
# compute dtype: a bounded workspace whatever the matrix (a 70B output matrix is 1.05 G values), in chunks
# large enough for full-speed kernels (model/quant.py QuantWeight.linear).
DEQUANT_CHUNK = 1 << 25


def is_quantized(dtype: str) -> bool:
    return dtype in SCHEMES


def _check_scheme(scheme: str, name: str, shape: tuple[int, ...]) -> None:
    if scheme not in SCHEMES:
        raise ConfigError(f"{name} of shape {tuple(shape)}: unknown quantization scheme {scheme!r} "
                          f"(allowed: {', '.join(SCHEMES)})")


def _check_group(scheme: str, group: int | None, name: str, shape: tuple[int, ...]) -> None:
    if scheme in GGML_BLOCKS:
        if group not in (None, GGML_BLOCKS[scheme][0]):
            raise ConfigError(f"{name} of shape {tuple(shape)}: {scheme} has a fixed block of "
                              f"{GGML_BLOCKS[scheme][0]} values, found group {group}")
    elif group not in GROUP_SIZES:
        raise ConfigError(f"{name} of shape {tuple(shape)}: {scheme} needs a group size of "
                          f"{', '.join(map(str, GROUP_SIZES))}, found {group}")


def block_size(scheme: str, group: int | None = None) -> int:
    """Values per block: 32 or 256 for the ggml types, the group for int8/int4."""
    _check_scheme(scheme, "block_size", ())
    _check_group(scheme, group, "block_size", ())
    return GGML_BLOCKS[scheme][0] if scheme in GGML_BLOCKS else group


def check_quantizable(scheme: str, name: str, shape: tuple[int, ...], group: int | None = None) -> None:
    """ConfigError naming ``name`` and ``shape`` unless a tensor of that shape can be stored as ``scheme``."""
    shape = tuple(int(s) for s in shape)
    _check_scheme(scheme, name, shape)
    _check_group(scheme, group, name, shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ConfigError(f"{name} of shape {shape}: {scheme} stores 2-D tensors of positive size only")
    cols, bs = shape[1], block_size(scheme, group)
    if scheme == "int4" and cols % 2:
        raise ConfigError(f"{name} of shape {shape}: int4 packs two values a byte and needs an even row length, "
                          f"found {cols}")
    if cols % bs:
        what = f"group {group}" if scheme in OURS else f"block of {bs}"
        raise ConfigError(f"{name} of shape {shape}: {scheme} with a {what} needs a row length that is a multiple "
                          f"of {bs}, found {cols}")


def row_layout(scheme: str, cols: int, group: int | None) -> list[tuple[int, str]]:
    """Each storage section as (elements per row, element type: "u8", "i8" or "f16"); the sections follow each
    other in the raw bytes, each one rows x elements."""
    if scheme in GGML_BLOCKS:
        bs, ts = GGML_BLOCKS[scheme]
        return [(cols // bs * ts, "u8")]
    if scheme == "int8":
        return [(cols, "i8"), (cols // group, "f16")]
    return [(cols // 2, "u8"), (cols // group, "f16"), (cols // group, "f16")]


ITEMSIZE = {"u8": 1, "i8": 1, "f16": 2}


def storage_bytes(scheme: str, shape: tuple[int, int], group: int | None = None) -> int:
    """Bytes of a (rows, cols) matrix stored as ``scheme``."""
    check_quantizable(scheme, "storage_bytes", shape, group)
    rows, cols = shape
    return sum(rows * n * ITEMSIZE[t] for n, t in row_layout(scheme, cols, group))
