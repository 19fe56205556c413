"""Ray Data pipelines per stage: shards → decode → crops → augment, streamed to the trainers.

Decoding, cropping and augmentation run in CPU ``map_batches`` tasks, never in
the training processes; each epoch re-executes the pipeline, so block order,
crop positions and augmentation differ from epoch to epoch. The dataset is
never materialised: rows stream from Parquet to the workers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from raysv.artifacts.shards import ROW_GROUP_SIZE, read_row_groups, shard_files, shard_row_groups
from raysv.audio.augment import AugmentConfig
from raysv.audio.io import SAMPLE_RATE
from raysv.config import ConfigError
from raysv.data.trials import TrialList


@dataclass
class DataConfig:
    """``data``: the training shards, the trial lists, augmentation and how shards are streamed."""

    shards: str = "data/train_shards"
    trials: dict[str, TrialList] = field(default_factory=dict)
    dev_trials: TrialList | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    shuffle_buffer: int = 256
    mix_row_groups: int = 8  # row groups read and shuffled together per read task (shards are in speaker order)
    prefetch_batches: int = 4  # batches each training worker keeps ready ahead of its step
    sample_rate: int = SAMPLE_RATE  # of the shards; the models are built for 16 kHz

    def validate(self, prefix: str = "data") -> None:
        if self.sample_rate != SAMPLE_RATE:
            raise ConfigError(f"{prefix}.sample_rate: raysv's models take {SAMPLE_RATE} Hz audio, got {self.sample_rate}")
        if self.mix_row_groups < 1:
            raise ConfigError(f"{prefix}.mix_row_groups: must be >= 1, got {self.mix_row_groups}")


def random_crop(wave: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """A random window of ``length`` samples; short utterances are repeated to length."""
    if wave.size == 0:
        raise ValueError("cannot crop an empty waveform")
    if wave.size < length:
        wave = np.tile(wave, int(np.ceil(length / wave.size)))
    start = int(rng.integers(0, wave.size - length + 1))
    return wave[start : start + length]


@lru_cache(maxsize=4)
def _augmenter(params: tuple) -> Any:
    from raysv.audio.augment import Augmenter

    return Augmenter(**dict(params))


def augment_params(cfg: AugmentConfig | None) -> tuple | None:
    """A hashable description of the augmentation, so each process builds its Augmenter once."""
    return None if cfg is None else cfg.params()


def check_augment(cfg: AugmentConfig | None) -> None:
    """Build the augmenter once on the driver: a missing noise/RIR folder fails before training."""
    params = augment_params(cfg)
    if params is not None:
        _augmenter(params)


def _decode(audio: bytes) -> np.ndarray:
    from raysv.audio.io import decode_audio

    wave, sr = decode_audio(audio)
    if sr != SAMPLE_RATE:
        raise ValueError(f"shards must hold {SAMPLE_RATE} Hz audio, got {sr} Hz")
    return wave


def _views(wave: np.ndarray, counts_lengths: list[tuple[int, int]], aug: tuple | None, rng) -> list[np.ndarray]:
    """For each (count, length): ``count`` independent crops, each augmented independently."""
    augmenter = _augmenter(aug) if aug is not None else None
    out = []
    for count, length in counts_lengths:
        crops = []
        for _ in range(count):
            crop = random_crop(wave, length, rng).astype(np.float32, copy=True)
            if augmenter is not None:
                crop = augmenter(crop, rng)
            crops.append(crop)
        out.append(np.stack(crops))
    return out


def multi_crop_batch(batch: dict[str, np.ndarray], views: dict[str, tuple[int, float]], aug: tuple | None) -> dict:
    """Decode each utterance and draw the named groups of crops: ``{name: (count, seconds)}``."""
    rng = np.random.default_rng()
    names = list(views)
    spec = [(views[n][0], int(round(views[n][1] * SAMPLE_RATE))) for n in names]
    groups: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for audio in batch["audio"]:
        for name, crops in zip(names, _views(_decode(audio), spec, aug, rng)):
            groups[name].append(crops)
    out = {name: np.stack(groups[name]).astype(np.float32) for name in names}
    out["utt_index"] = np.asarray(batch["utt_index"], dtype=np.int64)
    out["pid"] = np.full(len(batch["utt_index"]), os.getpid(), dtype=np.int64)
    return out


def labelled_crop_batch(
    batch: dict[str, np.ndarray], seconds: float, aug: tuple | None, with_clean: bool,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """One random crop per utterance, augmented; plus the same crop clean when asked."""
    rng = rng if rng is not None else np.random.default_rng()
    length = int(round(seconds * SAMPLE_RATE))
    augmenter = _augmenter(aug) if aug is not None else None
    waves, cleans = [], []
    for audio in batch["audio"]:
        crop = random_crop(_decode(audio), length, rng).astype(np.float32, copy=True)
        cleans.append(crop)
        waves.append(augmenter(crop.copy(), rng) if augmenter is not None else crop)
    out = {
        "wave": np.stack(waves).astype(np.float32),
        "label": np.asarray(batch["label"], dtype=np.int64),
        "utt_index": np.asarray(batch["utt_index"], dtype=np.int64),
        "pid": np.full(len(waves), os.getpid(), dtype=np.int64),
    }
    if with_clean:
        out["clean"] = np.stack(cleans).astype(np.float32)
    return out


def _attach_labels(batch: dict[str, np.ndarray], table: np.ndarray) -> dict[str, np.ndarray]:
    """Join by utt_index with the label table and drop label -1 (or unlabelled) rows."""
    idx = np.asarray(batch["utt_index"], dtype=np.int64)
    labels = np.full(idx.shape, -1, dtype=np.int64)
    inside = idx < table.size
    labels[inside] = table[idx[inside]]
    keep = labels >= 0
    return {"utt_index": idx[keep], "audio": np.asarray(batch["audio"], dtype=object)[keep], "label": labels[keep]}


def label_table(utt_index: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Dense lookup array: ``table[utt_index] = label``, -1 where no label is given."""
    size = int(utt_index.max()) + 1 if utt_index.size else 0
    table = np.full(size, -1, dtype=np.int64)
    table[utt_index] = labels
    return table


def read_shards(path: str | Path, columns: list[str] | None = None) -> Any:
    """The shards of a prepared folder as a Ray Dataset in file order (manifest.parquet excluded)."""
    import ray

    ds = ray.data.read_parquet(shard_files(path))
    return ds.select_columns(list(columns)) if columns is not None else ds


def _read_row_group_batch(batch: dict[str, np.ndarray], columns: list[str] | None) -> Any:
    return read_row_groups(zip(batch["file"], batch["row_group"]), columns, np.random.default_rng())


def stream_shards(
    path: str | Path, columns: list[str] | None = None, *, mix_row_groups: int = 8, block_rows: int = 16
) -> Any:
    """The shards for training, in a new random order every epoch (every execution).

    Shards are written in speaker order, so a plain read gives batches of a few
    speakers. Each read task takes ``mix_row_groups`` row groups drawn at random (the
    row-group order is shuffled per epoch) and shuffles their rows together; the rows
    then flow on in blocks of ``block_rows``, so the first crops of an epoch do not
    wait for whole files to be cropped. The trainers' local shuffle buffer mixes further.
    """
    import ray

    if mix_row_groups < 1 or block_rows < 1:
        raise ValueError(f"mix_row_groups and block_rows must be >= 1, got {mix_row_groups}, {block_rows}")
    items = [{"file": uri, "row_group": group} for uri, group in shard_row_groups(path)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    _stream_freely(ds.context, mix_row_groups * ROW_GROUP_SIZE // block_rows + 1)
    ds = ds.randomize_block_order()
    ds = ds.map_batches(
        _read_row_group_batch, fn_kwargs={"columns": list(columns) if columns else None},
        batch_size=mix_row_groups, batch_format="numpy", num_cpus=1,
    )
    return ds.repartition(target_num_rows_per_block=block_rows)


def _stream_freely(ctx: Any, blocks_per_read: int) -> None:
    """Let the crop tasks have every CPU the read steps do not use.

    Ray Data's default scheduling, measured on 2 CPUs (``benchmarks/bench_pipeline.py``), ran one
    crop task at a time: (1) its resource reservation keeps CPUs for the read and repartition
    operators although they are idle after their first blocks, and (2) a read task that has
    produced two blocks more than were taken pauses while still holding its CPU. Here the read
    operators are cheap (2 % of the CPU time) and one read task's rows are in its memory anyway,
    so the reservation is off and a read task may hand out all its blocks at once and finish.
    Memory stays bounded by Ray Data's downstream-capacity backpressure and object spilling.
    """
    ctx.op_resource_reservation_enabled = False
    buffer = "_max_num_blocks_in_streaming_gen_buffer"  # Ray Data's (private) pause point of a read task
    setattr(ctx, buffer, max(getattr(ctx, buffer, 2) or 2, blocks_per_read))


def _read(data: DataConfig, batch_rows: int) -> Any:
    """Shard rows, mixed across row groups, in a new random order every epoch."""
    return stream_shards(data.shards, columns=["utt_index", "audio"], mix_row_groups=data.mix_row_groups,
                         block_rows=batch_rows)


def multi_crop_dataset(data: DataConfig, views: dict[str, tuple[int, float]], batch_rows: int = 16) -> Any:
    """Rows of named crop groups, ``{name: (count, seconds)}`` → (count, samples) float32 each.

    DINO's ``global``/``local`` crops and the contrastive ``views`` are both this dataset.
    """
    return _read(data, batch_rows).map_batches(
        multi_crop_batch,
        fn_kwargs={"views": views, "aug": augment_params(data.augment)},
        batch_size=batch_rows,
        batch_format="numpy",
        num_cpus=1,
    )


def supervised_dataset(data: DataConfig, table: np.ndarray, seconds: float, with_clean: bool, batch_rows: int = 16) -> Any:
    """Rows of ``wave`` (S,), ``label``, ``utt_index`` (+ ``clean``) for labelled utterances only."""
    import ray

    table_ref = ray.put(table)
    return (
        _read(data, batch_rows)
        .map_batches(_attach_labels_ref, fn_kwargs={"table_ref": table_ref}, batch_size=batch_rows, batch_format="numpy")
        .map_batches(
            labelled_crop_batch,
            fn_kwargs={"seconds": seconds, "aug": augment_params(data.augment), "with_clean": with_clean},
            batch_size=batch_rows,
            batch_format="numpy",
            num_cpus=1,
        )
    )


def _attach_labels_ref(batch: dict[str, np.ndarray], table_ref) -> dict[str, np.ndarray]:
    import ray

    table = table_ref if isinstance(table_ref, np.ndarray) else ray.get(table_ref)
    return _attach_labels(batch, table)
