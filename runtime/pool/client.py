"""The client side of a pool: claim a row, ask for group sequences, wait for their slots (torch-free).

Runs in the GPU process (or the CPU process on a machine without a GPU). ``PoolClient`` is the attachment:
it claims a client row, writes sequences of group ids into its region, sends START / RELEASE / STOP_STREAM
commands, and waits for READY events on its semaphore; events that arrive before the STARTED answer to its
latest START are stale (an earlier sequence, or a dead client on the same index) and dropped. Every wait has
a timeout and checks that the coordinator is alive (its pid, and a heartbeat it refreshes every loop), so a
dead pool is reported within ``dead_after_s`` instead of hanging. Beside the sequence, ``demand`` asks for a list
of groups out of its order (runtime/ipc/shm.py, demands), each waited for with ``wait_demand``. The weight source
built on it is runtime/engine/streamed.py.
"""

from __future__ import annotations

import os
import random
import time

from model.errors import UserError
from runtime.ipc.procs import pid_alive
from runtime.ipc.shm import (
    CLIENT_ATTACHED,
    DEMAND_ID_BITS,
    MAGIC,
    MSG_DEMAND,
    MSG_DEMAND_FAILED,
    MSG_DEMAND_READY,
    MSG_DEMANDED,
    MSG_FAILED,
    MSG_READY,
    MSG_RELEASE,
    MSG_START,
    MSG_STARTED,
    MSG_STOP_STREAM,
    POOL_FAILED,
    POOL_RUNNING,
    POOL_STOPPING,
    VERSION,
    PoolHandle,
    PoolResources,
    sem_wait,
)


class PoolDied(UserError):
    """The pool's coordinator is gone or failed; the message says which and why."""


class PoolClient:
    def __init__(self, handle: PoolHandle, index: int = 0, dead_after_s: float = 5.0, ring: str = "rw") -> None:
        """``ring``: "ro" maps the pool's data read-only (a client of a daemon pool; see runtime/services/pools.py)."""
        self.handle, self.j, self.dead_after_s = handle, index, dead_after_s
        self.res = PoolResources.attach(handle, ring=ring)
        hd = self.res.header
        if int(hd["magic"]) != MAGIC or int(hd["version"]) != VERSION:
            raise UserError(f"pool {handle.name!r}: control block magic/version {int(hd['magic']):#x}/"
                            f"{int(hd['version'])}, expected {MAGIC:#x}/{VERSION}")
        row = self.res.clients[index]
        row["pid"], row["state"] = os.getpid(), CLIENT_ATTACHED
        self.ready: dict[int, tuple[int, int]] = {}  # sequence position -> (slot, seq)
        self.started = False  # the coordinator's STARTED for our latest START has arrived
        # demands: ids start anywhere, so that a dead client's events on this index are not taken for ours
        self.demand_id = random.randrange(1 << (DEMAND_ID_BITS - 1))
        self.demanded = self.demand_id  # the id of the last DEMANDED answer (the region may be written)
        self.demand_ready: dict[int, tuple[int, int]] = {}  # position in the current demand -> (slot, seq)

    # ---- liveness ------------------------------------------------------------------------------
    def check_alive(self) -> None:
        hd = self.res.header
        state, pid = int(hd["state"]), int(hd["coord_pid"])
        if state == POOL_FAILED:
            raise PoolDied(f"pool {self.handle.name!r} failed: {self.res.get_error()}")
        if state == POOL_STOPPING:
            raise PoolDied(f"pool {self.handle.name!r} is stopping")
        age = (time.monotonic_ns() - int(hd["heartbeat_ns"])) / 1e9
        if not pid_alive(pid):
            raise PoolDied(f"pool {self.handle.name!r}: coordinator pid {pid} is gone (last heartbeat {age:.1f} s "
                           f"ago); its clients cannot continue")
        if age > self.dead_after_s:
            raise PoolDied(f"pool {self.handle.name!r}: coordinator pid {pid} is not responding (last heartbeat "
                           f"{age:.1f} s ago: stopped or hung); its clients cannot continue")

    def wait_running(self, timeout_s: float = 3600.0) -> None:
        """Wait until the DRAM tier is filled (the pool serves)."""
        deadline = time.monotonic() + timeout_s
        while int(self.res.header["state"]) != POOL_RUNNING:
            self.check_alive()
            if time.monotonic() > deadline:
                raise PoolDied(f"pool {self.handle.name!r} did not finish filling its DRAM tier in {timeout_s:.0f} s")
            time.sleep(0.01)

    # ---- sequences -----------------------------------------------------------------------------
    def start(self, groups: list[int], cyclic: bool) -> None:
        seq = self.res.sequences[self.j]
        if len(groups) > len(seq):
            raise ValueError(f"sequence of {len(groups)} groups exceeds the region of {len(seq)}")
        seq[:len(groups)] = groups
        self.ready.clear()
        self.started = False
        for event in self.res.events[self.j].drain():  # stale but a demand's (see _drain); keeps the queue short
            if event[0] in _DEMAND_EVENTS:
                self._on_demand_event(*event)
        self.res.commands[self.j].put(MSG_START, len(groups), int(cyclic))

    def demand(self, groups: list[int], timeout_s: float = 600.0) -> None:
        """Ask for ``groups`` (ids) read in this order into this client's demand slots, out of the sequence's
        order; wait for each with ``wait_demand(position)``, release each slot as a window slot's. Replaces what is
        left of the last demand (its slots already READY are released when their events arrive)."""
        if not groups:
            return
        deadline = time.monotonic() + timeout_s
        while self.demanded != self.demand_id:  # the coordinator has not copied the last demand's list yet
            self._drain()
            if self.demanded != self.demand_id and not sem_wait(self.res.sem_clients[self.j], 0.1):
                self.check_alive()
                if time.monotonic() > deadline:
                    raise PoolDied(f"pool {self.handle.name!r}: demand {self.demand_id} not taken in {timeout_s:.0f} s")
        region = self.res.demands[self.j]
        if len(groups) > len(region):
            raise ValueError(f"demand of {len(groups)} groups exceeds the region of {len(region)}")
        region[:len(groups)] = groups
        self.demand_id = (self.demand_id + 1) % (1 << DEMAND_ID_BITS)
        for slot, seq in self.demand_ready.values():  # the last demand's, READY but never waited for
            self.release(slot, seq)
        self.demand_ready.clear()
        self.res.commands[self.j].put(MSG_DEMAND, len(groups), self.demand_id)

    def wait_demand(self, pos: int, timeout_s: float = 600.0) -> tuple[int, int]:
        """Block until position ``pos`` of the current demand is in a slot; returns (slot, seq)."""
        return self._wait(self.demand_ready, pos, timeout_s, f"demand {self.demand_id} position {pos}")

    def demand_waiting(self, pos: int) -> bool:
        """Whether position ``pos`` of the current demand is READY (without waiting)."""
        self._drain()
        return pos in self.demand_ready

    def _on_demand_event(self, kind: int, a: int, b: int, c: int) -> None:
        if kind == MSG_DEMANDED:
            self.demanded = b
            return
        mine = c >> 32 == self.demand_id
        if kind == MSG_DEMAND_READY and mine:
            self.demand_ready[c & 0xFFFFFFFF] = (a, b)
        elif kind == MSG_DEMAND_READY:
            self.release(a, b)  # an earlier demand's (or a dead client's: then the coordinator ignores it)
        elif mine:  # DEMAND_FAILED
            raise PoolDied(f"pool {self.handle.name!r}: {self.res.get_error()}")

    def wait_ready(self, pos: int, timeout_s: float = 600.0) -> tuple[int, int]:
        """Block until the group at sequence position ``pos`` is in a slot; returns (slot, seq)."""
        return self._wait(self.ready, pos, timeout_s, f"sequence position {pos}")

    def _wait(self, table: dict[int, tuple[int, int]], pos: int, timeout_s: float, what: str) -> tuple[int, int]:
        """Block until ``pos`` is in ``table`` (the cyclic stream's READY slots, or the current demand's), draining
        this client's events; the pool checked alive at every idle tick."""
        deadline = time.monotonic() + timeout_s
        while pos not in table:
            self._drain()
            if pos in table:
                break
            if not sem_wait(self.res.sem_clients[self.j], 0.1):
                self.check_alive()
                if time.monotonic() > deadline:
                    raise PoolDied(f"pool {self.handle.name!r}: no data for {what} after {timeout_s:.0f} s")
        return table.pop(pos)

    def _drain(self) -> None:
        for kind, a, b, c in self.res.events[self.j].drain():
            if kind in _DEMAND_EVENTS:  # told apart by their ids, not by STARTED
                self._on_demand_event(kind, a, b, c)
            elif kind == MSG_STARTED:
                self.started = True
            elif not self.started:
                continue  # an event of an earlier sequence (or of a dead client on this index): stale
            elif kind == MSG_READY:
                self.ready[c] = (a, b)
            elif kind == MSG_FAILED:
                raise PoolDied(f"pool {self.handle.name!r}: {self.res.get_error()}")

    def release(self, slot: int, seq: int) -> None:
        self.res.commands[self.j].put(MSG_RELEASE, slot, seq)

    def stop_stream(self, detach: bool = False) -> None:
        try:
            self.res.commands[self.j].put(MSG_STOP_STREAM, 0, 0, int(detach))
        except (ValueError, RuntimeError):
            pass

    def close(self) -> None:
        self.stop_stream(detach=True)
        self.res.close()


_DEMAND_EVENTS = (MSG_DEMANDED, MSG_DEMAND_READY, MSG_DEMAND_FAILED)

__all__ = ["PoolClient", "PoolDied"]
