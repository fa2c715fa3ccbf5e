"""The dequantization kernels of model/quant_triton.py: speed against the GPU's memory rate, exactness against
the torch-ops path; the GGUF formats' fused matmul (model/quant_gemv.py) against the memory rate and against
dequantize-then-matmul; and the quantizers' reconstruction error against gguf's on the embedded SmolLM2.

    python benchmarks/quant_kernels.py [--shape 8192 28672] [--groups 32,64,128]   # CUDA
    python benchmarks/quant_kernels.py --gemv [--schemes q4_k,q6_k] [--sweep]       # CUDA
    python benchmarks/quant_kernels.py --gemv-grid [--grid-all]                    # CUDA
    python benchmarks/quant_kernels.py --interpret-check [--shape 64 512]          # CPU, Triton's interpreter
    python benchmarks/quant_kernels.py --quality                                   # CPU, SmolLM2's weights

On CUDA, for every scheme (int8/int4 once per group) it fills a matrix of random storage bytes (random finite
fp16 scales), times ``quant.dequantize`` to bf16 into a preallocated output (triton.testing.do_bench, median),
and prints GB/s of storage read plus output written next to the HBM rate a large device-to-device copy
reaches in the same run; then checks the kernels' float32 output against the torch-ops path bit for bit and
their bf16 output against that cast. ``--interpret-check`` runs the same checks with TRITON_INTERPRET=1 on CPU
tensors (small shapes; the times are the interpreter's).

``--gemv``: for every GGUF format, 8B- and 70B-shaped matrices (the attention's wq/wo and wk/wv, the FFN's
w1/w3 and w2, the output) and 1, 4 and 16 rows of bf16 x, the fused kernel's time (do_bench, median: L2 flushed
between calls, so the blocks come from HBM), its GB/s of the blocks' bytes and their share of the device copy's
rate, the launch launch_config chose, the time of dequantize (into a preallocated bf16 buffer) + F.linear and
the ratio of the two, and the largest error against float32 F.linear of the dequantized matrix on 256 rows
relative to the largest value (the tolerance the tests state is exact per value; this is a sanity check).
``--sweep`` then times other launches on a few cases (q4_k, q6_k, q8_0; 8B wq/wo and w1/w3, 70B wk/wv and w2) and
prints the best next to launch_config's choice. ``--gemv-grid``: one row of bf16 x on the large Q4_K and Q6_K
matrices, every launch of rows of w a program (2-8), chunks a step (32-128) and warps (1-4), with the exact
products and with the factored ones (model/quant_gemv.py FACTOR): the best of each and launch_config's.
``--quality`` prints the reconstruction MSE of our int4/int8 and gguf's Q4_1/Q4_0/Q8_0 on SmolLM2's tensors
dequantized to float32.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

def random_raw(quant, torch, scheme: str, shape: tuple[int, int], group: int | None, device: str):
    """Random storage bytes with fp16 fields drawn as N(0, 0.01) (finite)."""
    gen = torch.Generator(device=device).manual_seed(0)
    n = quant.storage_bytes(scheme, shape, group)
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, device=device, generator=gen)
    fp16 = lambda k: (torch.randn(k, device=device, generator=gen) * 0.01).half().view(torch.uint8).view(k, 2)
    if scheme in quant.GGUF_SCHEMES:
        ts = quant.storage_bytes(scheme, (1, quant.block_size(scheme)))
        blocks = raw.view(-1, ts)
        for off in quant.FP16_FIELDS[scheme]:
            blocks[:, off:off + 2] = fp16(blocks.shape[0])
    else:
        q = shape[0] * shape[1] // (1 if scheme == "int8" else 2)
        raw[q:] = fp16((n - q) // 2).view(-1)
    return raw


def cases(quant, groups: list[int]) -> list[tuple[str, int | None]]:
    return [(s, None) for s in quant.GGUF_SCHEMES] + [(s, g) for s in ("int8", "int4") for g in groups]


def check(quant, torch, kernels, scheme, group, shape, device) -> tuple[object, bool, bool, object]:
    """(raw, float32 bit-exact, bf16 exact, bf16 output buffer) of the kernels against the torch-ops path."""
    raw = random_raw(quant, torch, scheme, shape, group, device)
    parts = [p.contiguous() for p in quant._parts(raw, scheme, shape, group)]
    ref = torch.empty(shape, dtype=torch.float32, device=device)
    quant._into_torch(parts, scheme, group, ref)
    got = torch.empty(shape, dtype=torch.float32, device=device)
    kernels.dequantize_into(scheme, parts, group, got)
    exact32 = torch.equal(got.view(torch.int32), ref.view(torch.int32))
    del got
    bf = torch.empty(shape, dtype=torch.bfloat16, device=device)
    kernels.dequantize_into(scheme, parts, group, bf)
    exact16 = torch.equal(bf.view(torch.int16), ref.to(torch.bfloat16).view(torch.int16))
    return raw, exact32, exact16, bf


def row(scheme, group, shape, nbytes, ms, hbm, e32, e16) -> str:
    written = shape[0] * shape[1] * 2
    rate = (nbytes + written) / ms / 1e6
    pct = f"{100 * rate / hbm:5.1f}" if hbm else "    -"
    return (f"{scheme:6} {group or '':>5} {nbytes / 1e6:9.1f} {written / 1e6:9.1f} {ms:9.3f} {rate:8.1f} {pct:>6} "
            f"{'yes' if e32 else 'NO':>5} {'yes' if e16 else 'NO':>5}")


HEADER = (f"{'scheme':6} {'group':>5} {'read MB':>9} {'write MB':>9} {'ms':>9} {'GB/s':>8} {'%HBM':>6} {'fp32=':>5} "
          f"{'bf16=':>5}")


def hbm_rate(torch, do_bench) -> float:
    """GB/s (read + write) of a 2 GiB device-to-device copy."""
    src = torch.empty(1 << 31, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / do_bench(lambda: dst.copy_(src), return_mode="median") / 1e6


def bench_case(quant, torch, do_bench, scheme, group, shape, hbm) -> tuple[str, bool]:
    from model import quant_triton

    raw, e32, e16, out = check(quant, torch, quant_triton, scheme, group, shape, "cuda")
    ms = do_bench(lambda: quant.dequantize(raw, scheme, shape, group, torch.bfloat16, out=out), return_mode="median")
    return row(scheme, group, shape, raw.numel(), ms, hbm, e32, e16), e32 and e16


def bench_cuda(args) -> int:
    import torch
    from triton.testing import do_bench

    from model import quant

    shape = tuple(args.shape)
    hbm = hbm_rate(torch, do_bench)
    torch.cuda.empty_cache()
    print(f"{torch.cuda.get_device_name()}: device copy {hbm:.0f} GB/s (read + write); shape {shape}, bf16 out")
    print(HEADER)
    bad = 0
    for scheme, group in cases(quant, args.groups):
        line, ok = bench_case(quant, torch, do_bench, scheme, group, shape, hbm)
        print(line, flush=True)
        bad += not ok
        torch.cuda.empty_cache()
    return 1 if bad else 0


# ---- the GGUF formats' fused matmul ---------------------------------------------------------------------

GEMV_SHAPES = [("8B", "wq wo", 4096, 4096), ("8B", "wk wv", 1024, 4096), ("8B", "w1 w3", 14336, 4096),
               ("8B", "w2", 4096, 14336), ("8B", "output", 128256, 4096), ("70B", "wq wo", 8192, 8192),
               ("70B", "wk wv", 1024, 8192), ("70B", "w1 w3", 28672, 8192), ("70B", "w2", 8192, 28672),
               ("70B", "output", 128256, 8192)]
GEMV_ROWS = (1, 4, 16)
SWEEP = [("q4_k", 0), ("q4_k", 2), ("q4_k", 6), ("q4_k", 8), ("q6_k", 0), ("q6_k", 8), ("q8_0", 2), ("q8_0", 6)]
GEMV_HEADER = (f"{'scheme':6} {'model':5} {'matrix':7} {'rows x cols':>13} {'m':>3} {'MB':>7} {'launch':>15} "
               f"{'fused us':>9} {'GB/s':>6} {'%copy':>6} {'deq+mm us':>10} {'ratio':>6} {'err':>8}")


def describe(lc) -> str:
    """A launch in a few characters: FMA rows of w a program, or DOT rows of x a program; the split."""
    way = f"DOT m{lc.block_m} n{lc.block_n}" if lc.dot else f"FMA n{lc.block_n}"  # rows of x, of w
    return way + (f" s{lc.split}" if lc.split > 1 else "")


def gemv_case(torch, quant, gemv, do_bench, raw, qw, buf, m, hbm) -> str:
    """One row of the --gemv table: the fused kernel and dequantize + matmul on bf16 x of m rows."""
    scheme, (n, k) = qw.scheme, qw.shape
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    lc = gemv.launch_config(scheme, m, n, k, False, torch.cuda.get_device_properties(0).multi_processor_count)
    fused = do_bench(lambda: gemv.gguf_matmul(x, scheme, raw, n, k), return_mode="median")
    dense = do_bench(lambda: torch.nn.functional.linear(x, qw.dense(torch.bfloat16, out=buf)), return_mode="median")
    rows = torch.arange(min(n, 256), device="cuda")
    ref = torch.nn.functional.linear(x.float(), quant.dequantize_rows(raw, scheme, (n, k), None, rows))
    err = ((gemv.gguf_matmul(x, scheme, raw, n, k)[:, :len(rows)].float() - ref).abs().max() / ref.abs().max())
    rate = raw.numel() / fused / 1e6
    return (f"{describe(lc):>15} {fused * 1e3:9.1f} {rate:6.0f} {100 * rate / hbm:6.1f} {dense * 1e3:10.1f} "
            f"{dense / fused:6.2f} {err.item():8.1e}")


def bench_gemv(args) -> int:
    import functools

    import torch
    from triton import testing

    from model import quant, quant_gemv

    hbm = hbm_rate(torch, testing.do_bench)
    do_bench = functools.partial(testing.do_bench, warmup=10, rep=50)  # ms each: some 700 timings in all
    torch.cuda.empty_cache()
    print(f"{torch.cuda.get_device_name()}: device copy {hbm:.0f} GB/s (read + write); x bf16; GB/s: the blocks' bytes "
          f"over the fused kernel's time; ratio: dequantize + matmul's time over the fused kernel's")
    print(GEMV_HEADER)
    for scheme in args.schemes:
        for model, name, n, k in GEMV_SHAPES:
            raw = random_raw(quant, torch, scheme, (n, k), None, "cuda")
            qw = quant.QuantWeight(raw, scheme, (n, k))
            buf = torch.empty(n * k, dtype=torch.bfloat16, device="cuda")
            for m in GEMV_ROWS:
                line = gemv_case(torch, quant, quant_gemv, do_bench, raw, qw, buf, m, hbm)
                print(f"{scheme:6} {model:5} {name:7} {f'{n} x {k}':>13} {m:3} {raw.numel() / 1e6:7.1f} {line}",
                      flush=True)
            del raw, qw, buf
            torch.cuda.empty_cache()
    if args.sweep:
        sweep(torch, quant, quant_gemv, do_bench)
    return 0


def alternatives(gemv, m: int) -> list:
    """The launches --sweep tries for m rows of bf16 x."""
    if m == 1:
        return [gemv.Launch(False, bn, 1, 32, 1, s) for bn in (1, 2, 4, 8) for s in (1, 2, 4)]
    shapes = [(64, 64, 16, 4), (64, 32, 16, 2)]  # (rows of x, rows of w, chunks, warps)
    if m <= 16:
        shapes += [(16, 64, 16, 4), (16, 32, 16, 2), (16, 16, 16, 1)]
    return [gemv.Launch(True, bn, bm, nc, w, s) for bm, bn, nc, w in shapes for s in (1, 2, 4)]


def time_launches(gemv, do_bench, x, raw, scheme: str, shape: tuple[int, int], launches) -> dict:
    """Median time (ms) of each launch; one that fails (as a launch the compiler cannot fit might) is reported and
    left out."""
    times = {}
    for lc in launches:
        try:
            times[lc] = do_bench(lambda lc=lc: gemv.gguf_matmul(x, scheme, raw, *shape, lc), return_mode="median")
        except Exception as e:  # noqa: BLE001  (a sweep goes on past one launch)
            print(f"sweep: {scheme} {shape} {lc} failed: {str(e).splitlines()[-1][:200]}", flush=True)
    return times


def sweep(torch, quant, gemv, do_bench) -> None:
    """Other launches than launch_config's on a few cases: the best of them against the chosen one."""
    print(f"\nsweep: {'scheme':6} {'model':5} {'matrix':7} {'m':>3} {'chosen':>15} {'us':>7} {'best':>21} {'us':>7}")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for scheme, i in SWEEP:
        model, name, n, k = GEMV_SHAPES[i]
        raw = random_raw(quant, torch, scheme, (n, k), None, "cuda")
        for m in GEMV_ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            chosen = gemv.launch_config(scheme, m, n, k, False, sms)
            steps = -(-(k // gemv.BLOCKS[scheme][2]) // chosen.chunks)
            tried = [lc for lc in {chosen, *alternatives(gemv, m)} if lc.split <= steps]
            t = time_launches(gemv, do_bench, x, raw, scheme, (n, k), tried)
            best = min(t, key=t.get)
            print(f"sweep: {scheme:6} {model:5} {name:7} {m:3} {describe(chosen):>15} {t[chosen] * 1e3:7.1f} "
                  f"{describe(best) + f' c{best.chunks} w{best.warps}':>21} {t[best] * 1e3:7.1f}", flush=True)
        del raw
        torch.cuda.empty_cache()

GRID_CASES = [("q4_k", 7), ("q4_k", 8), ("q4_k", 9), ("q4_k", 2), ("q6_k", 8), ("q6_k", 9)]


def grid_launches(gemv, scheme: str, k: int) -> list:
    """--gemv-grid's one-row launches: exact and factored products, rows of w a program, chunks a step and warps."""
    n_chunks = k // gemv.BLOCKS[scheme][2]
    shapes = [(32, 1), (64, 1), (64, 2), (128, 4)]  # (chunks, warps)
    return [gemv.Launch(False, bn, 1, nc, w, 1, f) for f in (False, True) for bn in (2, 4, 8)
            for nc, w in shapes if nc <= n_chunks]


def gemv_grid(args) -> int:
    """One row of bf16 x, the large matrices: GB/s of every launch of grid_launches, the best of each way."""
    import concurrent.futures
    import functools

    import torch
    from triton import testing

    from model import quant
    from model import quant_gemv as gemv

    hbm = hbm_rate(torch, testing.do_bench)
    do_bench = functools.partial(testing.do_bench, warmup=10, rep=40)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}: device copy {hbm:.0f} GB/s; one row of bf16 x; GB/s of blocks", flush=True)
    t0 = time.perf_counter()
    todo = {(s, lc) for s, i in GRID_CASES for lc in grid_launches(gemv, s, GEMV_SHAPES[i][3])}
    small = {s: random_raw(quant, torch, s, (64, 2048), None, "cuda") for s, _ in GRID_CASES}
    xs = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)

    def compile_one(case):  # the sizes are not specialized: a small matrix compiles the launch for every size
        s, lc = case
        try:
            gemv.gguf_matmul(xs, s, small[s], 64, 2048, lc)
        except Exception as e:  # noqa: BLE001  (a grid goes on past one launch)
            print(f"grid: {s} {lc} failed: {str(e).splitlines()[-1][:200]}", flush=True)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:  # ptxas runs as a process: compiles overlap
        list(pool.map(compile_one, sorted(todo, key=str)))
    torch.cuda.synchronize()
    print(f"grid: {len(todo)} launches compiled in {time.perf_counter() - t0:.0f} s", flush=True)
    for scheme, i in GRID_CASES:
        model, name, n, k = GEMV_SHAPES[i]
        raw = random_raw(quant, torch, scheme, (n, k), None, "cuda")
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = torch.nn.functional.linear(x.float(), quant.dequantize_rows(raw, scheme, (n, k), None,
                                                                           torch.arange(256, device="cuda")))
        chosen = gemv.launch_config(scheme, 1, n, k, False, sms)
        launches = grid_launches(gemv, scheme, k)
        t = time_launches(gemv, do_bench, x, raw, scheme, (n, k), [chosen, *launches])
        rate = {lc: raw.numel() / ms / 1e6 for lc, ms in t.items()}
        for f in (False, True):
            mine = {lc: r for lc, r in rate.items() if lc.factor == f and lc in launches}
            if not mine:
                continue
            best = max(mine, key=mine.get)
            y = gemv.gguf_matmul(x, scheme, raw, n, k, best)[:, :256].float()
            err = ((y - ref).abs().max() / ref.abs().max()).item()
            top = sorted(mine.values(), reverse=True)[:4]
            print(f"grid: {scheme:5} {model:4} {name:7} {'factored' if f else 'exact':8} best n{best.block_n} "
                  f"c{best.chunks} w{best.warps}: {mine[best]:6.0f} GB/s ({100 * mine[best] / hbm:4.1f}% copy), "
                  f"err {err:.1e}; next {' '.join(f'{r:.0f}' for r in top[1:])}", flush=True)
        print(f"grid: {scheme:5} {model:4} {name:7} chosen  {describe(chosen)} f{int(chosen.factor)}: "
              f"{rate.get(chosen, 0):6.0f} GB/s", flush=True)
        if args.grid_all:
            for lc, r in sorted(rate.items(), key=lambda kv: -kv[1]):
                print(f"grid-all: {scheme} {model} {name} f{int(lc.factor)} n{lc.block_n} c{lc.chunks} "
                      f"w{lc.warps} s{lc.split} {r:.0f}")
        del raw
        torch.cuda.empty_cache()
    return 0


def interpret_check(args) -> int:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    from model import quant, quant_triton

    shape = tuple(args.shape)
    print(f"Triton interpreter on CPU tensors; shape {shape}; ms are the interpreter's")
    print(HEADER)
    bad = 0
    for scheme, group in cases(quant, args.groups):
        raw, e32, e16, out = check(quant, torch, quant_triton, scheme, group, shape, "cpu")
        parts = [p.contiguous() for p in quant._parts(raw, scheme, shape, group)]
        t = time.perf_counter()
        quant_triton.dequantize_into(scheme, parts, group, out)
        print(row(scheme, group, shape, raw.numel(), (time.perf_counter() - t) * 1e3, 0, e32, e16), flush=True)
        bad += not (e32 and e16)
    return 1 if bad else 0


def quality(args) -> int:
    import gguf
    import torch

    from model import quant
    from runtime.format.embedded import embedded_gguf

    kinds = {gguf.GGMLQuantizationType.Q4_1: "layers (Q4_1)", gguf.GGMLQuantizationType.Q8_0: "embedding (Q8_0)"}
    pairs = [("int4", 32, "q4_1"), ("int4", 64, "q4_0"), ("int8", 32, "q8_0")]
    sums: dict[tuple[str, str], list[float]] = {}
    exact = {}
    for t in gguf.GGUFReader(embedded_gguf()).tensors[::args.every]:
        if t.tensor_type not in kinds:
            continue
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))
        for ours, group, theirs in pairs:
            for name, scheme, g in ((f"{ours} g{group}", ours, group), (theirs, theirs, None)):
                y = quant.dequantize(quant.quantize(w, scheme, g), scheme, w.shape, g)
                acc = sums.setdefault((kinds[t.tensor_type], name), [0.0, 0])
                acc[0] += (y.double() - w.double()).square().sum().item()
                acc[1] += w.numel()
                if name == "int4 g32":
                    exact[kinds[t.tensor_type]] = exact.get(kinds[t.tensor_type], True) and torch.equal(y, w)
    print(f"{'tensors':18} {'scheme':10} {'MSE':>12}")
    for (kind, name), (err, n) in sums.items():
        print(f"{kind:18} {name:10} {err / n:12.4e}")
    for kind, ok in exact.items():
        print(f"int4 g32 reproduces the {kind} tensors exactly: {ok}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=2, metavar=("ROWS", "COLS"))
    ap.add_argument("--groups", type=lambda s: [int(g) for g in s.split(",")], default=[32, 64, 128])
    ap.add_argument("--interpret-check", action="store_true", help="Triton's interpreter on CPU tensors")
    ap.add_argument("--gemv", action="store_true", help="the GGUF formats' fused matmul (CUDA)")
    ap.add_argument("--schemes", type=lambda s: [x for x in s.split(",") if x],
                    default=["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"],
                    help="--gemv: formats of the table (none: the sweep only)")
    ap.add_argument("--gemv-grid", action="store_true",
                    help="CUDA: one-row launches of the GGUF matmul (exact and factored products, rows, chunks, "
                         "warps) on the large matrices of the 8B and 70B shapes")
    ap.add_argument("--grid-all", action="store_true", help="--gemv-grid: print every launch's GB/s")
    ap.add_argument("--sweep", action="store_true", help="--gemv: also time other launches on a few cases")
    ap.add_argument("--quality", action="store_true", help="reconstruction MSE on the embedded SmolLM2")
    ap.add_argument("--every", type=int, default=1, help="--quality: every N-th tensor only")
    args = ap.parse_args()
    if args.quality:
        return quality(args)
    if args.gemv_grid:
        return gemv_grid(args)
    if args.gemv:
        return bench_gemv(args)
    if args.interpret_check:
        args.shape = args.shape or [64, 512]
        return interpret_check(args)
    args.shape = args.shape or [8192, 28672]
    return bench_cuda(args)


if __name__ == "__main__":
    sys.exit(main())
