"""Audio decoding, resampling and FLAC encoding.

Every stage sees audio as float32 mono in [-1, 1] at one sample rate. Files
are read with libsndfile (wav, flac, ogg, mp3, ...); containers libsndfile
cannot open (m4a/aac/mp4, the VoxCeleb2 distribution format) go through the
``ffmpeg`` binary. Shards store audio as 16-bit FLAC: lossless for 16-bit
sources, about half the size of PCM, and decodable by libsndfile everywhere.
"""

from __future__ import annotations

import io
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf

from raysv.audio import SAMPLE_RATE

__all__ = [
    "SAMPLE_RATE",
    "AudioReadError",
    "FFmpegNotFoundError",
    "FFMPEG_EXTENSIONS",
    "SNDFILE_EXTENSIONS",
    "AUDIO_EXTENSIONS",
    "FFMPEG_INSTALL_HINT",
    "ffmpeg_available",
    "needs_ffmpeg",
    "is_audio_file",
    "read_audio",
    "resample",
    "to_mono",
    "encode_flac",
    "decode_audio",
]

SNDFILE_EXTENSIONS: frozenset[str] = frozenset(
    {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au", ".caf", ".w64", ".rf64"}
)
FFMPEG_EXTENSIONS: frozenset[str] = frozenset({".m4a", ".aac", ".mp4"})
AUDIO_EXTENSIONS: frozenset[str] = SNDFILE_EXTENSIONS | FFMPEG_EXTENSIONS

FFMPEG_INSTALL_HINT = (
    "install ffmpeg and make sure it is on PATH: `sudo apt-get install ffmpeg` (Debian/Ubuntu), "
    "`conda install -c conda-forge ffmpeg`, or `brew install ffmpeg` (macOS); "
    "or convert the files to wav/flac first"
)

_PCM16_SCALE = 32768.0



class AudioReadError(Exception):
    """An audio file could not be decoded; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class FFmpegNotFoundError(RuntimeError):
    """Raised when m4a/aac/mp4 input needs ffmpeg and it is not installed."""


def ffmpeg_available() -> bool:
    """True when an ``ffmpeg`` executable is on PATH."""
    return shutil.which("ffmpeg") is not None


def needs_ffmpeg(path: str | Path) -> bool:
    """True for containers libsndfile cannot read (decided by extension)."""
    return Path(path).suffix.lower() in FFMPEG_EXTENSIONS


def is_audio_file(path: str | Path) -> bool:
    """True when the extension is one `read_audio` handles."""
    return Path(path).suffix.lower() in AUDIO_EXTENSIONS


def to_mono(wave: np.ndarray) -> np.ndarray:
    """Average the channels of a (frames, channels) array; 1-D input is returned as is."""
    if wave.ndim == 1:
        return wave
    if wave.ndim != 2:
        raise ValueError(f"expected a 1-D or (frames, channels) array, got shape {wave.shape}")
    if wave.shape[1] == 1:
        return wave[:, 0]
    return wave.mean(axis=1, dtype=np.float64).astype(np.float32)


def resample(wave: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Polyphase resampling (deterministic, exact rational ratio)."""
    if orig_rate == new_rate or wave.size == 0:
        return wave.astype(np.float32, copy=False)
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} -> {new_rate}")
    # Imported here: scipy.signal costs a second at import, and every Ray worker reads audio.
    from scipy.signal import resample_poly

    g = math.gcd(int(orig_rate), int(new_rate))
    out = resample_poly(wave.astype(np.float64, copy=False), int(new_rate) // g, int(orig_rate) // g)
    return out.astype(np.float32)


def _finish(wave: np.ndarray) -> np.ndarray:
    """Contiguous float32 in [-1, 1] (resampling can overshoot slightly)."""
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    np.clip(wave, -1.0, 1.0, out=wave)
    return wave


def _read_ffmpeg(path: Path, sample_rate: int) -> np.ndarray:
    """Decode any ffmpeg-readable file to mono s16le at ``sample_rate``."""
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise FFmpegNotFoundError(f"{path}: reading {path.suffix} files needs ffmpeg; {FFMPEG_INSTALL_HINT}")
    cmd = [
        exe, "-nostdin", "-hide_banner", "-loglevel", "error",
        "-i", str(path),
        "-vn", "-ac", "1", "-ar", str(int(sample_rate)),
        "-f", "s16le", "-acodec", "pcm_s16le", "-",
    ]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    except OSError as exc:
        raise AudioReadError(path, f"could not run ffmpeg: {exc}") from exc
    if proc.returncode != 0:
        msg = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise AudioReadError(path, f"ffmpeg failed: {msg[-1] if msg else 'exit code ' + str(proc.returncode)}")
    data = proc.stdout
    if len(data) % 2:
        data = data[:-1]
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / _PCM16_SCALE


def read_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read a file as float32 mono in [-1, 1] at ``sample_rate``.

    Raises AudioReadError (file missing, corrupt, unsupported) naming the path;
    FFmpegNotFoundError when the file needs ffmpeg and it is missing.
    """
    p = Path(path)
    if not p.is_file():
        raise AudioReadError(p, "no such file")
    if needs_ffmpeg(p):
        return _finish(_read_ffmpeg(p, sample_rate))
    try:
        data, rate = sf.read(str(p), dtype="float32", always_2d=True)
    except FileNotFoundError as exc:
        raise AudioReadError(p, "no such file") from exc
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, OSError) as exc:
        if ffmpeg_available() and p.is_file():
            try:
                return _finish(_read_ffmpeg(p, sample_rate))
            except AudioReadError:
                pass
        reason = getattr(exc, "error_string", None) or str(exc)
        raise AudioReadError(p, f"libsndfile: {reason}") from exc
    wave = to_mono(data)
    if not np.all(np.isfinite(wave)):
        raise AudioReadError(p, "contains NaN or infinite samples")
    return _finish(resample(wave, int(rate), int(sample_rate)))


def encode_flac(wave: np.ndarray, sample_rate: int) -> bytes:
    """Encode float audio in [-1, 1] as 16-bit FLAC bytes.

    Quantises with round(x * 32768) clipped to int16, matching the 1/32768
    scale `decode_audio` uses, so the round-trip error is at most 1/32768 and
    the bytes are identical for identical input.
    """
    arr = np.asarray(wave)
    if arr.ndim == 2:
        arr = to_mono(arr)
    if arr.ndim != 1:
        raise ValueError(f"expected 1-D mono audio, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("cannot encode empty audio as FLAC")
    if arr.dtype == np.int16:
        pcm = arr
    else:
        pcm = np.clip(np.rint(arr.astype(np.float64) * _PCM16_SCALE), -32768, 32767).astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, pcm, int(sample_rate), format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def decode_audio(data: bytes | bytearray | memoryview) -> tuple[np.ndarray, int]:
    """Decode in-memory audio (a shard row's FLAC bytes) to float32 mono and its sample rate."""
    try:
        with sf.SoundFile(io.BytesIO(bytes(data))) as f:
            rate = int(f.samplerate)
            if f.subtype in ("PCM_16", "PCM_S8", "PCM_U8"):
                pcm = f.read(dtype="int16", always_2d=True)
                wave = to_mono(pcm.astype(np.float32) / _PCM16_SCALE)
            else:
                wave = to_mono(f.read(dtype="float32", always_2d=True))
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as exc:
        raise AudioReadError("<bytes>", f"undecodable audio bytes ({exc})") from exc
    return np.ascontiguousarray(wave, dtype=np.float32), rate
