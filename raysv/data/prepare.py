"""`raysv prepare`: audio files -> Parquet shards of FLAC bytes (the layout of ``raysv.artifacts.shards``).

The work runs as Ray tasks in two passes so that it scales to VoxCeleb2
(~1.1 M files) with a small driver:

1. decode: each task reads a chunk of files, resamples, encodes FLAC and
   writes the kept rows to ``OUT/_tmp/chunk-*.parquet``; it returns only
   counts and skip reasons. Chunk files are content-addressed, so an
   interrupted run resumes without re-decoding finished chunks.
2. shard: once the kept set is known, ``utt_index`` is dense over it; each
   task copies its slice of the chunk files into one ``part-NNNNN.parquet``.

On a multi-node cluster, ``OUT`` and the audio must be on a shared file system.
Outputs are byte-identical for identical inputs and settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from raysv.artifacts.jsonio import write_json
from raysv.artifacts.shards import MANIFEST_NAME, PART_RE, REPORT_NAME, ROW_GROUP_SIZE, SHARD_FORMAT_VERSION, shard_schema
from raysv.audio.io import (
    FFMPEG_INSTALL_HINT,
    SAMPLE_RATE,
    AudioReadError,
    FFmpegNotFoundError,
    encode_flac,
    ffmpeg_available,
    needs_ffmpeg,
    read_audio,
)
from raysv.data.inputs import Input, collect_inputs
from raysv.runtime import ensure_ray, on_terminal, run_windowed, task_window


logger = logging.getLogger(__name__)

SKIP_REASONS = ("unreadable", "empty", "too_short")
TMP_NAME = "_tmp"
_CHUNK_META_KEY = b"raysv.chunk"
# A shard whose audio could pass this many bytes is written with large_binary
# (int64 offsets); plain binary has int32 offsets and tops out at 2 GiB.
_BINARY_LIMIT = 2**31 - 2**26
_MAX_CHUNK = 256


_CHUNK_SCHEMA = pa.schema(
    [
        pa.field("utt_id", pa.string(), nullable=False),
        pa.field("speaker", pa.string(), nullable=True),
        pa.field("audio", pa.large_binary(), nullable=False),
        pa.field("sample_rate", pa.int32(), nullable=False),
        pa.field("num_samples", pa.int64(), nullable=False),
    ]
)


# ----------------------------------------------------------------------------- fingerprints


def _settings(sample_rate: int, min_seconds: float, shard_size: int, no_speakers: bool) -> dict[str, Any]:
    return {
        "format": SHARD_FORMAT_VERSION,
        "sample_rate": int(sample_rate),
        "min_seconds": float(min_seconds),
        "shard_size": int(shard_size),
        "no_speakers": bool(no_speakers),
        "row_group_size": ROW_GROUP_SIZE,
    }


def _digest(settings: dict[str, Any], inputs: Iterable[Input]) -> str:
    """sha256 of the settings and each input's path, speaker, size and mtime."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for inp in inputs:
        h.update(f"{inp.rel}\0{inp.abs}\0{inp.speaker or ''}\0{inp.size}\0{inp.mtime_ns}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- pass 1: decode


def _encode_one(abs_path: str, sample_rate: int, min_seconds: float) -> tuple[bytes, int] | tuple[str, str]:
    """``(flac, num_samples)`` for a kept file, ``(reason, detail)`` for a skipped one."""
    try:
        wave = read_audio(abs_path, sample_rate)
    except FFmpegNotFoundError:
        raise
    except AudioReadError as exc:
        try:
            if os.path.getsize(abs_path) == 0:
                return "empty", "file has 0 bytes"
        except OSError:
            pass
        return "unreadable", exc.reason
    except Exception as exc:  # a decoder crash on one corrupt file must not stop the corpus
        return "unreadable", f"{type(exc).__name__}: {exc}"
    if wave.size == 0:
        return "empty", "no audio samples"
    if wave.size < min_seconds * sample_rate:
        return "too_short", f"{wave.size / sample_rate:.3f} s < {min_seconds:g} s"
    return encode_flac(wave, sample_rate), int(wave.size)


def _encode_chunk(
    items: list[tuple[str, str, str | None]], sample_rate: int, min_seconds: float, dest: str
) -> dict[str, Any]:
    """Decode and encode ``(abs, rel, speaker)`` items; write kept rows to ``dest``; return a summary."""
    utt_ids: list[str] = []
    speakers: list[str | None] = []
    audio: list[bytes] = []
    lengths: list[int] = []
    skipped: list[dict[str, str]] = []
    for abs_path, rel, speaker in items:
        out = _encode_one(abs_path, sample_rate, min_seconds)
        if isinstance(out[0], bytes):
            utt_ids.append(str(PurePosixPath(rel).with_suffix("")))
            speakers.append(speaker)
            audio.append(out[0])
            lengths.append(int(out[1]))
        else:
            skipped.append({"path": rel, "reason": str(out[0]), "detail": str(out[1])})
    summary = {
        "kept": len(audio),
        "audio_bytes": int(sum(len(a) for a in audio)),
        "samples": int(sum(lengths)),
        "skipped": skipped,
    }
    table = pa.Table.from_arrays(
        [
            pa.array(utt_ids, pa.string()),
            pa.array(speakers, pa.string()),
            pa.array(audio, pa.large_binary()),
            pa.array([sample_rate] * len(audio), pa.int32()),
            pa.array(lengths, pa.int64()),
        ],
        schema=_CHUNK_SCHEMA.with_metadata({_CHUNK_META_KEY: json.dumps(summary).encode()}),
    )
    partial = dest + ".partial"
    pq.write_table(table, partial, compression="none", write_statistics=False)
    os.replace(partial, dest)
    return summary


@ray.remote(num_cpus=1, max_retries=2)
def _encode_chunk_task(
    items: list[tuple[str, str, str | None]], sample_rate: int, min_seconds: float, dest: str
) -> dict[str, Any]:
    return _encode_chunk(items, sample_rate, min_seconds, dest)


def _read_chunk_summary(path: Path) -> dict[str, Any] | None:
    """Summary stored in a finished chunk file, or None if the file is unusable."""
    try:
        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta[_CHUNK_META_KEY])
    except Exception:
        return None


# ----------------------------------------------------------------------------- pass 2: shards


def _plan_shards(kept: list[int], shard_size: int) -> list[list[tuple[int, int, int]]]:
    """For each shard, the ``(chunk, start, stop)`` row slices that fill it, in order."""
    plans: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    room = shard_size
    for ci, n in enumerate(kept):
        pos = 0
        while pos < n:
            take = min(room, n - pos)
            current.append((ci, pos, pos + take))
            pos += take
            room -= take
            if room == 0:
                plans.append(current)
                current, room = [], shard_size
    if current:
        plans.append(current)
    return plans


def _write_shard(segments: list[tuple[str, int, int]], first_index: int, dest: str, large: bool) -> pa.Table:
    """Copy row slices of chunk files into one shard; return its manifest rows."""
    pieces = [pq.read_table(path, memory_map=True).slice(start, stop - start) for path, start, stop in segments]
    src = pa.concat_tables(pieces).combine_chunks() if len(pieces) > 1 else pieces[0].combine_chunks()
    n = src.num_rows
    schema = shard_schema(large)
    table = pa.Table.from_arrays(
        [
            pa.array(np.arange(first_index, first_index + n, dtype=np.int64), pa.int64()),
            src.column("utt_id"),
            src.column("speaker"),
            src.column("audio").cast(schema.field("audio").type),
            src.column("sample_rate"),
            src.column("num_samples"),
        ],
        schema=schema,
    )
    partial = dest + ".partial"
    pq.write_table(
        table,
        partial,
        row_group_size=ROW_GROUP_SIZE,
        compression={"utt_index": "zstd", "utt_id": "zstd", "speaker": "zstd", "audio": "none",
                     "sample_rate": "zstd", "num_samples": "zstd"},
        use_dictionary=["speaker"],
        write_statistics=["utt_index", "utt_id", "speaker", "sample_rate", "num_samples"],
    )
    os.replace(partial, dest)
    return table.drop_columns(["audio"])


@ray.remote(num_cpus=1, max_retries=2)
def _write_shard_task(segments: list[tuple[str, int, int]], first_index: int, dest: str, large: bool) -> pa.Table:
    return _write_shard(segments, first_index, dest, large)


# ----------------------------------------------------------------------------- driver helpers


def _progress(total: int, desc: str, unit: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    # A bar redrawn into a log file is a line per refresh: bars on a terminal only.
    return tqdm(total=total, desc=desc, unit=unit, disable=not (enabled and on_terminal()), file=sys.stderr,
                dynamic_ncols=True)


def _is_artefact(name: str) -> bool:
    return (
        name in (MANIFEST_NAME, REPORT_NAME, TMP_NAME)
        or bool(PART_RE.fullmatch(name))
        or name.endswith(".partial")
    )


def _load_report(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / REPORT_NAME).read_text())
    except (OSError, ValueError):
        return None


def _check_output(out: Path, fingerprint: str, overwrite: bool) -> dict[str, Any] | None:
    """Return the existing report when ``out`` already holds this exact output; refuse a different one."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise NotADirectoryError(f"output {out} exists and is not a folder")
    names = [p.name for p in out.iterdir()]
    if not names:
        return None
    report = _load_report(out)
    same = report is not None and report.get("fingerprint") == fingerprint
    if (
        not overwrite
        and same
        and all((out / s).is_file() for s in report.get("shards", []))  # type: ignore[union-attr]
        and (out / MANIFEST_NAME).is_file()
    ):
        return report
    foreign = sorted(n for n in names if not _is_artefact(n))
    if not overwrite:
        if report is not None and not same:
            raise FileExistsError(
                f"output folder {out} already holds shards prepared from different inputs or settings; "
                "pass overwrite=True (--overwrite) to replace them, or choose another folder"
            )
        if foreign:
            raise FileExistsError(
                f"output folder {out} is not empty (it holds {', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); choose an empty folder or pass overwrite=True (--overwrite)"
            )
    # Replace (or finish) our own files only; chunk files in _tmp are content-addressed and reusable.
    (out / REPORT_NAME).unlink(missing_ok=True)
    for name in names:
        if name != TMP_NAME and name != REPORT_NAME and _is_artefact(name):
            (out / name).unlink(missing_ok=True)
    return None


# ----------------------------------------------------------------------------- prepare


def prepare_shards(
    audio_root: str | Path | None,
    out: str | Path,
    *,
    list_file: str | Path | None = None,
    no_speakers: bool = False,
    shard_size: int = 1000,
    min_seconds: float = 0.5,
    sample_rate: int = SAMPLE_RATE,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Turn a folder (or CSV list) of audio files into Parquet shards; return the report.

    Unreadable, empty and too-short files are skipped and listed in the report.
    Re-running with the same inputs and settings is a no-op; an existing
    different output is refused unless ``overwrite``.
    """
    t0 = time.perf_counter()
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if min_seconds < 0:
        raise ValueError(f"min_seconds must be >= 0, got {min_seconds}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if audio_root is None and list_file is None:
        raise ValueError("give an audio root folder, a list file, or both")
    root = Path(os.path.abspath(Path(audio_root).expanduser())) if audio_root is not None else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"audio root {root} is not a folder")
    lst = Path(os.path.abspath(Path(list_file).expanduser())) if list_file is not None else None
    out_dir = Path(os.path.abspath(Path(out).expanduser()))

    inputs, root = collect_inputs(root, lst, no_speakers)
    if not inputs:
        where = f"list {lst}" if lst is not None else f"{root}"
        raise ValueError(f"no audio files found in {where} (looked for wav, flac, ogg, mp3, m4a, ...)")
    ffmpeg_needed = [i.rel for i in inputs if needs_ffmpeg(i.rel)]
    if ffmpeg_needed and not ffmpeg_available():
        raise FFmpegNotFoundError(
            f"{len(ffmpeg_needed)} input file(s) such as {ffmpeg_needed[0]!r} are m4a/aac/mp4 and need ffmpeg, "
            f"which is not on PATH; {FFMPEG_INSTALL_HINT}"
        )

    settings = _settings(sample_rate, min_seconds, shard_size, no_speakers)
    fingerprint = _digest(settings, inputs)
    existing = _check_output(out_dir, fingerprint, overwrite)
    if existing is not None:
        if show_progress:
            print(f"{out_dir} is already prepared from these inputs; nothing to do "
                  f"({existing.get('num_utterances')} utterances, {existing.get('num_skipped')} skipped)")
        return {**existing, "reused": True}

    tmp = out_dir / TMP_NAME
    tmp.mkdir(parents=True, exist_ok=True)
    ensure_ray()
    window = task_window()

    # Pass 1: decode and encode chunks of files; keep only small summaries in the driver.
    chunk = min(_MAX_CHUNK, max(8, math.ceil(len(inputs) / 64)))
    chunk_settings = {k: settings[k] for k in ("format", "sample_rate", "min_seconds")}
    chunk_paths: list[Path] = []
    summaries: list[dict[str, Any] | None] = []
    todo: list[tuple[int, list[Input]]] = []
    for ci, start in enumerate(range(0, len(inputs), chunk)):
        part = inputs[start:start + chunk]
        path = tmp / f"chunk-{ci:06d}-{_digest(chunk_settings, part)[:20]}.parquet"
        chunk_paths.append(path)
        summaries.append(_read_chunk_summary(path) if path.is_file() else None)
        if summaries[-1] is None:
            todo.append((ci, part))

    bar = _progress(len(inputs), "prepare: decode", "file", show_progress)
    bar.update(len(inputs) - sum(len(p) for _, p in todo))

    def decode_jobs() -> Iterator[tuple[int, Callable[[], ray.ObjectRef], int]]:
        for ci, part in todo:
            items = [(i.abs, i.rel, i.speaker) for i in part]
            dest = str(chunk_paths[ci])
            yield ci, (lambda items=items, dest=dest: _encode_chunk_task.remote(items, sample_rate, min_seconds, dest)), len(part)

    def decode_done(ci: int, summary: dict[str, Any], weight: int) -> None:
        summaries[ci] = summary
        bar.update(weight)

    try:
        run_windowed(decode_jobs(), window, decode_done)
    finally:
        bar.close()

    kept = [int(s["kept"]) for s in summaries]  # type: ignore[index]
    num_kept = sum(kept)
    skipped = [entry for s in summaries for entry in s["skipped"]]  # type: ignore[index]
    by_reason = {r: 0 for r in SKIP_REASONS}
    for entry in skipped:
        by_reason[entry["reason"]] = by_reason.get(entry["reason"], 0) + 1
    if num_kept == 0:
        examples = "; ".join(f"{e['path']}: {e['reason']} ({e['detail']})" for e in skipped[:3])
        raise ValueError(f"none of the {len(inputs)} input files could be used ({examples})")

    # Pass 2: dense utt_index over the kept rows, one task per shard.
    plans = _plan_shards(kept, shard_size)
    chunk_bytes = [int(s["audio_bytes"]) for s in summaries]  # type: ignore[index]
    large = any(sum(chunk_bytes[ci] for ci in {c for c, _, _ in plan}) > _BINARY_LIMIT for plan in plans)
    shard_names = [f"part-{i:05d}.parquet" for i in range(len(plans))]
    firsts = np.cumsum([0] + [sum(b - a for _, a, b in plan) for plan in plans]).tolist()
    manifests: list[pa.Table | None] = [None] * len(plans)

    bar = _progress(len(plans), "prepare: shards", "shard", show_progress)

    def shard_jobs() -> Iterator[tuple[int, Callable[[], ray.ObjectRef], int]]:
        for si, plan in enumerate(plans):
            segments = [(str(chunk_paths[ci]), a, b) for ci, a, b in plan]
            dest = str(out_dir / shard_names[si])
            first = int(firsts[si])
            yield si, (lambda segments=segments, first=first, dest=dest: _write_shard_task.remote(segments, first, dest, large)), 1

    def shard_done(si: int, table: pa.Table, weight: int) -> None:
        manifests[si] = table
        bar.update(weight)

    try:
        run_windowed(shard_jobs(), window, shard_done)
    finally:
        bar.close()

    manifest = pa.concat_tables([m for m in manifests if m is not None]).combine_chunks()
    pq.write_table(manifest, str(out_dir / (MANIFEST_NAME + ".partial")), compression="zstd")
    os.replace(out_dir / (MANIFEST_NAME + ".partial"), out_dir / MANIFEST_NAME)
    shutil.rmtree(tmp, ignore_errors=True)

    elapsed = time.perf_counter() - t0
    speakers = manifest.column("speaker")
    num_speakers = len(pc.unique(speakers.drop_null())) if speakers.null_count < len(speakers) else 0
    samples = int(sum(int(s["samples"]) for s in summaries))  # type: ignore[index]
    report: dict[str, Any] = {
        "format": SHARD_FORMAT_VERSION,
        "fingerprint": fingerprint,
        "audio_root": str(root) if audio_root is not None else None,
        "list_file": str(lst) if lst is not None else None,
        "settings": settings,
        "num_inputs": len(inputs),
        "num_utterances": num_kept,
        "num_skipped": len(skipped),
        "skipped_by_reason": by_reason,
        "skipped": skipped,
        "num_speakers": num_speakers,
        "total_hours": round(samples / sample_rate / 3600.0, 4),
        "audio_bytes": int(sum(chunk_bytes)),
        "audio_type": "large_binary" if large else "binary",
        "num_shards": len(shard_names),
        "shards": shard_names,
        "elapsed_seconds": round(elapsed, 3),
        "files_per_second": round(len(inputs) / elapsed, 2) if elapsed > 0 else None,
    }
    write_json(out_dir / REPORT_NAME, report)

    line = (
        f"prepared {num_kept} utterances into {len(shard_names)} shard(s) in {out_dir} "
        f"({len(inputs) / elapsed:.1f} files/s); skipped {len(skipped)}"
    )
    if skipped:
        line += " (" + ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in by_reason.items() if n) + "; see report.json)"
    if show_progress:
        print(line)
    else:
        logger.info(line)
    return report
