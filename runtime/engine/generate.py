"""Token generation and perplexity over any weight source.

A *weight source* (runtime/engine/weights.py ``WeightSource``) supplies each group's weights by name
(``source.get(group) -> {local name: tensor}``) on ``source.device`` in ``source.dtype``; the in-memory
source is ``InMemoryWeights``, the streamed one ``runtime.engine.streamed.StreamedWeights``. Generation is
the same code for every mode: prefill the prompt in chunks, then decode one token per forward pass,
sampling with temperature / top-p from a seeded generator, stopping on the tokenizer's end tokens. Where every
weight is resident on a CUDA device, the decode steps replay CUDA graphs (runtime/engine/graphs.py,
``--cuda-graphs``). Runs in the client (GPU) process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from model.errors import ConfigError
from model.groups import group_names, group_tensor_shapes, host_layer_count
from model.passes import DictSource, forward_groups
from model.quant import warm_up as warm_up_quant
from model.transformer import Queries, Rope, RowQueries, TreeQueries
from runtime.engine.batching import chunk_per_sequence, kv_device_rows, prefill_passes, sequences_per_pass
from runtime.engine.config import EngineConfig, KVConfig, PrefillConfig, SamplingConfig
from runtime.engine.graphs import StaticDecode, applies
from runtime.engine.kv import KVCache, TieredKVCache
from runtime.engine.threads import ComputeThreads
from runtime.engine.weights import WeightSource


def pick_device(name: str | None) -> torch.device:
    """--device: cuda where there is one, else cpu; cuda without one refused."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available to this process")
    return torch.device(name)


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    token_ms: list[float] = field(default_factory=list)  # wall time of each decode step
    stop_reason: str = "length"
    cached_tokens: int = 0  # prompt tokens whose KV entries were reused, not prefilled (runtime/engine/prefix.py)
    batched: int = 1  # the most sequences one of its weight passes served (runtime/engine/scheduler.py)
    speculative: dict | None = None  # its decode passes with a draft (runtime/engine/scheduler.py)

    def timings(self) -> dict:
        n = len(self.output_token_ids)
        decode_steps = max(n - 1, 0)
        return {"prefill_ms": self.prefill_ms, "ttft_ms": self.prefill_ms, "decode_ms": self.decode_ms,
                "decode_tokens": decode_steps,
                "decode_tok_s": decode_steps / (self.decode_ms / 1e3) if self.decode_ms > 0 else None,
                "e2e_ms": self.prefill_ms + self.decode_ms, "token_ms": self.token_ms}


def padding(pad: Sequence[int], device: torch.device) -> torch.Tensor | None:
    """``Queries.pad`` of a left-padded batch whose sequence b has pad[b] leading slots without a token; None where
    none has any (its passes then take the unmasked, plainly causal kernels)."""
    return torch.tensor(pad, dtype=torch.long, device=device) if any(pad) else None


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The index of each row's largest logit (the first of equal ones), as ``argmax(-1)``: by ``max``, which gives
    the same index and on the CPU takes a third of argmax's time (49152 logits: 25 against 73 us)."""
    return logits.max(-1).indices


def sample(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator) -> torch.Tensor:
    """logits (B, vocab) fp32 -> token ids (B,). Greedy at temperature 0, else a draw from ``filtered``."""
    if cfg.temperature == 0:
        return greedy(logits)
    sorted_p, idx = filtered(logits, cfg)
    choice = torch.multinomial(sorted_p.cpu(), 1, generator=gen).to(idx.device)  # (B, 1)
    return idx.gather(-1, choice).squeeze(-1)


def filtered(logits: torch.Tensor, cfg: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The distribution a temperature > 0 draws from, as HF's and vLLM's warpers define it: softmax(logits / T)
    sorted (probabilities (B, vocab) descending, not renormalised, and their token ids); then ``top_k`` keeps the
    k most likely; ``top_p`` the smallest prefix whose mass reaches top_p of what top_k kept; ``min_p`` the
    tokens at least min_p times as likely as the most likely. The rest are 0."""
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    if cfg.top_k:
        sorted_p[..., cfg.top_k:] = 0.0
        drop = sorted_p.cumsum(-1) - sorted_p > cfg.top_p * sorted_p.sum(-1, keepdim=True)
    else:
        drop = sorted_p.cumsum(-1) - sorted_p > cfg.top_p  # keep the smallest prefix whose mass reaches top_p
    if cfg.min_p:
        drop |= sorted_p < cfg.min_p * sorted_p[..., :1]
    return sorted_p.masked_fill(drop, 0.0), idx


def warm_up(args, dtype: torch.dtype, device: torch.device, tokens: int, formats=()) -> None:
    """Run the model's code once on one layer of uninitialised weights (its attention's real shapes, a
    narrower FFN, a 256-token vocabulary): a prefill of ``tokens`` and a decode step. In a fresh process the
    first pass pays for loading CUDA's libraries and kernels (cuBLAS handles, lazily loaded modules: about
    0.5 s on the H100 machine); ``runtime.engine`` runs this in a thread while the ring is registered, so that
    cost leaves the critical path. It runs on the default stream, as the passes will: cuBLAS keeps a workspace
    for every stream it ran on for the life of the process. The outputs are discarded (the weights may hold
    NaN). ``formats``: the (scheme, group) pairs of the image's quantized tensors, whose kernels (Triton's,
    compiled on first use: the dequantizer, the GGUF formats' fused matmul) are run once too."""
    import dataclasses

    if device.type != "cuda":
        return
    for scheme, group in sorted(set(formats), key=str):
        warm_up_quant(scheme, group, dtype, device)
    torch.backends.cuda.enable_cudnn_sdp(False)  # as Generator: the kernel the passes will use
    # the FFN narrowed to 2048 (a mixture's: at most 8 experts, its shared expert narrowed too): the warm-up must fit
    # beside the GPU tier being copied meanwhile
    small = dataclasses.replace(args, n_layers=1, vocab_size=256, ffn_hidden=min(args.ffn_hidden, 2048),
                                shared_ffn_hidden=min(args.shared_ffn_hidden, 2048),
                                n_experts=min(args.n_experts, 8), n_experts_used=min(args.n_experts_used, 8))
    with torch.inference_mode():
        groups = {g: {k: torch.empty(shape, dtype=dtype, device=device)
                      for k, shape in group_tensor_shapes(small, g).items()} for g in group_names(small)}
        rope, cache = Rope(small, tokens + 1, device), KVCache(small, 1, tokens + 1, dtype, device)
        ids = torch.zeros((1, tokens), dtype=torch.long, device=device)
        forward_groups(ids, Queries(0), small, DictSource(groups), rope, cache, last_only=True)
        forward_groups(ids[:, :1], Queries(tokens), small, DictSource(groups), rope, cache, last_only=True)
        torch.cuda.current_stream(device).synchronize()


class Generator:
    """Runs forward passes over a weight source with one KV cache sized for the longest request."""

    def __init__(self, source: WeightSource, max_seq_len: int, kv: KVConfig | None = None,
                 prefill: PrefillConfig | None = None, offload: bool = False,
                 threads: ComputeThreads | None = None, profile_attention: bool = False,
                 cuda_graphs: bool = False) -> None:
        """``kv``: the KV cache's blocks, top-k decode attention and host attention (runtime/engine/kv.py);
        ``prefill``: prompt tokens per weight pass, and whether an offloaded batch goes whole prompts at a time
        (``_prefill``). ``offload``: the KV cache lives in DRAM, two layers at a time on the device
        (TieredKVCache), the plan's decision (runtime.engine.source.plan_with_kv); only then do the host-attention
        layers attend on the CPU. ``threads``: refreshed once a pass (the CPU's share of this run).
        ``profile_attention``: time decode attention (``attn_time_ms``; synchronises). ``cuda_graphs``: where
        the source and cache allow (runtime.engine.graphs.applies), ``generate`` and ``generate_batch`` decode
        by replaying CUDA graphs (``static``)."""
        self.kv, self.prefill, self.kv_offload = kv or KVConfig(), prefill or PrefillConfig(), offload
        # layers attended on the host; only an offloaded cache lives there
        self.host_layers = host_layer_count(self.kv.host_attention, source.args.n_layers) if offload else 0
        self.profile_attention = profile_attention
        self.threads = threads
        self.prefilled_by_sequence = False  # how the latest batch was prefilled (_prefill)
        self.cache_alloc_ms = 0.0  # how long the latest cache took to allocate (pinned host memory: seconds)
        self.cache: KVCache | None = None  # the latest cache; the counters of earlier ones are folded into:
        self.folded = self._counters(None)
        self.source, self.args = source, source.args
        self.parallel = None  # a tensor-parallel rank's collectives (runtime/engine/tensor_parallel.py)
        self.args.check_context(max_seq_len)
        self.max_seq_len = max_seq_len
        self.rope = Rope(self.args, max_seq_len, source.device)
        if source.device.type == "cuda":
            # cuDNN's attention builds a graph for every new key length: tens of ms per decode step.
            torch.backends.cuda.enable_cudnn_sdp(False)
        # the decode steps at static shapes, or None: eager (a test may set one with capture=False)
        self.static: StaticDecode | None = StaticDecode(self) if cuda_graphs and applies(self) else None

    def new_cache(self, batch: int = 1, slots: int | None = None) -> KVCache:
        """A cache of ``batch`` sequences of ``slots`` slots (default max_seq_len)."""
        self._fold()  # the previous cache is dropped here (only its counters are kept): no KV memory piles up
        kw = {"host_attention": self.host_layers} if self.host_layers else {}
        if self.kv_offload:
            kw["device_rows"] = kv_device_rows(batch, self.max_seq_len, self.prefill.chunk, self.prefill.by_sequence,
                                               self.host_layers, self.args.n_layers)
        cls = TieredKVCache if self.kv_offload else KVCache
        t0 = time.perf_counter()
        cache = cls(self.args, batch, slots or self.max_seq_len, self.source.dtype, self.source.device,
                    block_tokens=self.kv.block_tokens, topk_blk=self.kv.topk_blk, **kw)
        self.cache_alloc_ms = (time.perf_counter() - t0) * 1e3  # in a batch's prefill time; the bench reports it
        cache.profile = self.profile_attention
        self.cache = cache
        return cache

    def _request_cache(self, batch: int, static: StaticDecode | None, pad: torch.Tensor | None = None) -> KVCache:
        """generate's and generate_batch's cache: a new one, or the static decode's, kept for the run (its graphs
        hold its addresses; its counters stay 0: it is never offloaded nor profiled)."""
        if static is None:
            return self.new_cache(batch)
        self._fold()
        t0 = time.perf_counter()
        self.cache = static.begin(batch, pad)
        self.cache_alloc_ms = (time.perf_counter() - t0) * 1e3
        return self.cache

    def _static(self) -> StaticDecode | None:
        """The static decode for this run's requests, or None (eager; a tensor-parallel rank's passes reduce)."""
        return self.static if self.parallel is None else None

    def _counters(self, c: KVCache | None) -> dict:
        if c is None:
            return {"h2d": 0, "d2h": 0, "attn_ms": 0.0, "attended": 0, "total": 0, "host_ms": 0.0,
                    "host_wait_ms": 0.0}
        return {"h2d": c.h2d_bytes, "d2h": c.d2h_bytes, "attn_ms": c.attn_ms, "attended": c.attended_blocks,
                "total": c.total_blocks, "host_ms": c.host_ms, "host_wait_ms": c.host_wait_ms}

    def _fold(self) -> None:
        for k, v in self._counters(self.cache).items():
            self.folded[k] += v
        self.cache = None

    def _count(self, key: str):
        return self.folded[key] + self._counters(self.cache)[key]

    def reset_counters(self) -> None:
        self.cache = None
        self.folded = self._counters(None)

    @property
    def attn_time_ms(self) -> float:
        """Decode-step attention time since reset_counters (with profile_attention)."""
        return self._count("attn_ms")

    def host_attention_ms(self) -> tuple[float, float]:
        """(ms the CPU spent attending, ms it waited for the device's queries first) since reset_counters
        (--host-attention; TieredKVCache.attend_on_host)."""
        return self._count("host_ms"), self._count("host_wait_ms")

    def kv_moved(self) -> tuple[int, int]:
        """KV bytes copied (host -> device, device -> host) since reset_counters."""
        return self._count("h2d"), self._count("d2h")

    def block_counts(self) -> tuple[int, int]:
        """(KV blocks decode attention read, blocks it would read exactly) since reset_counters (top-k)."""
        return self._count("attended"), self._count("total")

    def attended_fraction(self) -> float | None:
        attended, total = self.block_counts()
        return attended / total if total else None

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int, cache: KVCache, last_only: bool = False,
                pad: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, S) at slots [start, start+S) -> logits (B, S, vocab) fp32 (or the last position's, (B, 1,
        vocab)), prefilling in chunks of ``prefill.chunk`` tokens per weight pass (per sequence: prefill.chunk / B,
        at least 16). ``pad``: a left-padded batch's (``padding``)."""
        outs, step = [], chunk_per_sequence(self.prefill.chunk, tokens.shape[0]) if tokens.shape[0] > 1 \
            else self.prefill.chunk
        if self.threads is not None:
            self.threads.refresh()
        for i in range(0, tokens.shape[1], step):  # with last_only no chunk computes every position's logits
            chunk = tokens[:, i:i + step]  # (B x chunk x vocab fp32: 1 GB for 4 x 512 x 128K, beyond the plan)
            out = forward_groups(chunk, Queries(start + i, pad), self.args, self.source, self.rope, cache,
                                 last_only=last_only, parallel=self.parallel)
            if last_only:  # the latest chunk's only: B x vocab fp32 a chunk piled up to 0.5 GB (batch 32, 32
                outs.clear()  # chunks), beyond the plan
            outs.append(out)
        return outs[-1] if last_only or len(outs) == 1 else torch.cat(outs, dim=1)

    @torch.inference_mode()
    def forward_by_sequence(self, tokens: torch.Tensor, cache: TieredKVCache, pad: list[int]) -> torch.Tensor:
        """A left-padded batch's prefill (tokens (B, S) from slot 0) that gives each weight pass the whole
        prompts of as many sequences as ``prefill.chunk`` tokens hold (at least one; a longer prompt is
        chunked on its own), each group into its rows of the offloaded cache (``TieredKVCache.sub_batch``).
        Chunked across the batch (``forward``), every pass after the first reads the batch's written slots
        back over the link (batch 32 x 2048 tokens, 8B: 133 GB); here nothing is read back when a pass holds
        whole prompts, and only a prompt's own earlier chunks when it is longer than a pass.
        -> the last position's logits (B, 1, vocab) fp32."""
        b, s = tokens.shape
        per = sequences_per_pass(self.prefill.chunk, b, s)
        outs = []
        for b0 in range(0, b, per):
            sub = cache.sub_batch(b0, min(b0 + per, b), s)
            outs.append(self.forward(tokens[b0:b0 + per], 0, sub, last_only=True,
                                     pad=padding(pad[b0:b0 + per], tokens.device)))
            cache.absorb(sub)
        return torch.cat(outs, dim=0)

    def _prefill(self, tokens: torch.Tensor, cache: KVCache, pad: list[int]) -> torch.Tensor:
        """An offloaded cache's batch goes whole prompts at a time (``forward_by_sequence``) when its device
        buffers hold fewer sequences than the batch, when asked (``prefill.by_sequence``) and more than one
        pass is needed, or by default when that takes no more weight passes than chunking across the batch:
        then it also reads nothing back. It takes more passes when a pass holds a few prompts but more of
        each prompt across the batch (32 prompts of 1100 tokens in 2048-token passes: 32 against 18); those
        read the batch's earlier slots back instead, which costs less than the extra passes (8B-shaped: about
        40 GB, 0.7 s of link, against 14 more passes of 10 GB, 2.7 s)."""
        b, s = tokens.shape
        self.prefilled_by_sequence = False
        by = self.prefill.by_sequence
        if isinstance(cache, TieredKVCache) and b > 1:
            across, whole = prefill_passes(self.prefill.chunk, b, s)
            if cache.device_rows < b or (by is not False and across > 1 and (by or whole <= across)):
                self.prefilled_by_sequence = True
                return self.forward_by_sequence(tokens, cache, pad)
        return self.forward(tokens, 0, cache, last_only=True, pad=padding(pad, tokens.device))

    def _sync(self) -> None:
        if self.source.device.type == "cuda":
            torch.cuda.synchronize(self.source.device)

    @torch.inference_mode()
    def forward_tree(self, tokens: torch.Tensor, start: int, cache: KVCache,
                     tree: TreeQueries | None) -> torch.Tensor:
        """One weight pass over tokens (1, S) at slots [start, start+S) that are a token tree's nodes (``tree``;
        None: a plain causal chunk) -> logits (1, S, vocab) fp32, every node's (runtime/engine/speculative.py).
        In the static decode's cache, a pass of at most graphs.TREE_ROWS tokens replays its graphs."""
        static = self._static()
        if static is not None and static.fits_tree(cache, tokens.shape[1], start, tree):
            return static.step_tree(tokens[0], start, tree).unsqueeze(0)  # replayed from CUDA graphs
        if self.threads is not None:
            self.threads.refresh()
        return forward_groups(tokens, Queries(start, tree=tree), self.args, self.source, self.rope, cache,
                              parallel=self.parallel)

    @torch.inference_mode()
    def forward_rows(self, tokens: torch.Tensor, cache: KVCache, rows: RowQueries,
                     select: torch.Tensor | None = None) -> torch.Tensor:
        """One weight pass of a continuous batch (runtime/engine/scheduler.py): tokens (B, S), each row's right-
        aligned at its own slots (``rows``) -> the last column's logits (B, vocab) fp32, each row's latest token's;
        or with ``select`` (N,) (positions of the flattened (B x S) pass) those positions' logits (N, vocab): a
        token tree's nodes, a prompt whose tokens' log-probabilities were asked for."""
        if self.threads is not None:
            self.threads.refresh()
        queries = Queries(rows=rows)
        if select is not None:
            return forward_groups(tokens, queries, self.args, self.source, self.rope, cache, select=select)[0]
        return forward_groups(tokens, queries, self.args, self.source, self.rope, cache, last_only=True)[:, -1]

    def check_request(self, prompt: Sequence[int], max_new_tokens: int) -> None:
        if not prompt:
            raise ConfigError("the prompt is empty: give --prompt or --prompt-ids")
        if len(prompt) + max_new_tokens > self.max_seq_len:
            raise ConfigError(f"prompt ({len(prompt)} tokens) + --max-new-tokens ({max_new_tokens}) exceeds "
                              f"--max-seq-len {self.max_seq_len}")

    def prefill_one(self, prompt: Sequence[int], cfg: SamplingConfig, static: StaticDecode | None = None) \
            -> tuple[GenerationResult, torch.Generator, KVCache, int] | None:
        """One sequence's request checked, its cache made (``static``'s, when it decodes), its prompt prefilled and
        its first token sampled: (result so far, the request's seeded generator, the cache, the first token); None
        when it asks for no token (``generate``, and runtime/engine/speculative.py's)."""
        self.check_request(prompt, cfg.max_new_tokens)
        if cfg.max_new_tokens == 0:
            return None
        res, gen = GenerationResult(list(prompt), []), torch.Generator().manual_seed(cfg.seed)
        cache = self._request_cache(1, static)
        t0 = time.perf_counter()
        tokens = torch.tensor([list(prompt)], dtype=torch.long, device=self.source.device)
        logits = self.forward(tokens, 0, cache, last_only=True)[:, -1]
        tok = int(sample(logits, cfg, gen).item())  # .item() waits for the GPU to finish the pass
        res.prefill_ms = (time.perf_counter() - t0) * 1e3
        return res, gen, cache, tok

    def generate(self, prompt: Sequence[int], cfg: SamplingConfig, stop_ids: frozenset[int] = frozenset(),
                 on_token: Callable[[int], None] | None = None) -> GenerationResult:
        static = self._static()
        first = self.prefill_one(prompt, cfg, static)
        if first is None:
            return GenerationResult(list(prompt), [])
        res, gen, cache, tok = first
        pos, chosen = len(prompt), None  # chosen: the latest token on the device, the static step's next input
        while True:
            res.output_token_ids.append(tok)
            if on_token:
                on_token(tok)
            if tok in stop_ids:
                res.stop_reason = "stop_token"
                break
            if len(res.output_token_ids) >= cfg.max_new_tokens:
                break
            t1 = time.perf_counter()
            if static is None:
                nxt = torch.tensor([[tok]], dtype=torch.long, device=self.source.device)
                chosen = sample(self.forward(nxt, pos, cache, last_only=True)[:, -1], cfg, gen)
            else:
                chosen = sample(static.step([tok] if chosen is None else chosen, pos), cfg, gen)
            tok = int(chosen.item())  # the step's one wait for the device
            res.token_ms.append((time.perf_counter() - t1) * 1e3)
            pos += 1
        res.decode_ms = sum(res.token_ms)
        return res

    def generate_batch(self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig,
                       stop_ids: frozenset[int] = frozenset(),
                       on_step: Callable[[list[int | None]], None] | None = None,
                       limits: Sequence[int] | None = None) -> list[GenerationResult]:
        """Generate for several prompts at once: every weight pass (prefill and each decode step) serves the
        whole batch. Prompts of different lengths are left-padded (the cache masks the padding and each
        sequence's positions start at 0), so each sequence's tokens are those it gets alone (greedy; up to
        float rounding of batched kernels). Each sequence stops on its own (a stop token or
        ``max_new_tokens``); the batch runs until all have stopped. ``on_step`` gets each step's tokens once
        they are on the host (None for a sequence that has stopped). ``limits``: each sequence's own most new
        tokens (at most ``cfg.max_new_tokens``; the pool's server batches requests that asked for different
        numbers)."""
        if limits is not None and (len(limits) != len(prompts) or
                                   not all(1 <= n <= cfg.max_new_tokens for n in limits)):
            raise ConfigError(f"limits {list(limits)}: one per prompt, each 1..{cfg.max_new_tokens}")
        if len(prompts) == 1:
            one = cfg if limits is None else replace(cfg, max_new_tokens=limits[0])
            return [self.generate(prompts[0], one, stop_ids,
                                  (lambda t: on_step([t])) if on_step else None)]
        if not prompts or any(not p for p in prompts):
            raise ConfigError("a prompt of the batch is empty")
        longest = max(len(p) for p in prompts)
        if longest + cfg.max_new_tokens > self.max_seq_len:
            raise ConfigError(f"the longest prompt ({longest} tokens) + --max-new-tokens ({cfg.max_new_tokens}) "
                              f"exceeds --max-seq-len {self.max_seq_len}")
        results = [GenerationResult(list(p), []) for p in prompts]
        if cfg.max_new_tokens == 0:
            return results
        gen = torch.Generator().manual_seed(cfg.seed)
        pad = [longest - len(p) for p in prompts]
        dev = self.source.device
        pad_t, static = padding(pad, dev), self._static()
        cache = self._request_cache(len(prompts), static, pad_t)
        t0 = time.perf_counter()
        tokens = torch.tensor([[0] * n + list(p) for n, p in zip(pad, prompts)], dtype=torch.long, device=dev)
        chosen = sample(self._prefill(tokens, cache, pad)[:, -1], cfg, gen)
        toks = chosen.tolist()
        prefill_ms = (time.perf_counter() - t0) * 1e3
        live = [True] * len(prompts)
        pos, token_ms = longest, []
        while True:
            emitted = [t if alive else None for t, alive in zip(toks, live)]
            for i, r in enumerate(results):
                if emitted[i] is None:
                    continue
                r.output_token_ids.append(toks[i])
                if toks[i] in stop_ids:
                    r.stop_reason, live[i] = "stop_token", False
                elif len(r.output_token_ids) >= (cfg.max_new_tokens if limits is None else limits[i]):
                    live[i] = False
            if on_step:
                on_step(emitted)
            if not any(live):
                break
            t1 = time.perf_counter()
            if static is None:
                nxt = torch.tensor(toks, dtype=torch.long, device=dev).view(-1, 1)
                chosen = sample(self.forward(nxt, pos, cache, last_only=True, pad=pad_t)[:, -1], cfg, gen)
            else:
                chosen = sample(static.step(chosen, pos), cfg, gen)
            toks = chosen.tolist()  # the step's one wait for the device
            token_ms.append((time.perf_counter() - t1) * 1e3)
            pos += 1
        for r in results:
            r.prefill_ms, r.token_ms = prefill_ms, token_ms[:max(len(r.output_token_ids) - 1, 0)]
            r.decode_ms = sum(r.token_ms)
        return results

    @torch.inference_mode()
    def perplexity(self, ids: Sequence[int], context: int) -> tuple[float, int, float]:
        """Perplexity over consecutive non-overlapping windows of ``context`` tokens.

        Each window predicts its tokens 1..n-1 from the ones before them inside the window. Returns
        (perplexity, predicted tokens, summed negative log-likelihood).
        """
        if context < 2:
            raise ConfigError(f"--context must be at least 2, found {context}")
        nll, count = 0.0, 0
        for i in range(0, len(ids), context):
            window = list(ids[i:i + context])
            if len(window) < 2:
                break
            cache = self.new_cache(1)
            x = torch.tensor([window], dtype=torch.long, device=self.source.device)
            logp = self.forward(x, 0, cache)[0, :-1].log_softmax(-1)  # (n-1, vocab)
            nll -= float(logp.gather(-1, x[0, 1:, None]).sum())
            count += len(window) - 1
        if count == 0:
            raise ConfigError(f"the text has {len(ids)} tokens: too few for a window of {context}")
        return math.exp(nll / count), count, nll


def generator_for(source: WeightSource, cfg: EngineConfig, max_len: int, **kw) -> Generator:
    """The Generator of a run: ``cfg``'s KV and prefill parts, the KV-offload decision the plan made for the
    source, and the CPU's share of the cores when the run computes on them (runtime/engine/threads.py)."""
    if source.device.type == "cpu" or cfg.kv.host_attention:
        kw.setdefault("threads", ComputeThreads(cfg.threads, quiet=cfg.quiet))
    kw.setdefault("cuda_graphs", cfg.cuda_graphs == "on")
    return Generator(source, max_len, cfg.kv, cfg.prefill, offload=source.kv_offload, **kw)
