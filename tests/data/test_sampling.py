"""The fine-tuning sampler: at most a cap of utterances per class per epoch, no class twice in a batch."""

from __future__ import annotations

import numpy as np
import pytest

from raysv.data.sampling import UniqueClassBatches, epoch_selection


def test_epoch_selection_caps_each_class_and_changes_with_the_epoch():
    rng = np.random.default_rng(0)
    labels = np.concatenate([np.full(900, 0), np.full(40, 1), rng.integers(2, 50, 3000), np.full(5, -1)])
    first = epoch_selection(labels, cap=100, seed=3, epoch=0)
    counts = np.bincount(labels[first])
    assert counts[0] == 100 and counts[1] == 40  # a big class capped, a small one whole
    natural = np.bincount(labels[labels >= 0])
    assert np.array_equal(counts, np.minimum(natural, 100))
    assert not first[labels < 0].any()  # unlabelled rows never
    second = epoch_selection(labels, cap=100, seed=3, epoch=1)
    assert not np.array_equal(first[labels == 0], second[labels == 0])  # a new draw each epoch
    assert np.array_equal(first, epoch_selection(labels, cap=100, seed=3, epoch=0))  # same on every worker
    assert np.array_equal(epoch_selection(labels, None, 3, 0), labels >= 0)
    with pytest.raises(ValueError, match="cap"):
        epoch_selection(labels, 0, 3, 0)


def _stream(labels: np.ndarray, rows: int = 16):
    for start in range(0, len(labels), rows):
        idx = np.arange(start, min(start + rows, len(labels)))
        yield {"utt_index": idx, "wave": np.stack([np.full(4, i, np.float32) for i in idx])}


def test_batches_never_repeat_a_class_and_lose_only_the_tail():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 300, 5000)
    batcher = UniqueClassBatches(32)
    seen = []
    for batch in batcher(_stream(labels), lambda b: labels[b["utt_index"]]):
        assert len(batch["utt_index"]) == 32
        assert len(set(labels[batch["utt_index"]])) == 32  # no class twice
        assert np.array_equal(batch["wave"][:, 0], batch["utt_index"])  # rows stay whole
        seen.extend(batch["utt_index"].tolist())
    assert len(seen) == len(set(seen))  # no row twice
    assert len(seen) >= 5000 - 32 * 4 and batcher.repeats == 0


def test_batches_apply_the_selection_and_relax_when_classes_run_short():
    labels = np.arange(200) % 5  # 5 classes, batches of 8: uniqueness cannot hold
    keep = np.arange(200) % 2 == 0
    batcher = UniqueClassBatches(8, pool=16)
    batches = list(batcher(_stream(labels), lambda b: labels[b["utt_index"]], lambda b: keep[b["utt_index"]]))
    used = np.concatenate([b["utt_index"] for b in batches])
    assert keep[used].all() and len(used) == 96  # 100 selected rows, whole batches only
    assert batcher.repeats > 0  # the oldest rows were taken anyway, and counted
