"""VoxCeleb-format trial lists: one ``label enroll test`` line per trial."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raysv.audio import MIN_SECONDS
from raysv.errors import InputError

log = logging.getLogger("raysv")


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
                raise InputError(f"{path}:{lineno}: expected 'label enroll test' with label 0 or 1, got {line.strip()!r}")
            labels.append(int(parts[0]))
            enroll.append(parts[1])
            test.append(parts[2])
    if not labels:
        raise InputError(f"trial list {path} is empty")
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


def usable_trials(trials: Trials, audio_root: str | Path, skip_bad: bool = False) -> tuple[Trials, dict[str, Path]]:
    """The trials and their files, every file checked first (:func:`inspect_audio`).

    Bad files are all named in one :class:`InputError`; with ``skip_bad`` the trials that need
    them are dropped instead, and a warning says how many.
    """
    root = Path(audio_root)
    files = {u: root / u for u in trials.utterances()}
    bad = inspect_audio(files)
    if not bad:
        return trials, files
    where = trials.path or "the trial list"
    if not skip_bad:
        shown = "; ".join(f"{files[u]}: {why}" for u, why in list(bad.items())[:10])
        more = f" … and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise InputError(f"{len(bad)} of {len(files)} files of {where} cannot be used: {shown}{more} "
                         "(--skip-bad / eval.skip_bad drops the trials that need them)")
    kept = without_utterances(trials, set(bad))
    if len(kept) == 0:
        raise InputError(f"every trial of {where} needs one of its {len(bad)} unusable files")
    log.warning("%s: %d unusable file(s), %d of %d trials dropped (e.g. %s: %s)", where,
                                       len(bad), len(trials) - len(kept), len(trials), *next(iter(bad.items())))
    return kept, {u: p for u, p in files.items() if u not in bad}


def inspect_audio(files: dict[str, Path], min_seconds: float = MIN_SECONDS) -> dict[str, str]:
    """``{utt: why}`` for every file that cannot be used: missing, unreadable header, empty, too short.

    Reads only headers (libsndfile's ``info``; containers it cannot open are checked for
    existence and size alone), so it is cheap even for VoxCeleb1-E/H's 145,000 files.
    Samples that turn out to be NaN or undecodable are found when the file is embedded.
    """
    import soundfile as sf

    from raysv.audio.io import needs_ffmpeg

    bad: dict[str, str] = {}
    for utt, path in files.items():
        path = Path(path)
        if not path.is_file():
            bad[utt] = "no such file"
            continue
        if path.stat().st_size == 0:
            bad[utt] = "the file is empty (0 bytes)"
            continue
        if needs_ffmpeg(path):
            continue
        try:
            info = sf.info(str(path))
        except Exception as exc:  # noqa: BLE001 - libsndfile's error, whatever its type, names the problem
            bad[utt] = f"unreadable ({getattr(exc, 'error_string', None) or exc})"
            continue
        if info.frames == 0:
            bad[utt] = "no audio samples"
        elif info.frames < min_seconds * info.samplerate:
            bad[utt] = f"{info.frames / info.samplerate:.3f} s, shorter than {min_seconds:g} s"
    return bad


def without_utterances(trials: Trials, bad: set[str]) -> Trials:
    """The trials that need none of ``bad``."""
    keep = [i for i, (e, t) in enumerate(zip(trials.enroll, trials.test)) if e not in bad and t not in bad]
    return Trials(trials.labels[keep], [trials.enroll[i] for i in keep], [trials.test[i] for i in keep], trials.path)
