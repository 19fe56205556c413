"""What ``raysv prepare`` reads: audio files found under a root folder, or listed in a CSV file."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from raysv.audio.io import is_audio_file

_HEADER_PATH_NAMES = {"path", "file", "filename", "audio", "wav", "audio_path"}
_HEADER_SPEAKER_NAMES = {"speaker", "spk", "speaker_id", "label"}


@dataclass(frozen=True, slots=True)
class Input:
    """One candidate file: where it is, how the report names it, its speaker and stat."""

    rel: str
    abs: str
    speaker: str | None
    size: int
    mtime_ns: int

    @property
    def utt_id(self) -> str:
        return str(PurePosixPath(self.rel).with_suffix(""))


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


def collect_inputs(
    audio_root: Path | None, list_file: Path | None, no_speakers: bool
) -> tuple[list[Input], Path]:
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
    inputs: list[Input] = []
    for rel, absolute, spk in entries:
        try:
            st = os.stat(absolute)
            size, mtime = int(st.st_size), int(st.st_mtime_ns)
        except OSError:
            size, mtime = -1, -1
        inputs.append(Input(rel, absolute, None if no_speakers else spk, size, mtime))

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
