"""`raysv prepare`: audio files -> Parquet shards of FLAC bytes, and the shard reader.

Layout of a prepared folder (DESIGN.md section 4)::

    OUT/part-00000.parquet ...   utt_index, utt_id, speaker, audio (FLAC), sample_rate, num_samples
    OUT/manifest.parquet         the same rows without audio
    OUT/report.json              counts, skipped files with reasons, input fingerprint; written last

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

import csv
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from raysv.audio.io import (
    FFMPEG_INSTALL_HINT,
    AudioReadError,
    FFmpegNotFoundError,
    decode_audio,
    encode_flac,
    ffmpeg_available,
    is_audio_file,
    needs_ffmpeg,
    read_audio,
)

__all__ = [
    "SHARD_FORMAT_VERSION",
    "ROW_GROUP_SIZE",
    "SKIP_REASONS",
    "prepare_shards",
    "read_shards",
    "shard_row_groups",
    "stream_shards",
    "read_manifest",
    "read_report",
    "shard_files",
    "decode_row",
    "shard_schema",
]

logger = logging.getLogger(__name__)

SHARD_FORMAT_VERSION = 1
ROW_GROUP_SIZE = 64
SKIP_REASONS = ("unreadable", "empty", "too_short")
MANIFEST_NAME = "manifest.parquet"
REPORT_NAME = "report.json"
TMP_NAME = "_tmp"
_PART_RE = re.compile(r"part-\d{5,}\.parquet")
_CHUNK_META_KEY = b"raysv.chunk"
# A shard whose audio could pass this many bytes is written with large_binary
# (int64 offsets); plain binary has int32 offsets and tops out at 2 GiB.
_BINARY_LIMIT = 2**31 - 2**26
_MAX_CHUNK = 256
_HEADER_PATH_NAMES = {"path", "file", "filename", "audio", "wav", "audio_path"}
_HEADER_SPEAKER_NAMES = {"speaker", "spk", "speaker_id", "label"}


def shard_schema(large: bool = False) -> pa.Schema:
    """Schema of a ``part-NNNNN.parquet`` file."""
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


_CHUNK_SCHEMA = pa.schema(
    [
        pa.field("utt_id", pa.string(), nullable=False),
        pa.field("speaker", pa.string(), nullable=True),
        pa.field("audio", pa.large_binary(), nullable=False),
        pa.field("sample_rate", pa.int32(), nullable=False),
        pa.field("num_samples", pa.int64(), nullable=False),
    ]
)


@dataclass(frozen=True, slots=True)
class _Input:
    """One candidate file: where it is, how the report names it, its speaker and stat."""

    rel: str
    abs: str
    speaker: str | None
    size: int
    mtime_ns: int

    @property
    def utt_id(self) -> str:
        return str(PurePosixPath(self.rel).with_suffix(""))


# ----------------------------------------------------------------------------- inputs


def _scan_root(root: Path) -> list[str]:
    """Relative posix paths of audio files under ``root`` (follows links, skips hidden entries)."""
    found: list[str] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and is_audio_file(name):
                found.append(Path(os.path.relpath(os.path.join(dirpath, name), root)).as_posix())
    return found


def _read_list_file(list_file: Path) -> list[tuple[str, str | None]]:
    """Rows ``(path, speaker or None)`` of a CSV list; a header row is optional."""
    if not list_file.is_file():
        raise FileNotFoundError(f"list file not found: {list_file}")
    rows: list[tuple[str, str | None]] = []
    path_col, spk_col = 0, 1
    with open(list_file, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        first = True
        for lineno, row in enumerate(reader, start=1):
            cells = [c.strip() for c in row]
            if not cells or not any(cells) or cells[0].startswith("#"):
                continue
            if first:
                first = False
                lowered = [c.lower() for c in cells]
                if any(c in _HEADER_PATH_NAMES for c in lowered):
                    path_col = next(i for i, c in enumerate(lowered) if c in _HEADER_PATH_NAMES)
                    spk_col = next((i for i, c in enumerate(lowered) if c in _HEADER_SPEAKER_NAMES), -1)
                    continue
            if path_col >= len(cells) or not cells[path_col]:
                raise ValueError(f"{list_file}:{lineno}: missing path in row {row!r}")
            speaker = cells[spk_col] if 0 <= spk_col < len(cells) and cells[spk_col] else None
            rows.append((cells[path_col], speaker))
    return rows


def _speaker_from_rel(rel: str) -> str | None:
    """VoxCeleb layout ``id00012/session/00001.wav``: the first path component."""
    parts = PurePosixPath(rel).parts
    if len(parts) < 2 or parts[0] in ("..", "/"):
        return None
    return parts[0]


def _collect_inputs(
    audio_root: Path | None, list_file: Path | None, no_speakers: bool
) -> tuple[list[_Input], Path]:
    """Resolve the candidate files, sorted by path relative to the root."""
    if list_file is not None:
        root = audio_root if audio_root is not None else list_file.parent
        entries: list[tuple[str, str, str | None]] = []
        for raw, spk in _read_list_file(list_file):
            p = Path(raw).expanduser()
            absolute = os.path.abspath(p if p.is_absolute() else root / p)
            rel_os = os.path.relpath(absolute, root)
            if rel_os.startswith(".."):
                rel = Path(absolute).as_posix().lstrip("/")
                derived = None
            else:
                rel = Path(rel_os).as_posix()
                derived = _speaker_from_rel(rel)
            entries.append((rel, absolute, spk if spk is not None else derived))
    else:
        assert audio_root is not None
        root = audio_root
        entries = [(rel, str(root / rel), _speaker_from_rel(rel)) for rel in _scan_root(root)]

    entries.sort(key=lambda e: e[0])
    inputs: list[_Input] = []
    for rel, absolute, spk in entries:
        try:
            st = os.stat(absolute)
            size, mtime = int(st.st_size), int(st.st_mtime_ns)
        except OSError:
            size, mtime = -1, -1
        inputs.append(_Input(rel, absolute, None if no_speakers else spk, size, mtime))

    seen: dict[str, str] = {}
    for inp in inputs:
        other = seen.get(inp.utt_id)
        if other is not None:
            if other == inp.rel:
                raise ValueError(f"{inp.rel!r} is listed more than once")
            raise ValueError(
                f"two inputs map to the same utt_id {inp.utt_id!r}: {other!r} and {inp.rel!r}; "
                "utt_id is the path without extension, so keep one of them"
            )
        seen[inp.utt_id] = inp.rel
    return inputs, root


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


def _digest(settings: dict[str, Any], inputs: Iterable[_Input]) -> str:
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


def _ensure_ray() -> None:
    """Start (or attach to, via RAY_ADDRESS) a cluster only if this process has none."""
    if not ray.is_initialized():
        ray.init()


def _window() -> int:
    cpus = ray.cluster_resources().get("CPU", 1.0)
    return max(4, int(2 * cpus))


def _run_windowed(
    jobs: Iterator[tuple[int, Callable[[], ray.ObjectRef], int]],
    window: int,
    on_done: Callable[[int, Any, int], None],
) -> None:
    """Keep at most ``window`` tasks in flight; call ``on_done(key, result, weight)`` as each ends."""
    inflight: dict[ray.ObjectRef, tuple[int, int]] = {}

    def fill() -> None:
        while len(inflight) < window:
            job = next(jobs, None)
            if job is None:
                return
            key, submit, weight = job
            inflight[submit()] = (key, weight)

    try:
        fill()
        while inflight:
            done, _ = ray.wait(list(inflight), num_returns=1)
            for ref in done:
                key, weight = inflight.pop(ref)
                on_done(key, ray.get(ref), weight)
            fill()
    except BaseException:
        for ref in inflight:
            ray.cancel(ref)
        raise


def _progress(total: int, desc: str, unit: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def _is_artefact(name: str) -> bool:
    return (
        name in (MANIFEST_NAME, REPORT_NAME, TMP_NAME)
        or bool(_PART_RE.fullmatch(name))
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


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(partial, path)


# ----------------------------------------------------------------------------- prepare


def prepare_shards(
    audio_root: str | Path | None,
    out: str | Path,
    *,
    list_file: str | Path | None = None,
    no_speakers: bool = False,
    shard_size: int = 1000,
    min_seconds: float = 0.5,
    sample_rate: int = 16000,
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

    inputs, root = _collect_inputs(root, lst, no_speakers)
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
    _ensure_ray()
    window = _window()

    # Pass 1: decode and encode chunks of files; keep only small summaries in the driver.
    chunk = min(_MAX_CHUNK, max(8, math.ceil(len(inputs) / 64)))
    chunk_settings = {k: settings[k] for k in ("format", "sample_rate", "min_seconds")}
    chunk_paths: list[Path] = []
    summaries: list[dict[str, Any] | None] = []
    todo: list[tuple[int, list[_Input]]] = []
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
        _run_windowed(decode_jobs(), window, decode_done)
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
        _run_windowed(shard_jobs(), window, shard_done)
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
    _write_json(out_dir / REPORT_NAME, report)

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


# ----------------------------------------------------------------------------- reading


def _resolve(path: str | Path) -> tuple[pafs.FileSystem, str, str]:
    """Filesystem, path inside it, and URI prefix (``""`` for local paths)."""
    s = str(path)
    if "://" in s:
        fs, inner = pafs.FileSystem.from_uri(s)
        return fs, inner.rstrip("/"), s.split("://", 1)[0] + "://"
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(s)), ""


def shard_files(path: str | Path) -> list[str]:
    """Sorted ``part-NNNNN.parquet`` paths (or URIs) of a prepared folder."""
    fs, base, prefix = _resolve(path)
    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"shard folder not found: {path}")
    files = sorted(
        f.path for f in fs.get_file_info(pafs.FileSelector(base, recursive=False))
        if f.type == pafs.FileType.File and _PART_RE.fullmatch(f.base_name)
    )
    if not files:
        raise FileNotFoundError(f"no part-NNNNN.parquet shards in {path}; run `raysv prepare` first")
    if fs.get_file_info(f"{base}/{REPORT_NAME}").type != pafs.FileType.File:
        logger.warning("%s has no %s: its preparation may not have finished", path, REPORT_NAME)
    return [prefix + f for f in files]


def shard_row_groups(path: str | Path) -> list[tuple[str, int]]:
    """``(file, row group)`` of every row group of the shards, from their footers (read in parallel)."""
    from concurrent.futures import ThreadPoolExecutor

    fs, _, prefix = _resolve(path)

    def groups(uri: str) -> list[tuple[str, int]]:
        with fs.open_input_file(uri[len(prefix):]) as f:
            count = pq.ParquetFile(f).metadata.num_row_groups
        return [(uri, i) for i in range(count)]

    with ThreadPoolExecutor(max_workers=16) as pool:
        return [g for file_groups in pool.map(groups, shard_files(path)) for g in file_groups]


def _read_row_groups(batch: dict[str, np.ndarray], columns: list[str] | None) -> pa.Table:
    """The rows of the batch's row groups, shuffled together.

    Each file is opened once per task (one file-system lookup and footer read), however
    many of its row groups the task holds.
    """
    groups: dict[str, list[int]] = {}
    for uri, group in zip(batch["file"], batch["row_group"]):
        groups.setdefault(str(uri), []).append(int(group))
    tables = []
    for uri, wanted in groups.items():
        fs, inner, _ = _resolve(uri)
        with fs.open_input_file(inner) as f:
            parquet = pq.ParquetFile(f)
            tables.extend(parquet.read_row_group(g, columns=columns) for g in wanted)
    table = pa.concat_tables(tables)
    return table.take(np.random.default_rng().permutation(table.num_rows))


def read_shards(path: str | Path, columns: list[str] | None = None) -> ray.data.Dataset:
    """The shards of a prepared folder as a Ray Dataset (manifest.parquet excluded)."""
    ds = ray.data.read_parquet(shard_files(path))
    return ds.select_columns(list(columns)) if columns is not None else ds


def stream_shards(
    path: str | Path, columns: list[str] | None = None, *, mix_row_groups: int = 8, block_rows: int = 16
) -> ray.data.Dataset:
    """The shards for training, in a new random order every epoch (every execution).

    Shards are written in speaker order, so a plain read gives batches of a few
    speakers. Each read task takes ``mix_row_groups`` row groups drawn at random (the
    row-group order is shuffled per epoch) and shuffles their rows together; the rows
    then flow on in blocks of ``block_rows``, so the first crops of an epoch do not
    wait for whole files to be cropped. The trainers' local shuffle buffer mixes further.
    """
    if mix_row_groups < 1 or block_rows < 1:
        raise ValueError(f"mix_row_groups and block_rows must be >= 1, got {mix_row_groups}, {block_rows}")
    items = [{"file": uri, "row_group": group} for uri, group in shard_row_groups(path)]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).randomize_block_order()
    ds = ds.map_batches(
        _read_row_groups, fn_kwargs={"columns": list(columns) if columns else None},
        batch_size=mix_row_groups, batch_format="numpy", num_cpus=1,
    )
    return ds.repartition(target_num_rows_per_block=block_rows)


def read_manifest(path: str | Path) -> pa.Table:
    """All rows without audio, ordered by ``utt_index``."""
    fs, base, _ = _resolve(path)
    target = f"{base}/{MANIFEST_NAME}"
    if fs.get_file_info(target).type != pafs.FileType.File:
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {path}; run `raysv prepare` first")
    return pq.read_table(target, filesystem=fs)


def read_report(path: str | Path) -> dict[str, Any]:
    """The ``report.json`` of a prepared folder."""
    fs, base, _ = _resolve(path)
    target = f"{base}/{REPORT_NAME}"
    if fs.get_file_info(target).type != pafs.FileType.File:
        raise FileNotFoundError(f"no {REPORT_NAME} in {path}: preparation missing or unfinished")
    with fs.open_input_stream(target) as f:
        return json.loads(f.read().decode("utf-8"))


def decode_row(row: dict[str, Any]) -> np.ndarray:
    """Float32 mono waveform of a shard row (its ``audio`` FLAC bytes)."""
    wave, rate = decode_audio(row["audio"])
    expected = row.get("sample_rate")
    if expected is not None and int(expected) != rate:
        raise ValueError(f"row {row.get('utt_id', '?')}: FLAC says {rate} Hz but the row says {int(expected)} Hz")
    return wave
