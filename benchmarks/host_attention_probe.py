#!/usr/bin/env python3
"""The CPU's decode-attention rate for ``--host-attention``, alone and with the H2D link busy.

    python benchmarks/host_attention_probe.py --shape llama3.1-8b --batch 32 --length 2064

Host attention reads a layer's offloaded keys and values from DRAM while the weight stream's DMA reads the
next groups from DRAM too, so the two share the memory system. This times one layer's decode attention (as
``TieredKVCache.attend_on_host`` runs it: each KV head's query heads folded into rows) over keys laid out
batch-major (contiguous per sequence), slot-major (strided per sequence) and head-major (the offloaded store's
layout, contiguous per sequence and KV head),
first with the GPU idle and then while a thread keeps the H2D link busy with pinned 256 MiB copies (CUDA
only). GB/s of keys and values read per attention call, median of 5 after a first run; the link's achieved
rate during the busy runs is printed too.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

GB = 1e9


class BusyLink:
    """A thread copying a pinned 256 MiB buffer to the GPU in a loop on its own stream, while the ``with``
    block runs: the H2D link busy as the weight stream keeps it. ``gbps``: the link's rate meanwhile."""

    def __init__(self, device: torch.device, nbytes: int = 256 << 20) -> None:
        self.src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        self.dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.stream, self.stop, self.bytes = torch.cuda.Stream(device), threading.Event(), 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with torch.cuda.stream(self.stream):
            while not self.stop.is_set():
                self.dst.copy_(self.src, non_blocking=True)
                self.stream.synchronize()
                self.bytes += self.src.numel()

    def __enter__(self) -> BusyLink:
        self.t0 = time.perf_counter()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.gbps = self.bytes / (time.perf_counter() - self.t0) / GB


def attention_gbps(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, repeats: int = 5) -> float:
    """k, v (B, L, n_kv, hd) views (any strides); q (B, n_kv, n_rep, hd). GB/s of k and v read."""
    samples = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2))
        samples.append(time.perf_counter() - t0)
    best = sorted(samples[1:])[repeats // 2]
    return 2 * k.numel() * k.element_size() / best / GB


def main(argv: list[str] | None = None) -> int:
    from model.args import preset

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3.1-8b", help="synthetic shape for the head counts (default llama3.1-8b)")
    ap.add_argument("--batch", type=int, default=32, help="sequences (default 32)")
    ap.add_argument("--length", type=int, default=2064, help="cached slots per sequence (default 2064)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    args = preset(a.shape, 1)
    dt = torch.bfloat16
    n_kv, hd, b, n = args.n_kv_heads, args.head_dim, a.batch, a.length
    q = torch.randn(b, n_kv, args.n_rep, hd).to(dt)
    layouts = {"batch-major": torch.randn(b, n, n_kv, hd).to(dt),
               "slot-major": torch.randn(n, b, n_kv, hd).to(dt).transpose(0, 1),
               "head-major": torch.randn(b, n_kv, n, hd).to(dt).transpose(1, 2)}
    cuda = torch.cuda.is_available()
    print(f"{a.shape}: batch {b} x {n} slots, {n_kv} KV heads x {hd}, bf16, {torch.get_num_threads()} threads; "
          f"one layer's keys+values {2 * b * n * n_kv * hd * 2 / GB:.3f} GB")
    print("| layout | GB/s, GPU idle | GB/s, H2D link busy | link GB/s meanwhile |")
    print("|---|---|---|---|")
    for name, k in layouts.items():
        idle = attention_gbps(q, k, k)
        busy = link = None
        if cuda:
            with BusyLink(torch.device("cuda")) as bl:
                time.sleep(0.2)
                busy = attention_gbps(q, k, k)
            link = bl.gbps
        print(f"| {name} | {idle:.1f} | {'-' if busy is None else f'{busy:.1f}'} | "
              f"{'-' if link is None else f'{link:.1f}'} |")
    if cuda:
        copy_rates(b, n, n_kv, hd, dt)
    return 0


def copy_rates(b: int, n: int, n_kv: int, hd: int, dt: torch.dtype) -> None:
    """GB/s of the offloaded cache's copies: a layer's rows [0, n) to the GPU as one contiguous copy
    (slot-major store) and as one 2-D copy of B x n_kv rows (head-major store, runtime.engine.copy2d), and a decode
    step's one new slot back to the host both ways."""
    from runtime.engine.copy2d import copy_2d

    dev = torch.device("cuda")
    host = torch.empty(b * n_kv * (n + 64) * hd, dtype=dt).pin_memory()
    gpu = torch.empty(b * n_kv * (n + 64) * hd, dtype=dt, device=dev)
    hm_h, hm_g = host.view(b, n_kv, n + 64, hd), gpu.view(b, n_kv, n + 64, hd)
    sm_h, sm_g = host.view(n + 64, b, n_kv, hd), gpu.view(n + 64, b, n_kv, hd)

    def rate(fn, nbytes: int, repeats: int = 10) -> float:
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        return nbytes * repeats / (time.perf_counter() - t0) / GB

    full = b * n_kv * n * hd * host.element_size()
    one = b * n_kv * hd * host.element_size()
    print("| copy | bytes | GB/s |")
    print("|---|---|---|")
    print(f"| H2D rows [0, {n}), slot-major, contiguous | {full} | "
          f"{rate(lambda: sm_g[:n].copy_(sm_h[:n], non_blocking=True), full):.1f} |")
    print(f"| H2D rows [0, {n}), head-major, 2-D | {full} | "
          f"{rate(lambda: copy_2d(hm_g[:, :, :n], hm_h[:, :, :n]), full):.1f} |")
    print(f"| D2H one slot, slot-major, contiguous | {one} | "
          f"{rate(lambda: sm_h[n].copy_(sm_g[n], non_blocking=True), one, 100):.2f} |")
    print(f"| D2H one slot, head-major, 2-D | {one} | "
          f"{rate(lambda: copy_2d(hm_h[:, :, n:n + 1], hm_g[:, :, n:n + 1]), one, 100):.2f} |")


if __name__ == "__main__":
    sys.exit(main())
