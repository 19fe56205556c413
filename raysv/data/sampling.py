"""Which labelled utterances an epoch trains on, and batches in which no class appears twice.

The reference sampler (wavlm_ssl_sv) takes at most 500 utterances of each class per epoch
and never puts one class twice in a GPU's batch. Here the cap is a selection made from the
label table, the seed and the epoch alone, so every worker computes the same one without
talking to the others; the batches are formed on each worker from the rows it streams,
with a small pool for rows whose class is already in the batch being filled.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator

import numpy as np


def epoch_selection(labels: np.ndarray, cap: int | None, seed: int, epoch: int) -> np.ndarray:
    """Boolean mask over ``utt_index``: labelled utterances used this epoch, at most ``cap`` per class.

    Classes with more than ``cap`` utterances contribute a random ``cap`` of them, drawn anew
    each epoch (O(N log N): 1 M utterances take a fraction of a second). ``cap`` None: all.
    """
    labels = np.asarray(labels)
    kept = labels >= 0
    if cap is None:
        return kept
    if cap < 1:
        raise ValueError(f"the per-class cap must be >= 1, got {cap}")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch)])
    keys = rng.random(labels.size)
    order = np.lexsort((keys, labels))  # by class, then random within the class
    sorted_labels = labels[order]
    starts = np.r_[0, np.flatnonzero(sorted_labels[1:] != sorted_labels[:-1]) + 1]
    sizes = np.diff(np.r_[starts, labels.size])
    rank = np.arange(labels.size) - np.repeat(starts, sizes)
    selected = np.zeros(labels.size, dtype=bool)
    selected[order] = rank < cap
    return selected & kept


class UniqueClassBatches:
    """Re-batch a stream of row batches into batches of ``size`` rows in which no label repeats.

    A row whose label is already in the batch being filled waits in a pool (at most
    ``pool`` rows) and goes into a later batch. Should the pool fill with rows none of
    which fits (fewer classes than ``size``), the oldest is taken anyway and counted in
    ``repeats``. Rows left at the end of the stream that make no full batch are dropped,
    as with ``drop_last``.
    """

    def __init__(self, size: int, pool: int | None = None):
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        self.size = size
        self.pool = pool if pool is not None else 4 * size
        self.repeats = 0

    def __call__(
        self,
        batches: Iterable[dict[str, np.ndarray]],
        labels_of: Callable[[dict[str, np.ndarray]], np.ndarray],
        keep: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """``labels_of(batch) -> (n,) ints`` gives each row's class; ``keep(batch) -> (n,) bools`` filters rows."""
        waiting: deque[tuple[dict[str, np.ndarray], int, int]] = deque()  # (source batch, row, label)
        for batch in batches:
            rows = np.arange(len(next(iter(batch.values()))))
            if keep is not None:
                rows = rows[np.asarray(keep(batch), dtype=bool)]
            labels = np.asarray(labels_of(batch))
            waiting.extend((batch, int(r), int(labels[r])) for r in rows)
            while len(waiting) >= self.size:
                chosen = self._fill(waiting, final=False)
                if chosen is None:
                    break
                yield self._stack(chosen)
        while len(waiting) >= self.size:
            chosen = self._fill(waiting, final=True)
            if chosen is None:
                break
            yield self._stack(chosen)

    def _fill(self, waiting: deque, final: bool) -> list | None:
        """Take ``size`` rows of distinct labels, oldest first; None when more rows should come first."""
        popped, chosen, labels = [], [], set()
        while waiting and len(chosen) < self.size:
            item = waiting.popleft()
            popped.append(item)
            if item[2] not in labels:
                chosen.append(item)
                labels.add(item[2])
        if len(chosen) < self.size:
            if not final and len(popped) < self.pool:
                waiting.extendleft(reversed(popped))  # wait for rows of other classes
                return None
            # The pool holds only repeats: relax, taking the oldest of them.
            taken = {id(item) for item in chosen}
            extra = [item for item in popped if id(item) not in taken][: self.size - len(chosen)]
            self.repeats += len(extra)
            chosen += extra
        taken = {id(item) for item in chosen}
        waiting.extendleft(reversed([item for item in popped if id(item) not in taken]))
        return chosen

    @staticmethod
    def _stack(chosen: list) -> dict[str, np.ndarray]:
        keys = chosen[0][0].keys()
        return {k: np.stack([np.asarray(batch[k][row]) for batch, row, _ in chosen]) for k in keys}
