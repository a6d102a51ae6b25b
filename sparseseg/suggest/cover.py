"""Greedy max-cover (facility location) over slice similarities.

F(S) = sum_j max_{i in S} sim(i, j) is monotone and submodular for sim >= 0, so greedy selection
is within 1 - 1/e of the best set of every size, and its order says what each slice adds.
Lazy greedy (Minoux 1978) keeps stale gains in a priority queue: by submodularity a stale gain
is an upper bound, so only the top of the queue is re-evaluated. It picks exactly what plain
greedy picks, ties broken by the lower index in both.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Pick:
    index: int
    gain: float


def cosine_similarity(features: np.ndarray) -> np.ndarray:
    """(N, D) features -> (N, N) similarity (1 + cos) / 2 in [0, 1].

    The shift keeps sim >= 0 (needed for the greedy guarantee) and changes no greedy choice:
    adding a constant to every similarity adds the same amount to every candidate's gain.
    An all-zero feature vector has cos 0 with everything."""
    f = np.asarray(features, np.float64)
    norm = np.linalg.norm(f, axis=1, keepdims=True)
    f = f / np.maximum(norm, 1e-12)
    cos = np.clip(f @ f.T, -1.0, 1.0)
    return ((1.0 + cos) / 2.0).astype(np.float32)


def coverage(sim: np.ndarray, selected) -> float:
    """F(S); F of the empty set is 0."""
    selected = list(selected)
    if not selected:
        return 0.0
    return float(np.asarray(sim, np.float64)[selected].max(axis=0).sum())


def _start(sim, selected):
    sim = np.asarray(sim, np.float64)
    n = sim.shape[0]
    if sim.shape != (n, n):
        raise ValueError(f"similarity must be square, got {sim.shape}")
    selected = sorted({int(i) for i in selected})
    cover = sim[selected].max(axis=0) if selected else np.zeros(n)
    return sim, selected, cover


def greedy_max_cover(sim, k: int, selected=()) -> list[Pick]:
    """Plain greedy: every step evaluates every candidate (O(k N^2)); the reference for tests."""
    sim, chosen, cover = _start(sim, selected)
    taken = np.zeros(sim.shape[0], bool)
    taken[chosen] = True
    picks = []
    for _ in range(min(k, int((~taken).sum()))):
        gains = np.array([np.maximum(row - cover, 0.0).sum() for row in sim])
        gains[taken] = -np.inf
        i = int(np.argmax(gains))  # first index among equal gains
        picks.append(Pick(i, float(gains[i])))
        taken[i] = True
        cover = np.maximum(cover, sim[i])
    return picks


def lazy_greedy_max_cover(sim, k: int, selected=()) -> list[Pick]:
    """Lazy greedy: the same picks as `greedy_max_cover`, usually with a few re-evaluations per
    step instead of N. `selected` are taken as already chosen (their gains are not reported)."""
    sim, chosen, cover = _start(sim, selected)
    n = sim.shape[0]
    taken = set(chosen)
    # Heap of (-upper bound on gain, index): ties pop the lower index first, as argmax does.
    heap = [(-float(np.maximum(sim[i] - cover, 0.0).sum()), i) for i in range(n) if i not in taken]
    heapq.heapify(heap)
    picks = []
    while heap and len(picks) < k:
        _, i = heapq.heappop(heap)
        gain = float(np.maximum(sim[i] - cover, 0.0).sum())
        # Fresh gain still beats every other upper bound (ties: lower index wins) -> it is the max.
        if not heap or (-gain, i) <= heap[0]:
            picks.append(Pick(i, gain))
            cover = np.maximum(cover, sim[i])
        else:
            heapq.heappush(heap, (-gain, i))
    return picks
