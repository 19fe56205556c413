"""VoxCeleb-format trial lists: one ``label enroll test`` line per trial."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class TrialList:
    """A trial-list entry of the config: the list file and the folder its paths are relative to."""

    path: str = ""
    audio_root: str = ""


@dataclass(frozen=True)
class Trials:
    """A trial list; paths are relative to the audio root the list was written for."""

    labels: np.ndarray  # int8, 1 = same speaker
    enroll: list[str]
    test: list[str]
    path: str = ""

    def __len__(self) -> int:
        return len(self.enroll)

    def utterances(self) -> list[str]:
        """Every utterance the list names, once, sorted."""
        return sorted(set(self.enroll) | set(self.test))


def read_trials(path: str | Path) -> Trials:
    """Read a trial list; a malformed line is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trial list {path} does not exist")
    labels: list[int] = []
    enroll: list[str] = []
    test: list[str] = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 3 or parts[0] not in ("0", "1"):
                raise ValueError(f"{path}:{lineno}: expected 'label enroll test' with label 0 or 1, got {line.strip()!r}")
            labels.append(int(parts[0]))
            enroll.append(parts[1])
            test.append(parts[2])
    if not labels:
        raise ValueError(f"trial list {path} is empty")
    return Trials(np.asarray(labels, dtype=np.int8), enroll, test, str(path))


def resolve_trial_audio(trials: Trials, audio_root: str | Path) -> dict[str, Path]:
    """Map each trial utterance to its file; one error lists what is missing."""
    root = Path(audio_root)
    files = {u: root / u for u in trials.utterances()}
    missing = [u for u, p in files.items() if not p.is_file()]
    if missing:
        shown = ", ".join(missing[:5])
        raise FileNotFoundError(
            f"{len(missing)} of {len(files)} utterances of {trials.path or 'the trial list'} "
            f"are missing under {root}: {shown}{' …' if len(missing) > 5 else ''}"
        )
    return files
