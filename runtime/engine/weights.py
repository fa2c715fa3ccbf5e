"""Weight sources: what generation computes from (``WeightSource``), and the in-memory one.

``InMemoryWeights`` is ``--mode full``: every group of an image read once, verified, and held on one device,
the reference every streamed mode must match (runtime/engine/streamed.py streams the others). On the CPU the
tensors are views into the buffers the groups were read into (no copy), quantized ones held in row tiles for the
CPU kernels or dequantized once (model/cpu_kernels.py ``hold``, as the streamed source does with its DRAM tier); on
CUDA each group is copied to the GPU once and quantized
tensors stay quantized there (dequantized per use). Runs in the client process.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

import torch

from model.arch import EMBED
from model.args import ModelArgs
from model.cpu_kernels import hold
from model.transformer import Weights, embed_forward
from runtime.env import cpu_kernels
from runtime.format.image import TORCH_DTYPES, Image, tensor_views
from runtime.progress import Progress

if TYPE_CHECKING:
    from runtime.pool.client import PoolClient


class WeightSource(Protocol):
    """What runtime/engine/generate.py and the measurements read of a weight source."""

    image: Image
    args: ModelArgs
    device: torch.device
    dtype: torch.dtype
    kv_offload: bool  # the plan's decision: the KV cache lives in DRAM (runtime.engine.source.plan_with_kv)
    load_ms: dict[str, float]  # how long getting ready took, by phase
    client: PoolClient | None  # the pool attachment (None: no pool)

    @property
    def pinned_bytes(self) -> int: ...  # host memory this process registered for DMA

    def embed(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def get(self, group: str) -> Weights:
        """Group ``group``'s weights, valid until the next ``get`` (model.passes.forward_groups)."""

    def close(self) -> None: ...


class InMemoryWeights:
    def __init__(self, image: Image, device: str | torch.device = "cpu", quiet: bool = False,
                 kv_offload: bool = False) -> None:
        self.image, self.args = image, image.args
        self.device = torch.device(device)
        self.dtype = TORCH_DTYPES[image.dtype]
        self.kv_offload, self.client = kv_offload, None
        self.groups: dict[str, dict[str, torch.Tensor]] = {}
        t0 = time.perf_counter()
        progress = Progress(f"loading {image.path}", image.image_size, quiet=quiet)
        for name, spec in image.groups.items():
            buf = image.read_group(name)
            views = tensor_views(spec, buf)
            if self.device.type == "cpu":
                self.groups[name] = hold(views, self.dtype, cpu_kernels())
            else:
                self.groups[name] = {k: v.to(self.device) for k, v in views.items()}
            progress.update(spec.size, name)
        progress.done()
        self.load_ms = {"read_groups": (time.perf_counter() - t0) * 1e3}

    @property
    def pinned_bytes(self) -> int:
        return 0

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return embed_forward(tokens, self.groups[EMBED], self.dtype)

    def get(self, group: str) -> Weights:
        return self.groups[group]

    def resident_bytes(self) -> int:
        return sum(t.nbytes for g in self.groups.values() for t in g.values())

    def close(self) -> None:
        pass
