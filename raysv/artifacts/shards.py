"""Shard folders as written by ``raysv prepare``: the schema, and reading manifests, reports and row groups.

Layout of a prepared folder (DESIGN.md section 4)::

    OUT/part-00000.parquet ...   utt_index, utt_id, speaker, audio (FLAC), sample_rate, num_samples
    OUT/manifest.parquet         the same rows without audio
    OUT/report.json              counts, skipped files with reasons, input fingerprint; written last

Paths may be local or URIs (``s3://…``) that pyarrow's file systems open.
"""

from __future__ import annotations

import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raysv.audio.io import decode_audio

log = logging.getLogger(__name__)

SHARD_FORMAT_VERSION = 1
ROW_GROUP_SIZE = 64
MANIFEST_NAME = "manifest.parquet"
REPORT_NAME = "report.json"
PART_RE = re.compile(r"part-\d{5,}\.parquet")


def shard_schema(large: bool = False) -> pa.Schema:
    """Schema of a ``part-NNNNN.parquet`` file; ``large`` for audio columns that could pass 2 GiB."""
    return pa.schema(
        [
            pa.field("utt_index", pa.int64(), nullable=False),
            pa.field("utt_id", pa.string(), nullable=False),
            pa.field("speaker", pa.string(), nullable=True),
            pa.field("audio", pa.large_binary() if large else pa.binary(), nullable=False),
            pa.field("sample_rate", pa.int32(), nullable=False),
            pa.field("num_samples", pa.int64(), nullable=False),
        ]
    )


def resolve(path: str | Path) -> tuple[pafs.FileSystem, str, str]:
    """File system, path inside it, and URI prefix (``""`` for local paths)."""
    s = str(path)
    if "://" in s:
        fs, inner = pafs.FileSystem.from_uri(s)
        return fs, inner.rstrip("/"), s.split("://", 1)[0] + "://"
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(s)), ""


def shard_files(path: str | Path) -> list[str]:
    """Sorted ``part-NNNNN.parquet`` paths (or URIs) of a prepared folder."""
    fs, base, prefix = resolve(path)
    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"shard folder not found: {path}")
    files = sorted(
        f.path for f in fs.get_file_info(pafs.FileSelector(base, recursive=False))
        if f.type == pafs.FileType.File and PART_RE.fullmatch(f.base_name)
    )
    if not files:
        raise FileNotFoundError(f"no part-NNNNN.parquet shards in {path}; run `raysv prepare` first")
    if fs.get_file_info(f"{base}/{REPORT_NAME}").type != pafs.FileType.File:
        log.warning("%s has no %s: its preparation may not have finished", path, REPORT_NAME)
    return [prefix + f for f in files]


def shard_row_groups(path: str | Path) -> list[tuple[str, int]]:
    """``(file, row group)`` of every row group of the shards, from their footers (read in parallel)."""
    fs, _, prefix = resolve(path)

    def groups(uri: str) -> list[tuple[str, int]]:
        with fs.open_input_file(uri[len(prefix):]) as f:
            count = pq.ParquetFile(f).metadata.num_row_groups
        return [(uri, i) for i in range(count)]

    with ThreadPoolExecutor(max_workers=16) as pool:
        return [g for file_groups in pool.map(groups, shard_files(path)) for g in file_groups]


def read_row_groups(groups: Iterable[tuple[str, int]], columns: list[str] | None, rng: np.random.Generator) -> pa.Table:
    """The rows of the given ``(file, row group)`` pairs, shuffled together.

    Each file is opened once (one file-system lookup and footer read), however many of
    its row groups are asked for.
    """
    by_file: dict[str, list[int]] = {}
    for uri, group in groups:
        by_file.setdefault(str(uri), []).append(int(group))
    tables = []
    for uri, wanted in by_file.items():
        fs, inner, _ = resolve(uri)
        with fs.open_input_file(inner) as f:
            parquet = pq.ParquetFile(f)
            tables.extend(parquet.read_row_group(g, columns=columns) for g in wanted)
    table = pa.concat_tables(tables)
    return table.take(rng.permutation(table.num_rows))


def check_shards(path: str | Path) -> None:
    """Every shard ``report.json`` lists is there and has a readable footer, before a stage reads them.

    A shard deleted or truncated after ``raysv prepare`` would otherwise fail deep inside a Ray
    Data task mid-epoch; this names every bad file at once.
    """
    fs, base, _ = resolve(path)
    try:
        listed = read_report(path).get("shards")
    except FileNotFoundError:
        listed = None
    names = listed if listed else [Path(f).name for f in shard_files(path)]
    problems = []
    for name in names:
        target = f"{base}/{name}"
        info = fs.get_file_info(target)
        if info.type != pafs.FileType.File:
            problems.append(f"{target}: missing")
            continue
        try:
            with fs.open_input_file(target) as f:
                pq.ParquetFile(f).metadata  # noqa: B018 - reading the footer is the check
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            problems.append(f"{target}: unreadable ({err})")
    if problems:
        more = f" … ({len(problems)} in all)" if len(problems) > 10 else ""
        raise FileNotFoundError(f"the shards in {path} are damaged: " + "; ".join(problems[:10]) + more
                                + "; prepare them again with `raysv prepare --overwrite`")


def read_manifest(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """The rows of a shard folder's ``manifest.parquet`` (the folder, or the file itself), without audio."""
    fs, base, _ = resolve(path)
    target = base if base.endswith(".parquet") else f"{base}/{MANIFEST_NAME}"
    if fs.get_file_info(target).type != pafs.FileType.File:
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {path}; run `raysv prepare` first")
    if columns is not None:
        names = pq.read_schema(target, filesystem=fs).names
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError(f"{target} has no column {', '.join(missing)}")
    return pq.read_table(target, columns=columns, filesystem=fs)


def manifest_columns(path: str | Path) -> list[str]:
    fs, base, _ = resolve(path)
    target = base if base.endswith(".parquet") else f"{base}/{MANIFEST_NAME}"
    if fs.get_file_info(target).type != pafs.FileType.File:
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {path}; run `raysv prepare` first")
    return pq.read_schema(target, filesystem=fs).names


def manifest_rows(path: str | Path) -> int:
    """Number of utterances of a shard folder, from its manifest's footer."""
    fs, base, _ = resolve(path)
    target = f"{base}/{MANIFEST_NAME}"
    if fs.get_file_info(target).type != pafs.FileType.File:
        raise FileNotFoundError(f"{path} holds no {MANIFEST_NAME}: prepare the shards with `raysv prepare`")
    with fs.open_input_file(target) as f:
        return pq.ParquetFile(f).metadata.num_rows


def manifest_speakers(path: str | Path) -> set[str]:
    """The speakers named in a shard manifest (empty when it carries none)."""
    if "speaker" not in manifest_columns(path):
        return set()
    return {s for s in read_manifest(path, ["speaker"]).column("speaker").to_pylist() if s}


def read_report(path: str | Path) -> dict[str, Any]:
    """The ``report.json`` of a prepared folder."""
    fs, base, _ = resolve(path)
    target = f"{base}/{REPORT_NAME}"
    if fs.get_file_info(target).type != pafs.FileType.File:
        raise FileNotFoundError(f"no {REPORT_NAME} in {path}: preparation missing or unfinished")
    with fs.open_input_stream(target) as f:
        return json.loads(f.read().decode("utf-8"))


def shard_utt_index(path: str | Path) -> np.ndarray:
    """Every ``utt_index`` of the shard files, read from that column alone."""
    parts = []
    for uri in shard_files(path):
        fs, inner, _ = resolve(uri)
        parts.append(pq.read_table(inner, columns=["utt_index"], filesystem=fs).column("utt_index").to_numpy())
    return np.concatenate(parts).astype(np.int64)


def decode_row(row: dict[str, Any]) -> np.ndarray:
    """Float32 mono waveform of a shard row (its ``audio`` FLAC bytes)."""
    wave, rate = decode_audio(row["audio"])
    expected = row.get("sample_rate")
    if expected is not None and int(expected) != rate:
        raise ValueError(f"row {row.get('utt_id', '?')}: FLAC says {rate} Hz but the row says {int(expected)} Hz")
    return wave
