"""``StreamedWeights``: the weight source over a pool, for runtime/engine/generate.py. Runs in the client.

Its tiers come from a placement plan (runtime/engine/placement.py):
  - GPU tier: streamed through the window once at start and copied into tensors resident on the device.
  - DRAM tier: read in place from its ring slot (pinned for the pool's lifetime).
  - streamed set: the coordinator keeps the client's window filled in cyclic order; each group is used
    from its slot and the slot released right after.

A mixture's experts (model.groups.routed_groups) are fetched only where the pass's tokens chose them: once a layer
has routed, the pass calls ``route(layer, groups)`` with the experts it will fetch (model/transformer.py
``forward_groups``). GPU-tier experts are used at once; DRAM-tier ones from their slot (CPU) or copied over the link
(CUDA); disk-tier ones are not in the cyclic stream: ``route`` asks the pool for them (``PoolClient.demand``), which
reads them in order into this client's demand slots. So the order of the non-resident groups a pass fetches is
known only a layer at a time: ``order`` is that order as far as it is known, walked from the pass sequence
(``_extend``), which stops at a layer whose routing the pass has not announced yet. The CUDA pipeline copies along
it, up to K groups ahead, as it did along the fixed cycle. ``expert_stats`` counts the experts each tier served,
those skipped, and the bytes they moved; and the prefetch guess (model/experts.py): ``next_router`` hands the pass
a layer's router where its attention group is resident (or, on the CPU, in the DRAM tier), ``guess`` keeps the
experts it picked a layer ahead, and ``route`` counts how many of the layer's chosen experts were guessed.
Acting on the guess (disk tier): the pass hands over layer L+1's guess just before it routes layer L, and
``route(L)`` asks the pool for L's chosen disk-tier experts followed by up to ``plan.expert_prefetch`` of L+1's
guessed ones (the first in pass order) in the same demand, so they are read while layer L computes, into this
client's own demand slots (no memory of their own; ``prefetch_room`` leaves one slot for the layer's own reads).
``route(L+1)`` then waits for the ones its layer chose (they were issued: every earlier read of the demand has been
fetched, and they fit the slots) and keeps their slots in ``demand_hits``, fetched from there in pass order as any
other; the rest of L+1's disk experts are a new demand, which drops the guessed ones not chosen (their slots
released by the client when they arrive, their reads dropped if not yet issued). The bytes asked for on the guess,
used and wasted are counted beside the hit rate. Not yet: the DRAM tier's H2D copies on CUDA (they would need GPU
buffers of their own, outside the K staging buffers the pipeline cycles through).
On CUDA the ring is registered once with cudaHostRegister, and DRAM/streamed groups are copied on a
dedicated copy stream into K staging buffers, up to K groups ahead of compute, with CUDA events between the
streams (no synchronize in the layer loop); a slot is released once the event recorded after its copy has
completed. On the CPU the model computes straight from slot memory, except that a quantized DRAM-tier group is
held in this process's memory from its first use: in row tiles for the CPU kernels, or dequantized
(model/cpu_kernels.py ``hold``; on a CPU, dequantizing at every use would cost many times the matmul); streamed
quantized groups are dequantized per use, as on the GPU.

The CPU compute set (``plan.cpu``, ``--cpu-compute``, CUDA only, not for a tensor-parallel rank): in a pass of at most
``plan.cpu_tokens_max`` tokens, known at its ``embed``, such a DRAM-tier group is not copied: ``get`` returns its
views in the ring slot, its quantized matrices held once in row tiles where the CPU kernels take them
(model/cpu_kernels.py ``hold``: a copy in this process, in float32's kernels), and the pass computes it on the CPU
(model/passes.py ``on_weights``). It keeps its fetch
position, so the order is the same in every pass; ``_issue`` decides per position from its pass's size, and the
copies run ahead past a CPU-set group only once its pass has begun (a pass of many tokens copies it as before).

A tensor-parallel rank passes its ``shard`` (runtime/engine/tensor_parallel.py ``RankShard``): each group's
slot still holds the whole group, and the rank copies (or, on the CPU, views) only its extent of it, its own
shard of a format-3 image; its GPU tier and staging buffers hold shards.
"""

from __future__ import annotations

import os
import time

import torch

from model.arch import EMBED, architecture
from model.cpu_kernels import hold, read_in_place
from model.errors import UserError
from model.groups import layer_group, routed_groups
from model.transformer import Weights, embed_forward
from runtime.env import cpu_kernels
from runtime.format.image import TORCH_DTYPES, Image, tensor_views
from runtime.ipc.shm import SLOT_READY, PoolResources
from runtime.pool.client import PoolClient

REGISTER_CHUNK = 512 << 20  # the ring is registered in chunks of at least this size (at slot boundaries) ...
REGISTER_THREADS = min(16, os.cpu_count() or 1)  # ... from this many threads
MADV_POPULATE_READ = 22  # Linux 5.14: fault a range's pages in before pinning them (faster from many threads)


def _ring_tensor(res: PoolResources) -> torch.Tensor:
    """The ring as a flat uint8 tensor (not writable through it when the mapping is read-only)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(res.ring, dtype=torch.uint8)


class StreamedWeights:
    """Weight source over a pool (see module docstring; a runtime.engine.weights.WeightSource). ``plan`` is a
    runtime.engine.placement.Plan; ``kv_offload``: the plan's KV decision, which the Generator takes."""

    def __init__(self, image: Image, plan, client: PoolClient, device: torch.device, staging: int = 2,
                 trace=None, on_allocated=None, kv_offload: bool = False, shard=None) -> None:
        self.shard = shard  # a tensor-parallel rank's RankShard, or None: whole groups
        self.image, self.args, self.plan, self.client = image, shard.args if shard else image.args, plan, client
        self.trace = trace  # runtime.engine.trace.ClientTrace with --trace: records copies and slot waits
        self.device, self.dtype = torch.device(device), TORCH_DTYPES[image.dtype]
        self.kv_offload = kv_offload
        self.load_ms: dict[str, float] = {}  # the start-up by phase (filled by _set_up)
        self.registrations: list[tuple[int, int]] = []  # (address, bytes) registered with CUDA
        self.names = list(image.groups)
        self.gid = {n: i for i, n in enumerate(self.names)}
        self.res = client.res
        self.ring = _ring_tensor(self.res)
        self.cuda = self.device.type == "cuda"
        self.sched = [g for g in plan.sequence if g not in plan.gpu]  # non-resident groups, pass order
        self.routed = routed_groups(self.args)  # a mixture's experts -> (layer, index)
        self.last_routed = {at[0]: g for g, at in self.routed.items()}  # layer -> its last expert
        self.layer_experts = {layer: e + 1 for layer, e in self.routed.values()}  # layer -> its experts
        self.on_gpu, self.in_dram = set(plan.gpu), set(plan.dram)
        self.on_demand = {g for g in plan.stream if g in self.routed}  # disk-tier experts: read on demand
        self.stream_seq = [g for g in plan.sequence if g in plan.stream and g not in self.routed]  # the cycle
        self.check_at = next((g for g in self.sched if g not in self.routed), None)  # check_alive once a pass
        self.order: dict[int, str] = {}  # fetch position -> non-resident group, as far as known (_extend)
        self.known = 0  # positions known
        self.walk = 0  # absolute position in the pass sequence (cyclic) the order has been walked to
        self.routes: dict[int, frozenset[str]] = {}  # layer -> its experts this pass fetches (route)
        self.pos = 0  # fetch positions gotten
        self.stream_pos = 0  # absolute position in the streamed sequence
        self.demand_pos = self.demand_len = 0  # position in the pool demand of the current layer, and its length
        # experts fetched from each tier (and their bytes: this process's extent), those no token chose, and the
        # bytes they moved to the GPU (DRAM and disk tiers, CUDA only); routings: layers routed
        self.expert_stats = dict.fromkeys(("routings", "experts_gpu", "experts_dram", "experts_disk",
                                           "experts_skipped", "expert_bytes_gpu", "expert_bytes_dram",
                                           "expert_bytes_disk", "expert_h2d_bytes", "guessed_layers", "guessed",
                                           "guess_chosen", "guess_hits", "prefetched", "prefetch_used",
                                           "prefetch_bytes", "prefetch_used_bytes", "prefetch_wasted_bytes"), 0)
        # the prefetch guess: each routed layer's router group, and the experts guessed for a layer not routed yet
        kinds = [k for k in architecture(self.args).layer_kinds if k.forward == "moe_attention"]
        self.router_group = {i: layer_group(i, kinds[0].name) for i in range(self.args.n_layers)} if kinds else {}
        self.guesses: dict[int, frozenset[str]] = {}
        # acting on it: the most guessed disk experts a layer asks for a layer ahead; layer -> those to ask for with
        # the layer before; layer -> {guessed disk expert: its position in the current demand}; the ones its layer
        # chose, read -> (slot, seq) until fetched
        self.prefetch_max = plan.expert_prefetch if shard is None else 0
        self.ahead: dict[int, list[str]] = {}
        self.asked: dict[int, dict[str, int]] = {}
        self.demand_hits: dict[str, tuple[int, int]] = {}
        self.held: tuple[int, int] | None = None  # CPU: the streamed slot the last group was computed from
        self.dense: dict[str, Weights] = {}  # CPU: quantized DRAM-tier groups, held from their first use
        # CUDA: the plan's CPU compute set; the pass index of each known position, whether each begun pass is small
        # enough for the CPU set (embed), the positions issued to the CPU (not copied), their ring views
        self.cpu_set = frozenset(plan.cpu) if self.cuda and shard is None else frozenset()
        self.order_pass: dict[int, int] = {}
        self.small: dict[int, bool] = {}
        self.host_pos: set[int] = set()
        self.host_views: dict[str, Weights] = {}
        self.pinned: torch.Tensor | None = None  # CUDA: the host lookups' staging (_upload) ...
        self.uploaded: torch.cuda.Event | None = None  # ... and its last copy's event
        # The plan's device memory first (GPU tier buffers, staging buffers), then ``on_allocated`` (the CUDA
        # warm-up thread: what it allocates comes out of the activations' share, never out of these).
        self.tier_bufs = {g: torch.empty(self._extent(g)[1], dtype=torch.uint8, device=self.device)
                          for g in plan.gpu}
        if self.cuda:
            self._init_pipeline(staging)
        if on_allocated is not None:
            on_allocated()
        # Registered behind the fill, chunk by chunk as the workers complete it (see _register_ring).
        t0 = time.perf_counter()
        self.registered = self._register_ring() if self.cuda else False
        try:
            self._set_up(t0)
        except BaseException:  # e.g. the pool died: never leave pages registered
            try:
                self.client.stop_stream()
            finally:  # (a later mapping at the same address would fail, error 712, or corrupt copies)
                if self.registered:
                    self._unregister()
                    self.registered = False
            raise

    def _set_up(self, t0: float) -> None:
        client = self.client
        t1 = time.perf_counter()
        client.wait_running()
        t2 = time.perf_counter()
        self._check_dram_tier()
        self.resident: dict[str, Weights] = {}
        self._load_gpu_tier()
        t3 = time.perf_counter()
        self.load_ms = {"register_ring": (t1 - t0) * 1e3, "wait_dram_tier_after_register": (t2 - t1) * 1e3,
                        "gpu_tier": (t3 - t2) * 1e3}
        if self.stream_seq:
            client.start([self.gid[g] for g in self.stream_seq], cyclic=True)

    # ---- setup ---------------------------------------------------------------------------------
    def _check_dram_tier(self) -> None:
        for g in self.plan.dram:
            s = int(self.res.groups[self.gid[g]]["slot"])
            if s < 0 or int(self.res.slots[s]["state"]) != SLOT_READY:
                raise UserError(f"pool {self.client.handle.name!r} does not hold {g} in its DRAM tier")

    def _own_slots(self) -> set[int]:
        """The slots this client copies from: the DRAM-tier slots of its GPU and DRAM tiers, and its own
        window slots (the coordinator's layout: DRAM-tier slots, then W per client)."""
        slot = {g: int(self.res.groups[self.gid[g]]["slot"]) for g in self.names}
        own = {slot[g] for g in tuple(self.plan.gpu) + tuple(self.plan.dram) if slot[g] >= 0}
        n_dram = int((self.res.groups["slot"] >= 0).sum())
        h = self.client.handle
        w = (h.n_slots - n_dram) // max(h.n_clients, 1)
        return own | set(range(n_dram + self.client.j * w, n_dram + (self.client.j + 1) * w))

    def _register_ring(self) -> bool:
        """cudaHostRegister the ring in chunks of >= REGISTER_CHUNK cut at slot boundaries, from
        REGISTER_THREADS threads, each chunk once its DRAM-tier slots are READY; chunks holding none of this
        client's slots (other clients' windows) are left alone. Pinning a page the workers have already read
        into costs little, pinning a fresh page faults it in first (2 GB/s), so the DRAM tier is registered
        behind the fill. A freshly attached mapping has no page tables yet: MADV_POPULATE_READ from the same
        threads first (16 GB: 0.9 s instead of 1.9 s on the H200 machine, benchmarks/attach_register_bench.py).
        The registration is finished before any copy: cudaHostRegister holds a lock every CUDA call of the
        process waits for (a copy issued meanwhile took 363 ms instead of 14), so the first pass cannot run
        behind it. Every copy reads within one slot, so within one registration."""
        import concurrent.futures as cf

        size, base = self.ring.numel(), self.ring.data_ptr()
        offsets = [int(o) for o in self.res.slots["ring_offset"]]
        cuts = sorted(set(offsets) | {0}) + [size]
        chunks, start = [], 0
        for c in cuts[1:]:
            if c - start >= REGISTER_CHUNK or c == size:
                chunks.append((start, c - start))
                start = c
        own = self._own_slots()
        chunks = [c for c in chunks if any(c[0] <= offsets[s] < c[0] + c[1] for s in own)]
        dram = {int(s) for s in self.res.groups["slot"] if s >= 0}
        members = {c: [s for s in dram if c[0] <= offsets[s] < c[0] + c[1]] for c in chunks}
        cudart = torch.cuda.cudart()
        flags = 1 | (8 if self.res.ring_readonly else 0)  # Portable, + ReadOnly for a read-only mapping

        def register(chunk: tuple[int, int]) -> int:
            try:
                self.res.ring.madvise(MADV_POPULATE_READ, chunk[0], chunk[1])
            except (OSError, ValueError):
                pass  # an older kernel: cudaHostRegister faults the pages in itself
            with torch.cuda.device(self.device):
                return int(cudart.cudaHostRegister(base + chunk[0], chunk[1], flags))

        futures: dict = {}
        try:
            with cf.ThreadPoolExecutor(max(1, min(REGISTER_THREADS, len(chunks)))) as ex:
                while len(futures) < len(chunks):
                    states = self.res.slots["state"]
                    for c in chunks:
                        if c not in futures and all(int(states[s]) == SLOT_READY for s in members[c]):
                            futures[c] = ex.submit(register, c)
                    if len(futures) < len(chunks):
                        self.client.check_alive()  # raises if the fill failed or the pool died
                        time.sleep(0.005)
        finally:  # the executor has joined: every submitted registration has returned
            errors = {c: f.result() for c, f in futures.items()}
            self.registrations = [(base + c[0], c[1]) for c, e in errors.items() if e == 0]
            if len(errors) < len(chunks):
                self._unregister()
        bad = [(c, e) for c, e in errors.items() if e]
        if bad:
            self._unregister()
            (off, n), e = bad[0]
            ro = " (a read-only mapping: this driver may not support cudaHostRegisterReadOnly)" if flags & 8 else ""
            raise UserError(f"cudaHostRegister of the pool's ring failed with error {e} at offset {off} ({n} bytes "
                            f"of {size}){ro}")
        return True

    def _unregister(self) -> None:
        for ptr, _ in self.registrations:
            torch.cuda.cudart().cudaHostUnregister(ptr)
        self.registrations = []

    @property
    def pinned_bytes(self) -> int:
        """Bytes of the ring this process has registered with CUDA (not other clients' windows)."""
        return sum(n for _, n in self.registrations)

    def slot_tensor(self, slot: int, nbytes: int) -> torch.Tensor:
        off = int(self.res.slots[slot]["ring_offset"])
        return self.ring[off:off + nbytes]

    def _extent(self, g: str) -> tuple[int, int]:
        """(offset within the group, bytes) of what this process uses of group ``g``: all of it, or its shard."""
        return self.shard.extent(g) if self.shard else (0, self.image.groups[g].size)

    def _slot_extent(self, slot: int, g: str) -> torch.Tensor:
        off, n = self._extent(g)
        return self.slot_tensor(slot, off + n)[off:]

    def _views(self, g: str, buf: torch.Tensor) -> Weights:
        """Tensors of ``g`` over ``buf``, the bytes of its extent (``_extent``)."""
        return self.shard.views(g, buf) if self.shard else tensor_views(self.image.groups[g], buf)

    def dram_views(self, g: str) -> Weights:
        return self._views(g, self._slot_extent(int(self.res.groups[self.gid[g]]["slot"]), g))

    def _load_gpu_tier(self) -> None:
        """Copy the GPU tier to the device: from the pool's DRAM tier where it holds those groups (see
        runtime.engine.source.gpu_tier_in_dram), else through the window, one group after another."""
        def load(g: str, slot: int) -> None:  # one copy per group into its buffer, the tensors views of it
            self.tier_bufs[g].copy_(self._slot_extent(slot, g), non_blocking=True)
            self.resident[g] = self._views(g, self.tier_bufs[g])

        in_dram = [g for g in self.plan.gpu if int(self.res.groups[self.gid[g]]["slot"]) >= 0]
        for g in in_dram:
            load(g, int(self.res.groups[self.gid[g]]["slot"]))
        if self.cuda and in_dram:
            torch.cuda.current_stream(self.device).synchronize()
        gpu = [g for g in self.plan.gpu if g not in self.resident]
        if not gpu:
            return
        self.client.start([self.gid[g] for g in gpu], cyclic=False)
        for pos, g in enumerate(gpu):
            slot, seq = self.client.wait_ready(pos)
            load(g, slot)
            if self.cuda:
                torch.cuda.current_stream(self.device).synchronize()  # copies done before the slot is reused
            self.client.release(slot, seq)
        self.client.stop_stream()

    # ---- the weight-source interface ------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cpu_set:  # a pass begins: its size decides where its CPU-set groups compute
            first = self._pass_of(self.pos)
            self.small = {i: v for i, v in self.small.items() if i >= first}
            self.small[first] = tokens.numel() <= self.plan.cpu_tokens_max
        lookup = self.shard.embed if self.shard else embed_forward  # a rank looks up its rows (the others zero)
        if EMBED in self.resident:
            return lookup(tokens, self.resident[EMBED], self.dtype)
        host = lookup(tokens.cpu(), self.dram_views(EMBED), self.dtype)  # host lookup, rows only
        return self._upload(host) if self.cuda else host

    def _upload(self, host: torch.Tensor) -> torch.Tensor:
        """``host`` on the device through a pinned buffer: the copy is queued on the compute stream and the host
        goes on issuing the pass (from pageable memory it would wait for the copy, itself queued behind the
        copy engine's weight copies). The buffer is refilled once its last copy's event has passed."""
        n = host.numel()
        if self.pinned is None or self.pinned.numel() < n:
            self.pinned, self.uploaded = torch.empty(n, dtype=host.dtype, pin_memory=True), None
        if self.uploaded is not None:
            self.uploaded.synchronize()
        buf = self.pinned[:n].view(host.shape)
        buf.copy_(host)
        out = buf.to(self.device, non_blocking=True)
        self.uploaded = torch.cuda.Event()
        self.uploaded.record(torch.cuda.current_stream(self.device))
        return out

    def get(self, group: str) -> Weights:
        if self.cuda and self.last_streamed is not None:
            self._mark_freed()  # the last streamed group's compute is enqueued: its buffer can take the next copy
        if group in self.resident:
            return self.resident[group]
        if group == self.check_at:
            self.client.check_alive()  # once a pass: a dead pool fails the run even if nothing streams
        expected = self._at(self.pos)
        if group != expected:
            raise RuntimeError(f"weights requested out of order: {group}, expected "
                               f"{expected or 'the layer to route first (route)'}")
        self.order.pop(self.pos - 1, None)  # gotten, and (CUDA) copied: positions are fetched in order
        self.order_pass.pop(self.pos - 1, None)
        self.pos += 1
        return self._get_cuda(group) if self.cuda else self._get_cpu(group)

    # ---- routed experts ------------------------------------------------------------------------
    def next_router(self, layer: int) -> Weights | None:
        """Layer ``layer``'s router group's weights where they can be used without fetching anything: resident, or
        on the CPU in the DRAM tier; None otherwise (and for a tensor-parallel rank): no guess for that layer."""
        g = self.router_group.get(layer)
        if g is None or self.shard is not None:
            return None
        if g in self.resident:
            return self.resident[g]
        return self.dram_views(g) if not self.cuda and g in self.in_dram else None

    def guess(self, layer: int, groups) -> None:
        """The experts of ``layer`` its router picks on the previous layer's hidden state (counted at ``route``)."""
        self.guesses[layer] = frozenset(groups)
        if self.prefetch_max:  # the ones to ask for with the current layer's (route): the first in pass order
            self.ahead[layer] = [g for g in groups if g in self.on_demand][:self.prefetch_max]

    def route(self, layer: int, groups) -> None:
        """The pass's layer ``layer`` has routed: of its experts it fetches ``groups`` only, in this order (model/
        transformer.py ``forward_groups``). Counts where each comes from; takes the disk-tier ones read on the last
        layer's guess, asks the pool for the others with the next layer's guessed ones (one demand); on CUDA starts
        the copies that can start."""
        if layer in self.routes:
            raise RuntimeError(f"layer {layer} routed twice before its experts were fetched")
        if self.demand_pos < self.demand_len:
            raise RuntimeError(f"layer {layer} routed while {self.demand_len - self.demand_pos} experts of the last "
                               f"demand were not fetched")
        if layer == 0 and self.check_at is None:
            self.client.check_alive()  # once a pass, where only experts move
        chosen = frozenset(groups)
        st = self.expert_stats
        st["routings"] += 1
        guessed = self.guesses.pop(layer, None)
        if guessed is not None:
            st["guessed_layers"] += 1
            st["guessed"] += len(guessed)
            st["guess_chosen"] += len(chosen)
            st["guess_hits"] += len(chosen & guessed)
        st["experts_skipped"] += self.layer_experts[layer] - len(chosen)
        self._take_prefetched(layer, chosen)
        disk = []
        for g in groups:
            tier = "gpu" if g in self.on_gpu else "dram" if g in self.in_dram else "disk"
            size = self._extent(g)[1]
            st[f"experts_{tier}"] += 1
            st[f"expert_bytes_{tier}"] += size
            if tier == "disk" and g not in self.demand_hits:
                disk.append(g)
            if tier != "gpu" and self.cuda:
                st["expert_h2d_bytes"] += size
        ahead = self.ahead.pop(layer + 1, [])
        if disk or ahead:
            self.client.demand([self.gid[g] for g in disk + ahead])
            self.demand_pos, self.demand_len = 0, len(disk)
            if ahead:
                self.asked[layer + 1] = {g: len(disk) + i for i, g in enumerate(ahead)}
                st["prefetched"] += len(ahead)
                st["prefetch_bytes"] += sum(self._extent(g)[1] for g in ahead)
        self.routes[layer] = chosen
        if self.cuda:
            self._run_ahead()

    def _take_prefetched(self, layer: int, chosen: frozenset[str]) -> None:
        """Layer ``layer`` has routed: wait for the disk experts read on its guess that it chose (each was issued:
        every read before it in the demand has been fetched, and they fit the demand slots, ``prefetch_room``) and
        keep their slots for their ``get``; count the bytes used and wasted. The ones not chosen are dropped by the
        next demand."""
        asked = self.asked.pop(layer, None)
        if not asked:
            return
        st = self.expert_stats
        for g, pos in asked.items():  # in demand order
            size = self._extent(g)[1]
            if g not in chosen:
                st["prefetch_wasted_bytes"] += size
                continue
            if self.cuda:
                self._free_window_for(lambda at=pos: self.client.demand_waiting(at))
            t0 = time.monotonic_ns() if self.trace else 0
            self.demand_hits[g] = self.client.wait_demand(pos)
            if self.trace:
                self.trace.wait(g, t0, pos)
            st["prefetch_used"] += 1
            st["prefetch_used_bytes"] += size

    def _at(self, p: int) -> str | None:
        """The non-resident group at fetch position ``p``; None while it depends on a routing not announced."""
        if p >= self.known:
            self._extend(p)
        return self.order.get(p)

    def _extend(self, upto: int) -> None:
        """Walk the pass sequence on, appending the non-resident groups the passes fetch to ``order``, until
        position ``upto`` is known or the walk reaches experts of a layer that has not routed in this pass."""
        seq, n = self.plan.sequence, len(self.plan.sequence)
        idle = 0  # steps without a new position: a pass of them means the pass fetches nothing non-resident
        while self.known <= upto and idle < n:
            g = seq[self.walk % n]
            at = self.routed.get(g)
            fetched = g not in self.on_gpu
            if at is not None:
                chosen = self.routes.get(at[0])
                if chosen is None:
                    return  # the layer's routing is not known yet
                fetched = fetched and g in chosen
                if self.last_routed[at[0]] == g:
                    del self.routes[at[0]]  # the layer's experts are walked: the next pass routes it again
            if fetched:
                self.order_pass[self.known] = self.walk // n
                self.order[self.known] = g
                self.known += 1
                idle = 0
            else:
                idle += 1
            self.walk += 1

    def _pass_of(self, p: int) -> int:
        """The pass (its index from the first) that fetch position ``p`` belongs to."""
        self._at(p)
        return self.order_pass.get(p, self.walk // len(self.plan.sequence))

    def _on_host(self, p: int) -> bool | None:
        """Whether position ``p`` is computed by the CPU in place (not copied); None while that depends on the size
        of a pass that has not begun."""
        if self._at(p) not in self.cpu_set:
            return False
        return self.small.get(self.order_pass[p])

    def _next_slot(self, group: str) -> tuple[int, int]:
        """DRAM tier: its fixed slot (seq -1: never released); streamed: wait for the next window slot; an expert
        on disk: wait for the next slot of the current demand."""
        if group in self.in_dram:
            return int(self.res.groups[self.gid[group]]["slot"]), -1
        if group in self.demand_hits:  # read on the guess a layer ahead (route)
            return self.demand_hits.pop(group)
        if group in self.on_demand:
            pos = self.demand_pos
            self.demand_pos += 1
            if self.cuda:
                self._free_window_for(lambda: self.client.demand_waiting(pos))
            t0 = time.monotonic_ns() if self.trace else 0
            ready = self.client.wait_demand(pos)
        else:
            pos = self.stream_pos
            self.stream_pos += 1
            if self.cuda:
                self._free_window_for(lambda: self._window_waiting(pos))
            t0 = time.monotonic_ns() if self.trace else 0
            ready = self.client.wait_ready(pos)
        if self.trace:
            self.trace.wait(group, t0, pos)
        return ready

    def _window_waiting(self, pos: int) -> bool:
        self.client._drain()
        return pos in self.client.ready

    def _free_window_for(self, ready) -> None:
        """Release copied slots until ``ready()`` or none is held: the pool can only fill the window (or demand)
        slot we are about to wait for once we give one back (else: deadlock with a full window)."""
        self._release_finished()
        while self.pending:
            if ready():
                return
            ev, slot, seq = self.pending.pop(0)
            ev.synchronize()  # a copy only waits on compute already enqueued: this always finishes
            self.client.release(slot, seq)

    def _get_cpu(self, group: str) -> Weights:
        if self.held is not None:  # the previous group's compute has finished: CPU ops are synchronous
            self.client.release(*self.held)
            self.held = None
        if group in self.dense:
            return self.dense[group]
        slot, seq = self._next_slot(group)
        if seq >= 0:
            self.held = (slot, seq)
        spec = self.image.groups[group]
        views = self._views(group, self._slot_extent(slot, group))
        if seq < 0 and spec.quantized:
            views = self.dense[group] = hold(views, self.dtype, cpu_kernels())
        elif spec.quantized:  # the slot's bytes, read in place where the CPU's kernels can (held until the next get)
            views = read_in_place(views, self.dtype, cpu_kernels())
        return views

    # ---- CUDA pipeline -------------------------------------------------------------------------
    def _init_pipeline(self, k: int) -> None:
        k = max(1, min(k, len(self.sched))) if self.sched else 0
        self.k = k
        self.copy_stream = torch.cuda.Stream(self.device)
        self.staging = [torch.empty(self.plan.slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(k)]
        self.copied = [None] * k  # event recorded after the copy into buffer b
        self.freed = [None] * k  # event recorded on the compute stream after the last use of buffer b
        self.issued = 0  # copies issued so far (absolute sched positions)
        self.done = 0  # positions whose compute is enqueued and whose buffer's ``freed`` event is recorded
        self.last_streamed: int | None = None  # the position whose views were returned last, not yet in ``done``
        self.staged_views: dict[tuple[str, int], Weights] = {}  # (group, staging buffer) -> its tensors there
        self.pending: list[tuple[torch.cuda.Event, int, int]] = []  # (copy event, slot, seq) awaiting release

    def _issue(self, p: int) -> None:
        """Copy the group at fetch position ``p`` into staging buffer p % k on the copy stream."""
        g = self._at(p)
        if self.cpu_set and self._on_host(p):  # the CPU computes it from its ring slot: nothing to copy
            self.host_pos.add(p)
            self.issued += 1
            return
        b, size = p % self.k, self._extent(g)[1]
        slot, seq = self._next_slot(g)
        with torch.cuda.stream(self.copy_stream):
            if self.freed[b] is not None:
                self.copy_stream.wait_event(self.freed[b])
            c0 = self.trace.mark(self.copy_stream) if self.trace else None  # after the wait: the copy itself
            self.staging[b][:size].copy_(self._slot_extent(slot, g), non_blocking=True)
            ev = torch.cuda.Event(enable_timing=self.trace is not None)
            ev.record(self.copy_stream)
        if self.trace:
            self.trace.copy(g, c0, ev, size, b)
        self.copied[b] = ev
        if seq >= 0:
            self.pending.append((ev, slot, seq))
        self.issued += 1

    def _release_finished(self) -> None:
        while self.pending and self.pending[0][0].query():
            _, slot, seq = self.pending.pop(0)
            self.client.release(slot, seq)

    def _mark_freed(self) -> None:
        """Called at the next ``get``, resident or not: every kernel reading the last streamed group's buffer
        is enqueued, so the buffer is free once the compute stream passes this event. Then copies run ahead
        into it, so that the copy stream keeps busy while the compute stream works on resident groups (at a
        pass's end: the next pass's first streamed groups copy during the resident tail and the sampling)."""
        p, self.last_streamed = self.last_streamed, None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        self.freed[p % self.k] = ev
        self.done = p + 1
        self._run_ahead()

    def _run_ahead(self) -> None:
        while self.issued < self.done + self.k and self._ready_without_wait(self.issued):
            self._issue(self.issued)  # into a buffer whose last reader is enqueued, while the data is in DRAM

    def _get_cuda(self, group: str) -> Weights:
        p = self.pos - 1  # absolute position of ``group``
        while self.issued <= p:  # must have this group's copy in flight
            self._issue(self.issued)
        if p in self.host_pos:  # no buffer: the CPU reads the ring slot; the next copies may run ahead
            self.host_pos.discard(p)
            self.done = p + 1
            self._run_ahead()
            self._release_finished()
            views = self.host_views.get(group)
            if views is None:  # its quantized matrices read in place by the CPU's kernels (model/cpu_kernels.py
                # BlockWeight), or tiled once for them (a copy) in the formats those do not read in place
                views = self.host_views[group] = hold(self.dram_views(group), torch.float32, cpu_kernels(),
                                                      dequantize=False, in_place=True)
            return views
        self._run_ahead()
        self._release_finished()
        b = p % self.k
        torch.cuda.current_stream(self.device).wait_event(self.copied[b])
        self.last_streamed = p
        views = self.staged_views.get((group, b))
        if views is None:  # the same buffer holds the group every time it comes: its views are built once
            views = self.staged_views[group, b] = self._views(group, self.staging[b][:self._extent(group)[1]])
        return views

    def _ready_without_wait(self, p: int) -> bool:
        g = self._at(p)
        if g is None:  # not known before its layer routes
            return False
        if g in self.in_dram:
            return not self.cpu_set or self._on_host(p) is not None  # a CPU-set group: once its pass has begun
        if g in self.demand_hits:
            return True
        if g in self.on_demand:
            return self.client.demand_waiting(self.demand_pos)
        return self._window_waiting(self.stream_pos)

    # ---- teardown ------------------------------------------------------------------------------
    def close(self) -> None:
        try:
            if self.cuda:
                torch.cuda.synchronize(self.device)
                self._release_finished()
            elif self.held is not None:
                self.client.release(*self.held)
                self.held = None
            self.client.stop_stream()
        finally:  # the registration goes before the ring is unmapped, whatever failed above
            if self.registered:
                self._unregister()
                self.registered = False
