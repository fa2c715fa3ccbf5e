"""In-memory weight source: every group of an image read once, verified, and held on one device.

This is ``--mode full``, the reference every streamed mode must match. On the CPU the tensors are views
into the buffers the groups were read into (no copy); on CUDA each group is copied to the GPU once.
Runs in the client process.
"""

from __future__ import annotations

import torch

from model.llama import Weights, embed_forward
from runtime.image import TORCH_DTYPES, Image, tensor_views
from runtime.progress import Progress


class InMemoryWeights:
    def __init__(self, image: Image, device: str | torch.device = "cpu", quiet: bool = False) -> None:
        self.image, self.args = image, image.args
        self.device = torch.device(device)
        self.dtype = TORCH_DTYPES[image.dtype]
        self.groups: dict[str, dict[str, torch.Tensor]] = {}
        progress = Progress(f"loading {image.path}", image.image_size, quiet=quiet)
        for name, spec in image.groups.items():
            buf = image.read_group(name)
            views = tensor_views(spec, buf)
            self.groups[name] = {k: v.to(self.device) for k, v in views.items()}
            progress.update(spec.size, name)
        progress.done()

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return embed_forward(tokens, self.groups["tok_embeddings"])

    def get(self, group: str) -> Weights:
        return self.groups[group]

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for g in self.groups.values() for t in g.values())
