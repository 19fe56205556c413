"""Data augmentation: additive noise (MUSAN layout), reverberation (RIRs), channel responses and telephone coding.

Runs in NumPy on CPU inside Ray Data ``map_batches`` workers, so an
:class:`Augmenter` is cheap to construct and to pickle: folders are scanned
once at construction (a bad folder fails there, not mid-epoch), audio files are
read lazily and kept in a small per-process LRU cache that is never pickled.
Without folders the same code path runs on synthetic noise, music, babble and
impulse responses, which is what the demo and the tests use.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raysv.audio.io import SAMPLE_RATE, AudioReadError, read_audio

logger = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac")
NOISE_KINDS = ("noise", "music", "babble")
# MUSAN sub-folder that feeds each kind of additive noise.
KIND_FOLDERS = {"noise": "noise", "music": "music", "babble": "speech"}
_EPS = 1e-10
# Without a MUSAN folder: per kind, this many synthetic clips of this length, the same in every process.
SYNTHETIC_CLIPS = 32
SYNTHETIC_SECONDS = 6.0
SYNTHETIC_SEED = 20241


def scan_audio(folder: str | Path) -> list[str]:
    """Sorted list of .wav/.flac files under ``folder`` (recursive), so runs are reproducible."""
    root = Path(folder)
    return sorted(
        str(p) for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()
    )


def power(x: np.ndarray) -> float:
    """Mean power of a signal (the quantity an SNR is a ratio of)."""
    return float(np.mean(np.square(x, dtype=np.float64))) if x.size else 0.0


def fit_length(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """A random segment of length ``n`` of ``x``; ``x`` is repeated first when shorter."""
    if x.size == 0:
        raise ValueError("cannot take a segment of an empty signal")
    if x.size < n:
        x = np.tile(x, -(-n // x.size) + 1)
    start = int(rng.integers(0, x.size - n + 1))
    return x[start : start + n]


def colored_noise(n: int, rng: np.random.Generator, beta: float | None = None) -> np.ndarray:
    """Gaussian noise with power spectrum 1/f^beta (beta uniform in [0, 2] when not given)."""
    if beta is None:
        beta = float(rng.uniform(0.0, 2.0))
    spec = rng.standard_normal(n // 2 + 1) + 1j * rng.standard_normal(n // 2 + 1)
    f = np.arange(n // 2 + 1, dtype=np.float64)
    f[0] = 1.0
    spec *= f ** (-beta / 2.0)
    out = np.fft.irfft(spec, n=n)
    return out / (np.std(out) + _EPS)


def synthetic_music(n: int, rng: np.random.Generator, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A few random tones with harmonics and repeating note envelopes, standing in for MUSAN music."""
    t = np.arange(n, dtype=np.float64) / sample_rate
    out = np.zeros(n)
    for _ in range(int(rng.integers(2, 6))):
        f0 = float(np.exp(rng.uniform(np.log(80.0), np.log(1500.0))))
        period = float(rng.uniform(0.15, 0.6))
        decay = float(rng.uniform(0.05, 0.4))
        env = np.exp(-np.mod(t + rng.uniform(0, period), period) / decay)
        tone = np.zeros(n)
        for h in range(1, int(rng.integers(1, 4)) + 1):
            if f0 * h < sample_rate / 2:
                tone += np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 2 * np.pi)) / h
        out += float(rng.uniform(0.3, 1.0)) * env * tone
    return out / (np.std(out) + _EPS)


def synthetic_babble(
    n: int, rng: np.random.Generator, speakers: int, sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
    """Sum of ``speakers`` band-limited noises with syllable-rate modulation, standing in for babble."""
    t = np.arange(n, dtype=np.float64) / sample_rate
    freqs = np.fft.rfftfreq(n, 1.0 / sample_rate)
    out = np.zeros(n)
    for _ in range(speakers):
        lo = float(rng.uniform(100.0, 400.0))
        hi = float(rng.uniform(2500.0, min(4500.0, sample_rate / 2)))
        spec = rng.standard_normal(freqs.size) + 1j * rng.standard_normal(freqs.size)
        spec *= (freqs >= lo) & (freqs <= hi)
        voice = np.fft.irfft(spec, n=n)
        rate = float(rng.uniform(3.0, 6.0))
        env = np.clip(np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi)), 0.0, None) ** 2
        voice = voice * env
        out += voice / (np.std(voice) + _EPS)
    return out / (np.std(out) + _EPS)


def synthetic_rir(
    rng: np.random.Generator, sample_rate: int = SAMPLE_RATE, rt60: float | None = None
) -> np.ndarray:
    """Exponentially decaying noise after a direct-path spike (RT60 uniform in 0.2–0.8 s when not given).

    The amplitude falls by 60 dB over ``rt60`` seconds; the result has unit energy.
    """
    if rt60 is None:
        rt60 = float(rng.uniform(0.2, 0.8))
    if rt60 <= 0:
        raise ValueError(f"rt60 must be positive, got {rt60}")
    n = max(int(rt60 * sample_rate), 2)
    t = np.arange(n, dtype=np.float64) / sample_rate
    tail = rng.standard_normal(n) * np.exp(-3.0 * np.log(10.0) * t / rt60)
    tail[0] = 0.0
    tail /= np.sqrt(np.sum(tail**2)) + _EPS
    drr_db = float(rng.uniform(-2.0, 8.0))  # direct-to-reverberant energy ratio
    rir = tail
    rir[0] = np.sqrt(10.0 ** (drr_db / 10.0))
    return (rir / np.sqrt(np.sum(rir**2))).astype(np.float32)


def reverberate(wave: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """Convolve with an energy-normalised RIR, aligned to its direct path, keeping the length."""
    rir = np.asarray(rir, dtype=np.float64)
    energy = np.sqrt(np.sum(rir**2))
    if energy <= 0:
        raise ValueError("room impulse response is silent")
    rir = rir / energy
    delay = int(np.argmax(np.abs(rir)))
    # Imported here: scipy.signal costs a second at import, paid only when reverberating.
    from scipy.signal import fftconvolve

    full = fftconvolve(np.asarray(wave, dtype=np.float64), rir, mode="full")
    return full[delay : delay + len(wave)]


def random_eq_gains(
    freqs: np.ndarray, rng: np.random.Generator, eq_db: float, lowpass_prob: float = 0.3
) -> np.ndarray:
    """Gain in dB at ``freqs`` (Hz) of a random microphone/channel response.

    A spectral tilt, 2–5 peaks or notches at random log-frequencies (width 0.2–1
    octave, gain N(0, eq_db) dB) and, with ``lowpass_prob``, a band limit between
    3 and 7.5 kHz: the stationary colouring that separates one recording set-up
    from another, which a speaker embedding must ignore.
    """
    octaves = np.log2(np.maximum(freqs, 50.0) / 1000.0)
    gains = rng.normal(0.0, eq_db / 3.0) * octaves
    for _ in range(int(rng.integers(2, 6))):
        centre = rng.uniform(np.log2(0.1), np.log2(7.0))
        width = rng.uniform(0.2, 1.0)
        gains = gains + rng.normal(0.0, eq_db) * np.exp(-0.5 * ((octaves - centre) / width) ** 2)
    if rng.random() < lowpass_prob:
        cutoff = rng.uniform(3000.0, 7500.0)
        gains = gains - 60.0 * np.clip((freqs - cutoff) / 500.0, 0.0, 1.0)
    return gains


def mu_law(wave: np.ndarray, levels: int = 256) -> np.ndarray:
    """µ-law companding to ``levels`` codes and back (G.711's 8-bit law for 256), of a wave in [-1, 1]."""
    mu = levels - 1
    x = np.clip(np.asarray(wave, dtype=np.float64), -1.0, 1.0)
    code = np.floor((np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu) + 1.0) / 2.0 * mu + 0.5)
    y = code / mu * 2.0 - 1.0
    return np.sign(y) * np.expm1(np.abs(y) * np.log1p(mu)) / mu


def telephone_channel(wave: np.ndarray, rng: np.random.Generator, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A narrowband telephone line: a 200–400 Hz to 3.0–3.7 kHz band-pass, then 8-bit µ-law coding.

    The level before coding is drawn (peak at 0.3–1.0 of full scale), so the quantisation noise
    varies as it does between calls. Codecs and band limits mark a recording set-up as strongly as
    a microphone does; without this, self-supervised views of one recording agree on its codec.
    """
    x = np.asarray(wave, dtype=np.float64)
    if x.size == 0:
        return x
    freqs = np.fft.rfftfreq(x.size, 1.0 / sample_rate)
    lo, hi = rng.uniform(200.0, 400.0), min(rng.uniform(3000.0, 3700.0), 0.45 * sample_rate)
    gains = -60.0 * (np.clip((lo - freqs) / 150.0, 0.0, 1.0) + np.clip((freqs - hi) / 400.0, 0.0, 1.0))
    y = apply_gains(x, gains)
    peak = float(np.abs(y).max())
    if peak <= 0:
        return y
    scale = peak / rng.uniform(0.3, 1.0)
    return mu_law(y / scale) * scale


def apply_gains(wave: np.ndarray, gains_db: np.ndarray) -> np.ndarray:
    """Filter by a zero-phase gain curve over the wave's rfft bins, keeping its mean power."""
    x = np.asarray(wave, dtype=np.float64)
    y = np.fft.irfft(np.fft.rfft(x) * 10.0 ** (gains_db / 20.0), n=x.size)
    p_in, p_out = power(x), power(y)
    return y * np.sqrt(p_in / p_out) if p_out > 0 else y


@dataclass
class AugmentInfo:
    """What one call did; the components sum to the output (``speech + noise``)."""

    reverb: bool
    eq: bool
    noise_kind: str | None
    snr_db: float | None
    speech: np.ndarray
    noise: np.ndarray | None
    telephone: bool = False


@dataclass
class AugmentConfig:
    """``data.augment``: MUSAN-layout noise folder and RIR folder; ``null`` uses synthetic noise and rooms."""

    musan: str | None = None
    rir: str | None = None
    noise_prob: float = 0.6
    reverb_prob: float = 0.3
    eq_prob: float = 0.0  # random channel response (tilt, peaks/notches, band limit) per crop
    telephone_prob: float = 0.0  # narrowband band-pass and 8-bit µ-law coding per crop
    eq_db: float = 6.0
    snr_noise: tuple[float, float] = (0.0, 15.0)
    snr_music: tuple[float, float] = (5.0, 15.0)
    snr_babble: tuple[float, float] = (13.0, 20.0)
    babble_speakers: tuple[int, int] = (3, 7)

    def params(self) -> tuple:
        """A hashable description, so each process builds its :class:`Augmenter` once."""
        return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in asdict(self).items())


class Augmenter:
    """Random reverberation, channel response, telephone coding and additive noise, one independent draw per crop."""

    cache_size = 32

    def __init__(
        self,
        musan: str | None = None,
        rir: str | None = None,
        noise_prob: float = 0.6,
        reverb_prob: float = 0.3,
        snr_noise: tuple[float, float] = (0.0, 15.0),
        snr_music: tuple[float, float] = (5.0, 15.0),
        snr_babble: tuple[float, float] = (13.0, 20.0),
        babble_speakers: tuple[int, int] = (3, 7),
        sample_rate: int = SAMPLE_RATE,
        eq_prob: float = 0.0,
        eq_db: float = 6.0,
        telephone_prob: float = 0.0,
    ) -> None:
        for name, p in (("noise_prob", noise_prob), ("reverb_prob", reverb_prob), ("eq_prob", eq_prob),
                        ("telephone_prob", telephone_prob)):
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"augment {name} must be in [0, 1], got {p}")
        self.noise_prob = float(noise_prob)
        self.reverb_prob = float(reverb_prob)
        self.eq_prob = float(eq_prob)
        self.telephone_prob = float(telephone_prob)
        if float(eq_db) < 0:
            raise ValueError(f"augment eq_db must be >= 0, got {eq_db}")
        self.eq_db = float(eq_db)
        self.snr = {
            "noise": _range("snr_noise", snr_noise, float),
            "music": _range("snr_music", snr_music, float),
            "babble": _range("snr_babble", snr_babble, float),
        }
        self.babble_speakers = _range("babble_speakers", babble_speakers, int)
        if self.babble_speakers[0] < 1:
            raise ValueError(f"augment babble_speakers must be >= 1, got {babble_speakers}")
        if int(sample_rate) <= 0:
            raise ValueError(f"augment sample_rate must be positive, got {sample_rate}")
        self.sample_rate = int(sample_rate)
        self.musan = None if musan is None else str(musan)
        self.rir = None if rir is None else str(rir)
        self.noise_files: dict[str, list[str]] = self._scan_musan(self.musan)
        self.rir_files: list[str] = self._scan_rir(self.rir)
        self.kinds: tuple[str, ...] = (
            tuple(k for k in NOISE_KINDS if self.noise_files.get(k)) if self.musan else NOISE_KINDS
        )
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._synthetic: dict[str, list[np.ndarray]] = {}

    @classmethod
    def from_config(cls, cfg: Any, sample_rate: int | None = None) -> Augmenter:
        """Build from any object (or mapping) with the augment config's field names."""
        def get(name: str, default: Any) -> Any:
            if isinstance(cfg, Mapping):
                return cfg.get(name, default)
            return getattr(cfg, name, default)

        defaults = cls.__init__.__defaults__  # type: ignore[misc]
        names = ("musan", "rir", "noise_prob", "reverb_prob", "snr_noise", "snr_music",
                 "snr_babble", "babble_speakers", "sample_rate", "eq_prob", "eq_db", "telephone_prob")
        kwargs = {n: get(n, d) for n, d in zip(names, defaults)}
        if sample_rate is not None:
            kwargs["sample_rate"] = sample_rate
        for n in ("snr_noise", "snr_music", "snr_babble", "babble_speakers"):
            kwargs[n] = tuple(kwargs[n])
        return cls(**kwargs)

    @staticmethod
    def _scan_musan(musan: str | None) -> dict[str, list[str]]:
        if musan is None:
            return {}
        root = Path(musan)
        if not root.is_dir():
            raise FileNotFoundError(f"musan folder {musan} does not exist (or is not a folder)")
        files = {
            kind: scan_audio(root / sub) for kind, sub in KIND_FOLDERS.items() if (root / sub).is_dir()
        }
        if not any(files.values()):
            raise ValueError(
                f"musan folder {musan} has no noise/ music/ speech/ subfolders with audio "
                f"(expected .wav or .flac files under {musan}/noise, {musan}/music or {musan}/speech)"
            )
        return files

    @staticmethod
    def _scan_rir(rir: str | None) -> list[str]:
        if rir is None:
            return []
        if not Path(rir).is_dir():
            raise FileNotFoundError(f"rir folder {rir} does not exist (or is not a folder)")
        files = scan_audio(rir)
        if not files:
            raise ValueError(f"rir folder {rir} has no .wav or .flac room impulse responses")
        return files

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()  # the cache is per process
        state["_synthetic"] = {}  # so are the synthetic clips: made again, the same, where needed
        return state

    def _load(self, path: str) -> np.ndarray:
        """A file's samples through the per-process LRU cache."""
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        wave = read_audio(path, self.sample_rate)
        if wave.size == 0:
            raise AudioReadError(path, "no samples")
        self._cache[path] = wave
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return wave

    def _load_random(self, files: list[str], what: str, rng: np.random.Generator) -> np.ndarray:
        """A random readable file of ``files``; unreadable ones are dropped (in this process) with a warning."""
        while files:
            idx = int(rng.integers(len(files)))
            try:
                return self._load(files[idx])
            except AudioReadError as exc:
                logger.warning("skipping unreadable augmentation file %s", exc)
                files.pop(idx)
        raise ValueError(f"no readable audio left for {what}")

    def draw_rir(self, rng: np.random.Generator) -> np.ndarray:
        """A room impulse response: a random file of the rir folder, or a synthetic one."""
        if self.rir_files:
            return self._load_random(self.rir_files, f"rir folder {self.rir}", rng)
        return synthetic_rir(rng, self.sample_rate)

    def _synthetic_clips(self, kind: str) -> list[np.ndarray]:
        """This process's synthetic clips of ``kind``, made on first use from a fixed seed.

        Like a MUSAN folder, a fixed set of clips that crops take random segments of: making
        the noise afresh for every crop cost 2-3 ms of a crop's 3.4 ms of augmentation.
        """
        if kind not in self._synthetic:
            rng = np.random.default_rng([SYNTHETIC_SEED, NOISE_KINDS.index(kind)])
            n = int(SYNTHETIC_SECONDS * self.sample_rate)
            clips = []
            for _ in range(SYNTHETIC_CLIPS):
                if kind == "noise":
                    clip = colored_noise(n, rng)
                elif kind == "music":
                    clip = synthetic_music(n, rng, self.sample_rate)
                else:
                    speakers = int(rng.integers(self.babble_speakers[0], self.babble_speakers[1] + 1))
                    clip = synthetic_babble(n, rng, speakers, self.sample_rate)
                clips.append(clip.astype(np.float32))
            self._synthetic[kind] = clips
        return self._synthetic[kind]

    def draw_noise(self, kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` samples of noise of ``kind`` ("noise", "music" or "babble"), before SNR scaling."""
        if kind not in NOISE_KINDS:
            raise ValueError(f"unknown noise kind {kind!r}; expected one of {NOISE_KINDS}")
        if not self.musan:
            return fit_length(self._synthetic_clips(kind)[int(rng.integers(SYNTHETIC_CLIPS))], n, rng).astype(np.float64)
        files = self.noise_files.get(kind, [])
        if not files:
            raise ValueError(f"musan folder {self.musan} has no audio for noise kind {kind!r}")
        if kind != "babble":
            clip = self._load_random(files, f"{self.musan}/{KIND_FOLDERS[kind]}", rng)
            return fit_length(clip, n, rng).astype(np.float64)
        speakers = int(rng.integers(self.babble_speakers[0], self.babble_speakers[1] + 1))
        out = np.zeros(n)
        for _ in range(speakers):
            clip = self._load_random(files, f"{self.musan}/speech", rng)
            seg = fit_length(clip, n, rng).astype(np.float64)
            out += seg / np.sqrt(power(seg) + _EPS)
        return out

    def augment(self, wave: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, AugmentInfo]:
        """Augmented wave (float32, same length) and the components that make it up."""
        wave = np.asarray(wave)
        if wave.ndim != 1:
            raise ValueError(f"Augmenter expects a 1-D wave, got shape {wave.shape}")
        n = wave.shape[0]
        do_reverb = bool(rng.random() < self.reverb_prob)
        do_noise = bool(rng.random() < self.noise_prob)
        do_eq = bool(rng.random() < self.eq_prob)
        do_phone = self.telephone_prob > 0 and bool(rng.random() < self.telephone_prob)  # no draw when off
        speech = wave.astype(np.float64)
        if n == 0:
            return wave.astype(np.float32), AugmentInfo(False, False, None, None, speech, None)
        if do_reverb:
            speech = reverberate(speech, self.draw_rir(rng))
        if do_eq:
            freqs = np.fft.rfftfreq(n, 1.0 / self.sample_rate)
            speech = apply_gains(speech, random_eq_gains(freqs, rng, self.eq_db))
        if do_phone:
            speech = telephone_channel(speech, rng, self.sample_rate)
        kind = snr = noise = None
        out = speech
        if do_noise and self.kinds:
            kind = self.kinds[int(rng.integers(len(self.kinds)))]
            snr = float(rng.uniform(*self.snr[kind]))
            raw = self.draw_noise(kind, n, rng)
            p_speech, p_noise = power(speech), power(raw)
            if p_speech > 0 and p_noise > 0:
                noise = raw * np.sqrt(p_speech / (p_noise * 10.0 ** (snr / 10.0)))
                out = speech + noise
        info = AugmentInfo(do_reverb, do_eq, kind if noise is not None else None,
                           snr if noise is not None else None, speech, noise, do_phone)
        return out.astype(np.float32), info

    def __call__(self, wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Augmented copy of a 1-D wave: float32, same length."""
        return self.augment(wave, rng)[0]

    def augment_batch(
        self, waves: np.ndarray | Sequence[np.ndarray], rng: np.random.Generator
    ) -> np.ndarray | list[np.ndarray]:
        """Augment each crop of a (B, T) array (or a list of 1-D waves) independently."""
        if isinstance(waves, np.ndarray):
            if waves.ndim != 2:
                raise ValueError(
                    f"augment_batch expects a (batch, samples) array, got shape {waves.shape}"
                )
            return np.stack([self(w, rng) for w in waves]) if len(waves) else waves.astype(np.float32)
        return [self(np.asarray(w), rng) for w in waves]


def _range(name: str, value: Any, kind: type) -> tuple[Any, Any]:
    """Validate a (low, high) pair from the config."""
    try:
        lo, hi = (kind(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"augment {name} must be a (low, high) pair, got {value!r}") from exc
    if lo > hi:
        raise ValueError(f"augment {name} must have low <= high, got {value!r}")
    return lo, hi
