"""Quantized weight formats, torch-free: their names, block sizes and storage sizes, and which tensors may take
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

GGUF_SCHEMES = {"q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q4_k": 12, "q5_k": 13, "q6_k": 14}
_GGML_BLOCKS = {"q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24), "q8_0": (32, 34),
                "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210)}  # values, bytes per block
OURS = ("int8", "int4")
SCHEMES = tuple(GGUF_SCHEMES) + OURS
GROUP_SIZES = (32, 64, 128)


def is_quantized(dtype: str) -> bool:
    return dtype in SCHEMES


def block_size(scheme: str, group: int | None = None) -> int:
    """Values per block (ggml) or group (int8/int4) along a row."""
    if scheme in _GGML_BLOCKS:
        return _GGML_BLOCKS[scheme][0]
    if scheme in OURS:
        if group not in GROUP_SIZES:
            raise ConfigError(f"--group-size {group}: {scheme} takes one of {GROUP_SIZES}")
        return group
    raise ConfigError(f"unknown weight format {scheme!r}; one of {SCHEMES}")


def storage_bytes(scheme: str, shape: tuple[int, ...], group: int | None = None) -> int:
    rows, cols = shape
    per = block_size(scheme, group)
    blocks = rows * (cols // per)
    if scheme in _GGML_BLOCKS:
        return blocks * _GGML_BLOCKS[scheme][1]
    scales = blocks * 2
    return (rows * cols + scales) if scheme == "int8" else (rows * cols // 2 + 2 * scales)


def check_quantizable(scheme: str, name: str, shape: tuple[int, ...], group: int | None = None) -> None:
    """ConfigError naming the tensor and its shape when ``scheme`` cannot store it."""
    if len(shape) != 2:
        raise ConfigError(f"{name}: shape {tuple(shape)} is not a matrix; {scheme} stores matrices only")
    per = block_size(scheme, group)
    rows, cols = shape
    if scheme == "int4" and cols % 2:
        raise ConfigError(f"{name}: shape {tuple(shape)}: int4 packs two values a byte and needs an even row "
                          f"length, found {cols}")
    if cols % per:
        what = f"group size {per}" if scheme in OURS else f"{scheme} blocks of {per}"
        raise ConfigError(f"{name}: shape {tuple(shape)}: its rows of {cols} values are not a multiple of the "
                          f"{what}")
