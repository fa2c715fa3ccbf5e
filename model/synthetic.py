"""Synthetic checkpoints: random weights in the published shapes, for benchmarks without a real model.

Weights are never zeros or constants: matrices are slices of a pool of N(0, 0.02) values drawn once
(seeded), taken at a random offset for every tensor, so groups differ from each other and generation
costs the pool once instead of a random draw per byte (packing a 70B shape runs at disk speed). Norm
weights are 1 + N(0, 0.1), biases N(0, 0.02). Shapes of every architecture of the registry (model/arch/), from
the presets of model/args.py. Runs in the ``launch.py pack`` process.
"""

from __future__ import annotations

import torch

from model.args import ModelArgs, preset
from model.checkpoint import Checkpoint

POOL_ELEMENTS = 1 << 24  # 16 Mi values (64 MiB fp32): larger than any row, small enough to draw in ~0.2 s


class SyntheticCheckpoint(Checkpoint):
    format = "synthetic"

    def __init__(self, name: str | ModelArgs, n_layers: int | None = None, seed: int = 0) -> None:
        args = name if isinstance(name, ModelArgs) else preset(name, n_layers)
        self.name = "custom" if isinstance(name, ModelArgs) else name
        super().__init__(self.name, args)  # type: ignore[arg-type]
        self.gen = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(POOL_ELEMENTS, generator=self.gen) * 0.02
        self._pools: dict[torch.dtype, torch.Tensor] = {}

    def tensor(self, key: str) -> torch.Tensor:
        out = torch.empty(self.shapes[key])
        self.fill(key, out)
        return out

    def fill(self, key: str, out: torch.Tensor) -> None:
        """Write ``key``'s values into ``out`` (any dtype) without a full-size temporary."""
        if out.dim() == 1:
            noise = torch.randn(out.shape, generator=self.gen)
            out.copy_(0.02 * noise if key.endswith(".bias") else 1 + 0.1 * noise)
            return
        pool = self._pools.setdefault(out.dtype, self.pool.to(out.dtype))  # converted once: copies are memcpy
        flat, pos = out.view(-1), int(torch.randint(0, POOL_ELEMENTS, (1,), generator=self.gen))
        done = 0
        while done < flat.numel():
            n = min(flat.numel() - done, POOL_ELEMENTS - pos)
            flat[done:done + n].copy_(pool[pos:pos + n])
            done, pos = done + n, 0

    def source_files(self) -> list:
        return []  # drawn, not read

    def describe(self) -> dict:
        return {"format": "synthetic", "shape": self.name, "n_layers": self.args.n_layers}

