"""Kaldi ``wav.scp`` lists: ``utt_id path`` per line, as WeSpeaker and Kaldi recipes write them."""

from __future__ import annotations

from pathlib import Path

from raysv.errors import InputError


def read_wav_scp(path: str | Path) -> dict[str, Path]:
    """``{utt_id: file}`` of a ``wav.scp``; relative paths are taken from the list's folder.

    A piped command (``utt_id sox … |``) is an error naming the line: raysv reads files, it
    does not run commands. Blank lines and ``#`` comments are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"wav.scp {path} does not exist")
    out: dict[str, Path] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.split(maxsplit=1)
        if len(parts) != 2:
            raise InputError(f"{path}:{lineno}: expected 'utt_id path', got {text!r}")
        utt, target = parts[0], parts[1].strip()
        if target.endswith("|") or target.startswith("|"):
            raise InputError(f"{path}:{lineno}: {utt} is a piped command ({target!r}); give the audio file's path")
        if utt in out:
            raise InputError(f"{path}:{lineno}: utt_id {utt} appears twice")
        file = Path(target).expanduser()
        out[utt] = file if file.is_absolute() else path.parent / file
    if not out:
        raise InputError(f"wav.scp {path} lists no files")
    return out
