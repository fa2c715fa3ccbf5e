"""CPU matmuls at decode sizes (1-8 rows of activations) over every stored weight format, against the machine's DRAM
read bandwidth (issue 28 item 1: a CPU kernel should read the stored bytes once, at >= 70% of it).

    python benchmarks/cpu_kernels.py [--shapes 4096x4096,14336x4096] [--rows 1,4,8] [--formats q4_k,int4]
                                     [--threads 1,16] [--group 64] [--pool-mb 384] [--no-compile] [--json F]

For each thread count (--threads, default torch's), first the DRAM read rate: torch's float32 ``sum`` over a 512 MiB
buffer (median of 5). Then, per format and shape, a matrix of random stored bytes (finite fp16 scales) and, per row
count, every candidate that applies, timed over a rotation of copies of its weights of at least --pool-mb in all, so
that each call reads them from DRAM, not from a cache (here 64 MB of float32 already sum at the DRAM rate; on a host
with a larger last-level cache, such as the GPU machine's, give --pool-mb several times that cache: ``--threads
1,4,16 --pool-mb 2048``). Each is reported in GB/s of the *stored* weight bytes (the format's own size, whatever the
candidate reads) and as a share of the DRAM rate measured just before that format, with its largest error against
the reference: float32 activations times the reference dequantizer's matrix (``quant.dequantize``, float32), as max
|y - ref| / max |ref|; 1e-5 is the bar.

Candidates:

- ``today``: what the runtime does now. Plain weights: ``F.linear`` in the weight's dtype. Quantized: ``QuantWeight
  .linear`` on the CPU, which dequantizes the matrix into float32 scratch at every use (a streamed group).
- ``held``: ``F.linear`` over the matrix dequantized once to float32 (what a CPU run holds for its DRAM tier and for
  ``--mode full`` in the formats model/cpu_kernels.py does not tile, and in all with LLMS_CPU_KERNELS=0: 4 bytes a
  value in memory, against 0.56-1.06 for the blocks), in GB/s of the stored bytes.
- ``int4pack``: torch's weight-only int4 kernel (``aten._weight_int4pack_mm_for_cpu``; weights repacked once by
  ``aten._convert_weight_to_int4pack_for_cpu(q int32 (N, K) in 0..15, 1)``, groups of 32/64/128/256 along K, each
  with a (scale, zero) pair as ``(K / group, N, 2)`` in x's dtype; value = (q - 8) * scale + zero). It takes the
  4-bit formats with one scale and one offset per 32-value group: int4 (zero = minimum + 8 scale), q4_0, q4_1 and
  q4_k (its sub-blocks' d * sc and -dmin * m). float32 x (exact within 1e-5); ``int4pack-bf16`` is the same with
  bf16 x and bf16 scales (its fast path on AVX-512, but the scales lose bits: not within 1e-5, shown for speed).
- ``int8pack``: torch's weight-only int8 kernel (``aten._weight_int8pack_mm``: int8 (N, K), one scale per output
  row). No stored format has per-row scales (int8 and q8_0 scale every 32-128 values), so it serves none of them
  exactly; it is timed on a per-row int8 matrix of the same shape as the ceiling such a kernel reaches, next to int8.
- ``compiled``: ``torch.compile`` (inductor's C++ code generation for the CPU) of the dequantize-and-matmul written
  in torch ops on the stored layout, ``(dequantized w * x[r]).sum(-1)`` for each row r of x (so that the rows share
  one pass over w): int8/int4 from their planes, the GGUF formats through the reference dequantizers of
  model/quant.py; plain weights as ``(w.float() * x[r]).sum(-1)``. ``compiled-tiles`` (int8, q8_0): the same over a
  layout repacked once so that 64 output rows lie side by side (q int8 (N / 64, K, 64), scales (N / 64, K / group,
  64): the stored bytes, moved), which inductor vectorizes across the rows, each lane a row of w, instead of along K.
- ``runtime`` (q4_0, q4_1, int4, q8_0, int8): what a CPU run now holds and calls by default, model/cpu_kernels.py's
  ``TiledWeight.linear`` with model/cpu_simd.c (AVX-512, built with the host's compiler; absent where it does not
  build): its C kernel up to 4 rows, its dequantizer and a batched GEMM above. ``inductor-tiles``: the same tiles
  with inductor's compiled kernel and dequantizer (``LLMS_CPU_KERNELS=inductor``).
- ``in-place`` (q8_0, q4_k, q6_k, int8, int4): model/cpu_kernels.py's ``BlockWeight``, model/cpu_simd.c reading the
  stored bytes where they lie, row by row along K (what a split's CPU set and a CPU run's streamed groups use).
- numba: timed only where it is installed; it is not a dependency, and is not installed here.

The table goes to stdout (markdown) and, with --json, to a file. Runs on the CPU only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import cpu_kernels, cpu_simd, quant  # noqa: E402
from runtime.env import cache_dir  # noqa: E402

PLAIN = {"fp32": torch.float32, "bf16": torch.bfloat16}
INT4PACK = ("int4", "q4_0", "q4_1", "q4_k")
ALL_FORMATS = ("fp32", "bf16", "int8", "int4", *quant.GGUF_SCHEMES)


def dram_read_gbs(mib: int = 512, reps: int = 5) -> float:
    """The DRAM read rate in GB/s: torch's float32 sum over ``mib`` MiB (torch's threads), the median of ``reps``."""
    buf = torch.ones(mib << 18, dtype=torch.float32)
    buf.sum()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t0)
    return buf.nbytes / statistics.median(times) / 1e9


def timed(calls: list, reps: int = 3, budget_s: float = 4.0) -> float:
    """Seconds per call: the median over ``reps`` sweeps of ``calls`` (each on its own copy of the weights). A slow
    candidate (it is not memory-bound) sweeps fewer copies, so that it takes about ``budget_s``, or is timed once."""
    t0 = time.perf_counter()
    calls[0]()
    first = time.perf_counter() - t0
    n = int(budget_s / reps / max(first, 1e-9))
    if n < 2:
        t0 = time.perf_counter()
        calls[1 % len(calls)]()
        return time.perf_counter() - t0
    calls = calls[:min(len(calls), n)]
    sweeps = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for c in calls:
            c()
        sweeps.append((time.perf_counter() - t0) / len(calls))
    return statistics.median(sweeps)


def random_weight(fmt: str, shape: tuple[int, int], group: int) -> torch.Tensor | quant.QuantWeight:
    """A plain matrix of N(0, 1/cols) values, or random stored bytes with N(0, 0.01) fp16 scales (finite)."""
    gen = torch.Generator().manual_seed(0)
    if fmt in PLAIN:
        return (torch.randn(shape, generator=gen) / shape[1] ** 0.5).to(PLAIN[fmt])
    g = group if fmt in quant.OURS else None
    raw = torch.randint(0, 256, (quant.storage_bytes(fmt, shape, g),), generator=gen, dtype=torch.uint8)
    n = raw.numel()
    fp16 = lambda k: (torch.randn(k, generator=gen) * 0.01).half().view(torch.uint8).view(k, 2)  # noqa: E731
    if fmt in quant.GGUF_SCHEMES:
        blocks = raw.view(-1, quant.GGML_BLOCKS[fmt][1])
        for off in quant.FP16_FIELDS[fmt]:
            blocks[:, off:off + 2] = fp16(blocks.shape[0])
    else:
        q = shape[0] * shape[1] // (1 if fmt == "int8" else 2)
        raw[q:] = fp16((n - q) // 2).view(-1)
    return quant.QuantWeight(raw, fmt, shape, g)


def stored_bytes(w) -> int:
    return w.nbytes if isinstance(w, quant.QuantWeight) else w.numel() * w.element_size()


# ---- int4pack: torch's weight-only int4 kernel over a repacked copy ------------------------------------------

def _affine_4bit(w: quant.QuantWeight) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(scale, offset) float32 (N, K / group) with value = q * scale + offset, q in 0..15, and the group."""
    n, k = w.shape
    if w.scheme == "int4":
        _, s, m = quant._parts(w.raw, "int4", w.shape, w.group)
        return s.float(), m.float(), w.group
    b = w.raw.view(-1, quant.GGML_BLOCKS[w.scheme][1])
    if w.scheme == "q4_0":
        d = quant._f16(b, 0)
        return d.view(n, -1), (-8 * d).view(n, -1), 32
    if w.scheme == "q4_1":
        return quant._f16(b, 0).view(n, -1), quant._f16(b, 2).view(n, -1), 32
    sc, mn = quant._k_scales(b)  # q4_k: 8 sub-blocks of 32 a super-block
    return (quant._f16(b, 0) * sc.float()).view(n, -1), (-(quant._f16(b, 2) * mn.float())).view(n, -1), 32


def int4pack_prepare(w: quant.QuantWeight, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(packed weights, scales and zeros (K / group, N, 2), group): the levels recovered from the reference matrix."""
    scale, offset, group = _affine_4bit(w)
    dense = w.dense().view(w.shape[0], -1, group)
    s, o = scale.unsqueeze(-1), offset.unsqueeze(-1)
    q = torch.where(s != 0, ((dense - o) / s).round(), 0).clamp(0, 15).to(torch.int32).view(w.shape)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    zeros = offset + 8 * scale
    return packed, torch.stack([scale, zeros], -1).transpose(0, 1).contiguous().to(dtype), group


# ---- compiled: inductor over torch ops ---------------------------------------------------------------------

def _rows_sum(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N, K) float32 expression times each row of x (m, K) -> (m, N), as reductions inductor fuses into one loop."""
    return torch.stack([(w * x[r]).sum(-1) for r in range(x.shape[0])], 0)


def compiled_fn(fmt: str, shape: tuple[int, int], group: int):
    n, k = shape
    if fmt in PLAIN:
        return torch.compile(lambda x, w: _rows_sum(w.float(), x), dynamic=False)
    if fmt in quant.OURS:
        def mv(x, q, s, m=None):
            v = (q if fmt == "int8" else quant._unpack4(q)).float().view(n, k // group, group) * s.float().unsqueeze(-1)
            if m is not None:
                v = v + m.float().unsqueeze(-1)
            return _rows_sum(v.view(n, k), x)
        return torch.compile(mv, dynamic=False)
    ts, deq = quant.GGML_BLOCKS[fmt][1], quant._GGUF_DEQ[fmt]
    return torch.compile(lambda x, raw: _rows_sum(deq(raw.view(-1, ts)).view(n, k), x), dynamic=False)


TILE = 64  # compiled-tiles: output rows a tile


def int8_planes(w: quant.QuantWeight) -> tuple[torch.Tensor, torch.Tensor, int]:
    """int8 or q8_0 -> (q int8 (N, K), scales fp16 (N, K / group), group): the same bytes as planes."""
    if w.scheme == "int8":
        q, s = quant._parts(w.raw, "int8", w.shape, w.group)
        return q, s, w.group
    b = w.raw.view(w.shape[0], -1, 34)
    return b[:, :, 2:].contiguous().view(torch.int8).view(w.shape), b[:, :, :2].contiguous().view(torch.float16)[
        ..., 0], 32


def tiles_prepare(w: quant.QuantWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 / q8_0 repacked so that TILE output rows lie side by side: q (N / TILE, K, TILE) int8, scales
    (N / TILE, K / group, TILE) fp16 (the same bytes as stored)."""
    q, s, _ = int8_planes(w)
    n, k = w.shape
    return (q.view(n // TILE, TILE, k).transpose(1, 2).contiguous(),
            s.view(n // TILE, TILE, -1).transpose(1, 2).contiguous())


def tiles_fn(shape: tuple[int, int], group: int):
    n, k = shape

    def mv(x, q, s):
        w = q.view(n // TILE, k // group, group, TILE).float() * s.float().unsqueeze(2)
        xs = x.view(x.shape[0], k // group, group, 1)
        return torch.stack([(w * xs[r]).sum((1, 2)) for r in range(x.shape[0])], 0).view(x.shape[0], n)
    return torch.compile(mv, dynamic=False)


def compiled_args(fmt: str, w) -> tuple:
    if fmt in PLAIN:
        return (w,)
    if fmt in quant.OURS:
        return tuple(quant._parts(w.raw, fmt, w.shape, w.group))
    return (w.raw,)


# ---- the table -------------------------------------------------------------------------------------------

def copies(make, nbytes: int, pool: int) -> list:
    """``make()`` called until the copies hold at least ``pool`` bytes (two at least)."""
    return [make() for _ in range(max(2, -(-pool // max(nbytes, 1))))]


def candidates(fmt: str, w, group: int, pool: int, compile_ok: bool) -> list[tuple]:
    """(name, [prepared per copy], note[, its own float32 matrix]) for every candidate that applies to ``fmt``; each
    prepared item is a callable x -> y; the matrix, where given, is the reference instead of ``w``'s."""
    out = []
    sb = stored_bytes(w)
    if fmt in PLAIN:
        ws = copies(lambda: w.clone(), sb, pool)
        out.append(("today", [lambda x, a=a: F.linear(x.to(a.dtype), a) for a in ws], "F.linear"))
    else:
        ws = copies(lambda: quant.QuantWeight(w.raw.clone(), w.scheme, w.shape, w.group), sb, pool)
        out.append(("today", [lambda x, a=a: a.linear(x) for a in ws], "dequantize per use + F.linear"))
        dense = w.dense()
        held = copies(lambda: dense.clone(), dense.nbytes, pool)
        out.append(("held", [lambda x, a=a: F.linear(x, a) for a in held], f"fp32 copy, {dense.nbytes / sb:.1f}x mem"))
        del dense
    if fmt in INT4PACK:
        for name, dt in (("int4pack", torch.float32), ("int4pack-bf16", torch.bfloat16)):
            packed, sz, g = int4pack_prepare(w, dt)
            ps = copies(packed.clone, packed.nbytes, pool)
            out.append((name, [lambda x, p=p, sz=sz, g=g, dt=dt: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.to(dt), p, g, sz) for p in ps], f"repacked, group {g}"))
    if fmt == "int8":
        gen = torch.Generator().manual_seed(1)
        q8 = torch.randint(-127, 128, w.shape, generator=gen, dtype=torch.int8)
        scales = torch.rand(w.shape[0], generator=gen)
        qs = copies(lambda: q8.clone(), q8.nbytes, pool)
        out.append(("int8pack", [lambda x, q=q: torch.ops.aten._weight_int8pack_mm(x, q, scales) for q in qs],
                    "per-row scales: no stored format", q8.float() * scales.unsqueeze(-1)))
    if compile_ok:
        fn = compiled_fn(fmt, w.shape, group)
        args = compiled_args(fmt, w)
        sets = copies(lambda: tuple(a.clone() for a in args), sb, pool)
        out.append(("compiled", [lambda x, s=s, fn=fn: fn(x, *s) for s in sets], "inductor, stored layout"))
    lib = cpu_simd.library(cache_dir() / "cpu-kernels")
    if lib is not None and fmt in cpu_kernels.SIMD_SCHEMES:
        ts = copies(lambda: cpu_kernels.tile(w, lib), sb, pool)
        out.append(("runtime", [lambda x, t=t: t.linear(x) for t in ts], "model/cpu_simd.c, what a run holds"))
    if lib is not None and fmt in cpu_simd.BLOCKS:
        bs = copies(lambda: cpu_kernels.BlockWeight(quant.QuantWeight(w.raw.clone(), w.scheme, w.shape, w.group),
                                                    lib), sb, pool)
        out.append(("in-place", [lambda x, b=b: b.linear(x) for b in bs], "model/cpu_simd.c, the stored bytes"))
    if compile_ok and fmt in cpu_kernels.SCHEMES:
        ts = copies(lambda: cpu_kernels.tile(w), sb, pool)
        out.append(("inductor-tiles", [lambda x, t=t: t.linear(x) for t in ts], "model/cpu_kernels.py, inductor's"))
    if compile_ok and fmt in ("int8", "q8_0") and w.shape[0] % TILE == 0:
        fn = tiles_fn(w.shape, group if fmt == "int8" else 32)
        q, s = tiles_prepare(w)
        sets = copies(lambda: (q.clone(), s.clone()), sb, pool)
        out.append(("compiled-tiles", [lambda x, s=s, fn=fn: fn(x, *s) for s in sets],
                    f"inductor, repacked {TILE}-row tiles"))
    return out


def reference(w, x: torch.Tensor) -> torch.Tensor:
    dense = w.float() if isinstance(w, torch.Tensor) else w.dense()
    return F.linear(x, dense)


def run_format(fmt: str, shape: tuple[int, int], rows: list[int], group: int, pool: int, compile_ok: bool,
               results: list[dict]) -> None:
    torch._dynamo.reset()  # a fresh compile cache per format and shape (dynamo's recompile limit)
    w = random_weight(fmt, shape, group)
    sb = stored_bytes(w)
    dram = dram_read_gbs()
    cands = candidates(fmt, w, group, pool, compile_ok)
    for m in rows:
        x = torch.randn(m, shape[1], generator=torch.Generator().manual_seed(m))
        ref = reference(w, x)
        for name, calls, note, *own in cands:
            t0 = time.perf_counter()
            y = calls[0](x).float().view(m, shape[0])
            first = time.perf_counter() - t0
            r = F.linear(x, own[0]) if own else ref
            err = ((y - r).abs().max() / r.abs().max()).item()
            sec = timed([lambda c=c, x=x: c(x) for c in calls])
            gbs = sb / sec / 1e9
            res = {"threads": torch.get_num_threads(), "format": fmt + (f" g{group}" if fmt in quant.OURS else ""),
                   "shape": f"{shape[0]}x{shape[1]}", "rows": m, "candidate": name, "ms": sec * 1e3, "gbs": gbs,
                   "dram_gbs": dram, "pct_dram": 100 * gbs / dram, "rel_err": err, "first_call_s": first, "note": note}
            results.append(res)
            print(f"| {res['threads']} | {res['format']} | {res['shape']} | {m} | {name} | {sec * 1e3:.2f} | "
                  f"{gbs:.2f} | {res['pct_dram']:.0f}% | {err:.1e} | {note} |", flush=True)
    del cands


def print_pivot(results: list[dict]) -> None:
    """One line per thread count, format, shape and row count, one column per candidate: GB/s of stored bytes (% of
    DRAM); a result outside the 1e-5 bar is marked *."""
    order = ("today", "held", "runtime", "in-place", "inductor-tiles", "compiled", "compiled-tiles", "int4pack",
             "int4pack-bf16", "int8pack")
    names = [n for n in order if any(r["candidate"] == n for r in results)]
    print("\n| threads | format | N x K | rows | " + " | ".join(names) + " |")
    print("|---|---|---|---|" + "---|" * len(names))
    lines: dict[tuple, dict] = {}
    for r in results:
        lines.setdefault((r.get("threads", "-"), r["format"], r["shape"], r["rows"]), {})[r["candidate"]] = r
    for (threads, fmt, shape, m), got in lines.items():
        cells = [f"{got[n]['gbs']:.2f} ({got[n]['pct_dram']:.0f}%){'*' if got[n]['rel_err'] > 1e-5 else ''}"
                 if n in got else "-" for n in names]
        print(f"| {threads} | {fmt} | {shape} | {m} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="4096x4096,14336x4096", help="N x K of the weight (rows x cols)")
    p.add_argument("--rows", default="1,4,8", help="rows of activations")
    p.add_argument("--formats", default=",".join(ALL_FORMATS))
    p.add_argument("--group", type=int, default=64, choices=quant.GROUP_SIZES, help="int8/int4 group size")
    p.add_argument("--threads", default=None, help="torch thread counts, e.g. 1,16 (default: torch's)")
    p.add_argument("--pool-mb", type=int, default=384, help="copies of each weight rotated through, in MB")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile candidate")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    a = p.parse_args(argv)
    threads = [int(t) for t in a.threads.split(",")] if a.threads else [torch.get_num_threads()]
    torch._dynamo.config.recompile_limit = 64
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    rows = [int(r) for r in a.rows.split(",")]
    formats = a.formats.split(",")
    for f in formats:
        if f not in ALL_FORMATS:
            raise SystemExit(f"--formats: unknown format {f!r} (allowed: {', '.join(ALL_FORMATS)})")
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}; numba: "
          f"{'installed (no kernels written yet)' if importlib.util.find_spec('numba') else 'not installed, skipped'}")
    results: list[dict] = []
    drams = {}
    for t in threads:  # inductor fixes a kernel's thread count when it compiles it: everything is redone per count
        torch.set_num_threads(t)
        drams[t] = dram_read_gbs()
        print(f"\n{t} threads: DRAM read (float32 sum over 512 MiB) {drams[t]:.1f} GB/s\n")
        print("| threads | format | N x K | rows | candidate | ms | GB/s of stored bytes | % of DRAM | max rel err | "
              "note |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for shape in shapes:
            for fmt in formats:
                run_format(fmt, shape, rows, a.group, a.pool_mb << 20, not a.no_compile, results)
        print(f"\nDRAM read at the end: {dram_read_gbs():.1f} GB/s ({drams[t]:.1f} at the start); % of DRAM uses "
              f"the rate measured just before each format.")
    print_pivot(results)
    if a.json:
        a.json.write_text(json.dumps({"dram_gbs": drams, "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
