"""Prompt reuse for the continuous-batching scheduler (runtime/engine/scheduler.py): which rows of its KV cache
hold the keys and values of which token prefixes, so that a request whose prompt begins with one (a shared
system prompt, a conversation's earlier turns) starts its prefill after it instead of at slot 0. For a
streamed model every prompt chunk not prefilled is a weight pass saved.

What is cached. A row's slots [0, n) hold the KV entries of its tokens[0:n] (prompt, then output) while it
runs, and keep them after its request ends, until the row is given to another request: the cached prefixes
live in the batch's own cache, so caching costs no memory beyond it, and at most ``rows`` sequences of up to
max_len tokens are cached (the eviction bound). A free row is reused least recently used first, unless it
holds the best match of the request it is given to.

Lookup. As vLLM's automatic prefix caching, prompts are cut into blocks of ``block`` tokens, and block i's
hash is a hash of block i-1's and its own tokens, so one hash names a whole prefix. ``holders`` maps each
hash to the rows whose content begins with that prefix; a request's longest match is its last block whose
hash some row holds, extended token by token into that row's next block (as llama.cpp's ``cache_prompt``
compares tokens), and checked token by token (a hash collision can cost a match, never give a wrong one). The
row holding it is used in place when it is free, else the match is copied from it into the free row
(``KVCache.copy_prefix``: 2 x layers device copies, microseconds against a pass).

``pending`` maps the block hashes of the prompts being prefilled now to their rows: a request that would
reuse more of a prompt once its prefill is done waits for it (``Scheduler`` admits it a few passes later),
so N requests with one new system prompt (or ``n`` > 1 choices) prefill it once. Torch-free; the
model thread's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

BLOCK = 16  # tokens a hash covers: a match is found in whole blocks, then extended token by token


def block_hashes(tokens: Sequence[int], block: int = BLOCK) -> list[int]:
    """The chained hash of each whole block of ``tokens``: hash i names tokens[0:(i + 1) x block]."""
    out, h = [], 0
    for i in range(0, len(tokens) - block + 1, block):
        h = hash((h, tuple(tokens[i:i + block])))
        out.append(h)
    return out


class PrefixIndex:
    """The token content of every row of the scheduler's cache and a hash index over it (module docstring)."""

    def __init__(self, rows: int, block: int = BLOCK) -> None:
        self.block = block
        self.tokens: list[list[int]] = [[] for _ in range(rows)]  # row r's slots [0, n) hold tokens[r][:n]
        self.hashes: list[list[int]] = [[] for _ in range(rows)]
        self.holders: dict[int, set[int]] = {}
        self.pending: dict[int, int] = {}  # block hash -> the row whose prefill will write it
        self.pending_of: dict[int, list[int]] = {}
        self.used = [0.0] * rows  # when each row was last given up (least recently used: reused first)

    # ---- the content of rows ----------------------------------------------------------------------------

    def set(self, row: int, tokens: Sequence[int]) -> None:
        """Row ``row`` holds exactly ``tokens`` (after it was given to a request, with its reused prefix)."""
        self.truncate(row, 0)
        self.extend(row, tokens)

    def truncate(self, row: int, n: int) -> None:
        """Row ``row`` keeps only its first ``n`` tokens (its later slots will be written over)."""
        t = self.tokens[row]
        del t[n:]
        keep = n // self.block
        for h in self.hashes[row][keep:]:
            self._unhold(h, row)
        del self.hashes[row][keep:]

    def extend(self, row: int, tokens: Sequence[int]) -> None:
        """Row ``row``'s next slots now hold ``tokens``."""
        t, hs, b = self.tokens[row], self.hashes[row], self.block
        t.extend(tokens)
        while (len(hs) + 1) * b <= len(t):
            i = len(hs) * b
            h = hash((hs[-1] if hs else 0, tuple(t[i:i + b])))
            hs.append(h)
            self.holders.setdefault(h, set()).add(row)

    def sync(self, row: int, seq: Sequence[int], length: int) -> None:
        """Row ``row`` holds seq[:length] (prompt and output) after a step: add what the step wrote."""
        have = len(self.tokens[row])
        if length > have:
            self.extend(row, seq[have:length])

    def release(self, row: int, now: float | None = None) -> None:
        """Row ``row``'s request ended: its content stays, to be reused; it is the most recently used."""
        self.used[row] = time.monotonic() if now is None else now
        self.unpend(row)

    def forget(self, row: int) -> None:
        """Row ``row``'s content is unknown (a failed pass): nothing of it is reused."""
        self.truncate(row, 0)
        self.unpend(row)

    def _unhold(self, h: int, row: int) -> None:
        s = self.holders.get(h)
        if s is not None:
            s.discard(row)
            if not s:
                del self.holders[h]

    # ---- prompts being prefilled ----------------------------------------------------------------------------

    def pend(self, row: int, hashes: Sequence[int]) -> None:
        """Row ``row`` is prefilling a prompt of these block hashes."""
        self.unpend(row)
        self.pending_of[row] = list(hashes)
        for h in hashes:
            self.pending.setdefault(h, row)

    def unpend(self, row: int) -> None:
        for h in self.pending_of.pop(row, []):
            if self.pending.get(h) == row:
                del self.pending[h]

    # ---- lookup -----------------------------------------------------------------------------------------

    def match(self, prompt: Sequence[int], hashes: Sequence[int], free: Sequence[int]) -> tuple[int | None, int]:
        """(the row holding the longest prefix of ``prompt``, its length in tokens), preferring a free row among
        equal matches; (None, 0) without one. ``hashes``: block_hashes(prompt)."""
        best: tuple[int | None, int] = (None, 0)
        i = 0
        while i < len(hashes) and hashes[i] in self.holders:
            i += 1
        if i:
            rows = self.holders[hashes[i - 1]]
            n = i * self.block
            cands = [r for r in rows if self.tokens[r][:n] == list(prompt[:n])]  # a collision never matches
            if cands:
                best = (min(cands, key=lambda r: (r not in free, -self._extend(r, prompt, n))), n)
        if best[0] is None:  # no whole block: a shorter prefix of one row (a short prompt asked again)
            for r in free:
                k = self._extend(r, prompt, 0)
                if k > best[1]:
                    best = (r, k)
            return best
        return best[0], best[1] + self._extend(best[0], prompt, best[1])

    def _extend(self, row: int, prompt: Sequence[int], n: int) -> int:
        """How many tokens past ``n`` row ``row``'s content still matches ``prompt``."""
        t, k = self.tokens[row], 0
        while n + k < min(len(t), len(prompt)) and t[n + k] == prompt[n + k]:
            k += 1
        return k

    def waits(self, hashes: Sequence[int], matched: int) -> bool:
        """A prompt of these block hashes would reuse more than ``matched`` tokens once a prefill under way is
        done (its next block is being written now)."""
        i = matched // self.block
        return i < len(hashes) and hashes[i] in self.pending

    def lru(self, free: Sequence[int]) -> int:
        """The free row to give a request that matches none: the least recently used."""
        return min(free, key=lambda r: self.used[r])
