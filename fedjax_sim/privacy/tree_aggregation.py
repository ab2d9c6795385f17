"""Tree aggregation's sensitivity under min-separation participation (DP-FTRL, Kairouz et al.
2021, Appendix D).

The tree mechanism releases, for every complete dyadic block of rounds [i·2^j, (i+1)·2^j)
inside the first t rounds, the block's sum of clipped updates plus N(0, σ²) noise; prefix
sums are read off the released nodes. It is the matrix mechanism whose strategy C has a
0/1 row per node. A client that takes part in the rounds of a pattern p (at most k rounds,
any two at least b apart) moves node N by |N ∩ p| clip norms, so the squared sensitivity is

    ζ(t; b, k) = max over patterns p of  Σ_{complete nodes N} |N ∩ p|²,

and the release is a Gaussian mechanism with noise multiplier z / √ζ. `jax_privacy`'s
`get_min_sep_sensitivity_upper_bound` bounds ζ for any C (Choquette-Choo et al. 2023,
Algorithm 4), loosely for the tree (80 against the exact 79 for Gboard's published
setting below); this module computes ζ exactly by dynamic programming over the dyadic
blocks.

A table G_j[m, s, e] holds the largest Σ |N ∩ p|² over the nodes of one complete block of
2^j rounds, for patterns of exactly m participations in it whose first participation is at
least s rounds after the block's start and whose last is at least e rounds before its end
(s, e < b; -inf where none fits). Two halves join with the constraint that the gap across
the middle is at least b, and the block's own node adds m². The first t rounds are a
forest of complete blocks (the binary digits of t, largest first), so the prefix state of
t extends that of t − lowbit(t) by one block. The block tables cost O(b·T²) arithmetic
once (1.4 s for T = 2000, b = 314 on one core); each ζ(t) after them a few O(k·b²) steps.
"""

from __future__ import annotations

import math

import numpy as np

_NEG = -np.inf


def _rows(table: np.ndarray) -> int:
    """1 + the largest m with a finite entry (tables are -inf beyond what fits)."""
    live = np.isfinite(table.reshape(table.shape[0], -1)).any(axis=1)
    return int(np.nonzero(live)[0].max()) + 1


def _join(left: np.ndarray, right: np.ndarray, *, half: int) -> np.ndarray:
    """The [m, s, e] table of a complete block of 2·`half` rounds from its halves' tables
    (gap across the middle >= b), plus the block's own node (m²)."""
    k1, b = left.shape[0], left.shape[1]
    # One half empty: the other's end gap (right empty) or offset (left empty) shrinks by half.
    shifted = np.maximum(np.arange(b) - half, 0)
    out = np.maximum(left[:, :, shifted], right[:, shifted, :])
    opposite = b - 1 - np.arange(b)  # right half's offset forced by the left's end gap e1
    n1, n2 = _rows(left), _rows(right)
    step = max(1, 4_000_000 // max(1, (n1 - 1) * b * b))
    for m2 in range(1, n2):
        rows = min(n1, k1 - m2)
        if rows <= 1:
            continue
        a, c = left[1:rows], right[m2][opposite]  # c[e1] = right's row with s = b-1-e1
        best = np.full((rows - 1, b, b), _NEG)
        for lo in range(0, b, step):  # max over e1 of a[m1, s, e1] + c[e1, e]
            chunk = a[:, :, lo:lo + step, None] + c[None, None, lo:lo + step, :]
            best = np.maximum(best, chunk.max(axis=2))
        out[1 + m2:rows + m2] = np.maximum(out[1 + m2:rows + m2], best)
    out += (np.arange(k1) ** 2)[:, None, None]
    out[0] = 0.0
    return out


def _extend(state: np.ndarray, block: np.ndarray, *, size: int) -> np.ndarray:
    """The [m, e] state of some rounds followed by a complete block of `size` rounds."""
    k1, b = state.shape
    clip_e = np.maximum(np.arange(b) - size, 0)  # block empty: the end gap moves left
    out = np.maximum(state[:, clip_e], block[:, 0, :])
    opposite = b - 1 - np.arange(b)
    n1, n2 = _rows(state), _rows(block)
    for m2 in range(1, n2):
        rows = min(n1, k1 - m2)
        if rows <= 1:
            continue
        best = (state[1:rows, :, None] + block[m2][opposite][None]).max(axis=1)
        out[1 + m2:rows + m2] = np.maximum(out[1 + m2:rows + m2], best)
    out[0] = 0.0
    return out


class TreeSensitivity:
    """ζ(t; b, k) for every t (module doc), extended as later rounds are asked for."""

    def __init__(self, min_separation: int, max_participations: int | None = None):
        if int(min_separation) < 1:
            raise ValueError(f"min_separation must be >= 1, got {min_separation}")
        self.b = int(min_separation)
        self.k = None if max_participations is None else int(max_participations)
        self._cap = 0  # participations the tables are built for
        self._blocks: list[np.ndarray] = []
        self._prefix: dict[int, np.ndarray] = {}

    def _reset(self, rounds: int) -> None:
        cap = self._needed(rounds) if self.k is not None else max(self._needed(rounds),
                                                                   2 * self._cap)
        b = self.b
        leaf = np.full((cap + 1, b, b), _NEG)
        leaf[0] = 0.0
        leaf[1, 0, 0] = 1.0
        self._cap, self._blocks, self._prefix = cap, [leaf], {}

    def _block(self, j: int) -> np.ndarray:
        while len(self._blocks) <= j:
            i = len(self._blocks)
            child = self._blocks[-1]
            self._blocks.append(_join(child, child, half=2 ** (i - 1)))
        return self._blocks[j]

    def _state(self, t: int) -> np.ndarray:
        """[m, e] for the first t rounds (their first participation unconstrained). Only the
        states of t's binary prefixes are kept: O(log t) of them, each reused by later t."""
        chain, head = [], t
        while head and head not in self._prefix:
            chain.append(head)
            head -= head & -head
        state = self._prefix[head] if head else self._empty()
        kept = {}
        while head:  # `head` and its own prefixes stay
            kept[head] = self._prefix[head]
            head -= head & -head
        for prefix in reversed(chain):
            low = prefix & -prefix
            state = _extend(state, self._block(low.bit_length() - 1), size=low)
            kept[prefix] = state
        self._prefix = kept
        return state

    def _empty(self) -> np.ndarray:
        none = np.full((self._cap + 1, self.b), _NEG)
        none[0] = 0.0
        return none

    def _needed(self, rounds: int) -> int:
        needed = math.ceil(rounds / self.b)
        return needed if self.k is None else min(needed, self.k)

    def reserve(self, rounds: int) -> None:
        """Builds the tables for up to `rounds` rounds now, so that asking for ζ round by
        round does not rebuild them as the participations grow."""
        if rounds > 0 and (self._needed(rounds) > self._cap or not self._blocks):
            self._reset(rounds)

    def squared(self, rounds: int) -> float:
        """ζ of the first `rounds` rounds."""
        if rounds <= 0:
            return 0.0
        self.reserve(rounds)
        return float(self._state(rounds)[:self._needed(rounds) + 1, 0].max())
