"""Debug: does --mode mixed on CUDA bind the same weights as --mode full? Compares every group's tensors as
the streamed source hands them out during one pass, and the prefill logits. Run on the GPU machine."""
import sys

import torch

from model.synthetic import SyntheticCheckpoint
from runtime.engine.config import EngineConfig
from runtime.engine.generate import Generator
from runtime.engine.source import open_source
from runtime.engine.weights import InMemoryWeights
from runtime.format.image import Image
from runtime.format.pack import pack


class Spy:
    def __init__(self, src, ref):
        self.src, self.ref, self.bad = src, ref, []

    def embed(self, tokens):
        return self.src.embed(tokens)

    def get(self, g):
        w = self.src.get(g)
        torch.cuda.current_stream().synchronize()
        for k, v in w.items():
            if not torch.equal(v, self.ref.groups[g][k]):
                self.bad.append((g, k, (v.float() - self.ref.groups[g][k].float()).abs().max().item()))
        return w

    def __getattr__(self, k):
        return getattr(self.src, k)


def main():
    out = "/tmp/dbg.img"
    pack(SyntheticCheckpoint("llama3.2-1b", n_layers=4, seed=3), out, dtype="bf16", quiet=True)
    img, dev = Image.open(out), torch.device("cuda")
    ref = InMemoryWeights(img, dev, quiet=True)
    x = torch.tensor([[3, 17, 42, 7, 99, 5, 23] * 3], device=dev)
    g0 = Generator(ref, 64)
    l0 = g0.forward(x, 0, g0.new_cache(1))
    for mode, kw in [("preload", {}), ("mixed", dict(gpu_cached_layers=1, cpu_cache_layers=1, prefetch_distance=2))]:
        cfg = EngineConfig.of(mode=mode, gpu_mem_gb=1.5, workers=2, quiet=True, **({"gpu_cached_layers": 0} | kw))
        with open_source(img, cfg, dev, max_len=64) as (src, plan, _):
            print(mode, "gpu", plan.gpu, "dram", plan.dram, "stream", plan.stream)
            spy = Spy(src, ref)
            g = Generator(spy, 64)
            l1 = g.forward(x, 0, g.new_cache(1))
            l2 = g.forward(x, 0, g.new_cache(1))
            print(mode, "bad tensors", spy.bad[:6], "logit diff pass1", (l1 - l0).abs().max().item(),
                  "pass2", (l2 - l0).abs().max().item(), "argmax equal", torch.equal(l1.argmax(-1), l0.argmax(-1)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
