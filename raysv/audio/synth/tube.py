"""The ``tube`` toy voice: a glottal pulse of the KLGLOTT88 kind through a lossy tube vocal tract, codec channels.

Made unlike :mod:`raysv.audio.synth.formant` on purpose, to check settings on voices they
were not chosen on:

- source: the KLGLOTT88 flow (``a·t² − b·t³`` over the open phase) with a first-order
  spectral-tilt filter, per-speaker open quotient, diplophonia (alternate periods
  weaker and later) and creak at phrase ends;
- vocal tract: a concatenation of 24 cylindrical sections whose log-areas are a speaker's
  neutral shape plus two articulatory modes (Story-style), turned into an all-pole filter
  by the step-up recursion over the reflection coefficients, with a nasal branch mixed in
  by the velum; a speaker's tract length warps the frequency axis;
- prosody: a Fujisaki contour (phrase and accent commands) over syllable-timed CV(C) syllables;
- channel: per session one of a wideband microphone, telephone band (300–3400 Hz) with
  µ-law 8-bit coding, or a perceptual-coder-like band limit with spectral holes, plus room
  reverberation and coloured noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.signal import fftconvolve, lfilter

from raysv.audio.synth.dsp import overlap_add, smooth, stft_geometry, to_int16

_TAG_SPEAKER, _TAG_SESSION, _TAG_UTT = 21, 22, 23
_SECTIONS = 24
_SOUND = 350.0  # m/s
_MODEL_LENGTH = _SECTIONS * _SOUND / (2 * 16000.0)  # 0.2625 m: each section half a sample at 16 kHz
# Vowels as (front-back, open-close) weights of the two articulatory modes.
_VOWEL_Q = np.array([[-0.9, 0.9], [-0.6, 0.4], [-0.3, -0.4], [0.1, -0.9], [0.6, -0.6],
                     [0.9, 0.2], [0.7, 0.8], [0.0, 0.0]])
# Fricative places (fraction of the tract from the glottis) and levels; stop places.
_FRICATIVES = [(0.93, 0.5), (0.85, 0.4), (0.97, 0.15), (0.7, 0.3)]
_STOPS = [0.98, 0.9, 0.72]
_CODECS = ("wideband", "telephone", "coder")
_CODEC_P = (0.5, 0.25, 0.25)
_SNR_DB = (15.0, 40.0)
_GAIN_DB = (-6.0, -2.0)


@dataclass(frozen=True)
class TubeVoice:
    length: float  # vocal-tract length, m
    neutral: np.ndarray  # (sections,) log-area of the neutral tract
    mode_gain: np.ndarray  # (2,) how far this speaker's articulators move
    vowel_q: np.ndarray  # (vowels, 2) this speaker's vowel targets
    nasal: np.ndarray  # nasal branch all-pole polynomial
    f0: float  # Hz, the phrase base
    accent: float  # accent command amplitude (ln F0)
    open_quotient: float
    tilt: float  # source low-pass pole, 0 … 0.9
    diplophonia: float  # alternate-period attenuation
    creak: float  # probability of a creaky phrase end
    breath: float
    rate: float  # syllables per second
    fric_gain: float


def _modes() -> np.ndarray:
    x = (np.arange(_SECTIONS) + 0.5) / _SECTIONS
    return np.stack([np.sin(np.pi * x), np.sin(2 * np.pi * x + 0.3)])  # (2, sections)


def speaker_voice(seed: int, speaker: int) -> TubeVoice:
    """Traits of global speaker number ``speaker`` in the tube style; a pure function of (seed, speaker)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG_SPEAKER, speaker]))
    female = rng.random() < 0.5
    length = rng.normal(0.148 if female else 0.172, 0.008)
    x = (np.arange(_SECTIONS) + 0.5) / _SECTIONS
    # A smooth random neutral shape: a few cosines around a uniform 3 cm² tube, wider near the lips.
    neutral = np.log(3.0) + 0.35 * x + sum(rng.normal(0, 0.3) * np.cos((k + 1) * np.pi * x) for k in range(4))
    nasal_formants = np.array([rng.uniform(220, 320), rng.uniform(900, 1300), rng.uniform(1900, 2600)])
    poly = np.array([1.0])
    for f in nasal_formants:
        r = math.exp(-math.pi * 180.0 / 16000.0)
        poly = np.convolve(poly, [1.0, -2 * r * math.cos(2 * math.pi * f / 16000.0), r * r])
    return TubeVoice(
        length=length,
        neutral=neutral,
        mode_gain=np.array([rng.uniform(1.6, 2.6), rng.uniform(1.6, 2.6)]),
        vowel_q=np.clip(_VOWEL_Q + rng.normal(0, 0.12, _VOWEL_Q.shape), -1.2, 1.2),
        nasal=poly,
        f0=math.exp(rng.normal(math.log(195.0 if female else 105.0), 0.17)),
        accent=rng.uniform(0.1, 0.45),
        open_quotient=rng.uniform(0.35, 0.8),
        tilt=rng.uniform(0.0, 0.85),
        diplophonia=rng.uniform(0.0, 0.4) if rng.random() < 0.3 else 0.0,
        creak=rng.uniform(0.0, 0.8),
        breath=math.exp(rng.uniform(math.log(0.02), math.log(0.4))),
        rate=rng.uniform(3.2, 6.0),
        fric_gain=math.exp(rng.normal(0.0, 0.4)),
    )


@dataclass(frozen=True)
class TubeSession:
    codec: str
    band: tuple[float, float]  # Hz
    eq: np.ndarray  # amplitude response on the rfft bins
    noise_shape: np.ndarray
    rt60: float  # s, 0 = no room
    f0_shift: float


def session_channel(seed: int, speaker: int, session: int, freqs: np.ndarray) -> TubeSession:
    rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG_SESSION, speaker, session]))
    codec = _CODECS[int(rng.choice(len(_CODECS), p=_CODEC_P))]
    nyq = float(freqs[-1])
    band = {"wideband": (rng.uniform(40, 120), rng.uniform(0.8, 1.0) * nyq),
            "telephone": (rng.uniform(250, 350), rng.uniform(3300, 3500)),
            "coder": (rng.uniform(60, 150), rng.uniform(4500, 7000))}[codec]
    logf = np.log2(np.maximum(freqs, 20.0))
    db = rng.normal(0.0, 0.8) * (logf - math.log2(1000.0))
    for _ in range(rng.integers(2, 5)):
        db += rng.normal(0.0, 2.5) * np.exp(-0.5 * ((logf - rng.uniform(7.0, 12.5)) / rng.uniform(0.2, 0.8)) ** 2)
    lo, hi = band
    amp = 10.0 ** (db / 20.0) / np.sqrt(1.0 + (lo / np.maximum(freqs, 1.0)) ** 8) / np.sqrt(1.0 + (freqs / hi) ** 16)
    noise_db = rng.uniform(-6.0, 0.0) * (logf - math.log2(500.0))
    rt60 = rng.uniform(0.15, 0.6) if rng.random() < 0.5 else 0.0
    return TubeSession(codec, band, amp, 10.0 ** (noise_db / 20.0), rt60, math.exp(rng.normal(0.0, 0.05)))


def _step_up(reflection: np.ndarray) -> np.ndarray:
    """All-pole polynomials ``(frames, order + 1)`` from reflection coefficients ``(frames, order)``."""
    frames, order = reflection.shape
    a = np.zeros((frames, order + 1))
    a[:, 0] = 1.0
    for m in range(order):
        k = reflection[:, m : m + 1]
        a[:, 1 : m + 2] = a[:, 1 : m + 2] + k * a[:, m::-1][:, : m + 1]
    return a


def _plan(rng: np.random.Generator, voice: TubeVoice, duration: float):
    """Syllables: per-segment (end time, voicing, frication place/level, nasality) and articulation knots."""
    ends, vlev, fplace, flev, nasal = [], [], [], [], []
    knots_t, knots_q = [], []
    accents: list[tuple[float, float]] = []
    phrases: list[float] = [0.0]
    t = 0.0

    def add(d: float, v: float = 0.0, place: float = 0.9, f: float = 0.0, nas: float = 0.0) -> None:
        nonlocal t
        t += d
        ends.append(t)
        vlev.append(v)
        fplace.append(place)
        flev.append(f)
        nasal.append(nas)

    add(rng.uniform(0.05, 0.25))
    syll = 1.0 / voice.rate
    while t < duration:
        for _ in range(rng.integers(3, 10)):  # a phrase of syllables
            start = t
            kind = rng.choice(4, p=[0.3, 0.35, 0.15, 0.2])  # onset: stop, fricative, nasal, none
            if kind == 0:  # closure, burst, aspiration
                place = _STOPS[rng.integers(len(_STOPS))]
                add(0.2 * syll, place=place)
                add(0.012, place=place, f=0.8)
                add(0.03, place=place, f=0.2)
            elif kind == 1:
                place, lev = _FRICATIVES[rng.integers(len(_FRICATIVES))]
                add(rng.uniform(0.2, 0.35) * syll, v=0.2 * (rng.random() < 0.4), place=place, f=lev * voice.fric_gain)
            elif kind == 2:
                add(rng.uniform(0.15, 0.25) * syll, v=0.5, nas=1.0)
            dur = rng.uniform(0.45, 0.7) * syll
            knots_t.append(t + 0.5 * dur)
            knots_q.append(voice.vowel_q[rng.integers(len(voice.vowel_q))])
            add(dur, v=rng.uniform(0.7, 1.0), nas=0.3 if kind == 2 else 0.0)
            if rng.random() < 0.35:
                accents.append((start, t))
        add(rng.uniform(0.08, 0.3))
        phrases.append(t)
    if not knots_t:
        knots_t, knots_q = [0.0], [voice.vowel_q[-1]]
    return (np.asarray(ends), np.asarray(vlev), np.asarray(fplace), np.asarray(flev), np.asarray(nasal),
            np.asarray(knots_t), np.stack(knots_q), accents, phrases)


def _fujisaki(ft: np.ndarray, voice: TubeVoice, accents, phrases, rng: np.random.Generator) -> np.ndarray:
    """ln F0 over frame times: phrase commands (α = 2/s) and accent commands (β = 20/s)."""
    alpha, beta = 2.0, 20.0
    log_f0 = np.full(ft.shape, math.log(voice.f0))
    for t0 in phrases[:-1]:
        x = np.maximum(ft - t0 + 0.2, 0.0)
        log_f0 += rng.uniform(0.2, 0.5) * alpha**2 * x * np.exp(-alpha * x)
    for t1, t2 in accents:
        amp = voice.accent * rng.uniform(0.6, 1.2)

        def ga(x: np.ndarray) -> np.ndarray:
            x = np.maximum(x, 0.0)
            return np.minimum(1.0 - (1.0 + beta * x) * np.exp(-beta * x), 0.9)

        log_f0 += amp * (ga(ft - t1) - ga(ft - t2))
    return log_f0


def utterance(seed: int, speaker: int, session: int, utt: int, voice: TubeVoice, sess: TubeSession,
              min_seconds: float, max_seconds: float, sample_rate: int) -> np.ndarray:
    """One utterance as int16 samples."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG_UTT, speaker, session, utt]))
    sr = sample_rate
    nfft, hop = stft_geometry(sr)
    nbins = nfft // 2 + 1
    freqs = np.arange(nbins) * sr / nfft
    duration = rng.uniform(min_seconds, max_seconds)
    n = int(round(duration * sr))
    frames = -(-n // hop) + 1
    length = (frames - 1) * hop + nfft
    ft = np.arange(frames) * hop / sr
    fpm = sr / hop / 1000.0

    ends, vlev, fplace, flev, nasal, kt, kq, accents, phrases = _plan(rng, voice, duration)
    seg = np.minimum(np.searchsorted(ends, ft, side="right"), len(ends) - 1)
    voice_amp = smooth(vlev[seg], max(1, int(round(25 * fpm))))
    fric_amp = smooth(flev[seg], max(1, int(round(10 * fpm))))
    velum = smooth(nasal[seg], max(1, int(round(30 * fpm))))
    q = smooth(np.stack([np.interp(ft, kt, kq[:, k]) for k in range(2)], axis=1), max(1, int(round(35 * fpm))))

    # The tract per frame: areas → reflection coefficients → all-pole polynomial (with losses).
    log_area = voice.neutral[None, :] + (q * voice.mode_gain) @ _modes()
    area = np.exp(log_area)
    refl = (area[:, :-1] - area[:, 1:]) / (area[:, :-1] + area[:, 1:])
    refl = np.concatenate([np.full((frames, 1), 0.92), refl, np.full((frames, 1), -0.9)], axis=1)
    poly = _step_up(refl) * (0.994 ** np.arange(refl.shape[1] + 1))[None, :]  # wall losses: wider bandwidths
    # A tract of ``voice.length`` has its resonances at those of the model scaled by model/actual length.
    omega = 2.0 * np.pi * freqs / sr * (voice.length / _MODEL_LENGTH)
    basis = np.exp(-1j * np.outer(np.arange(poly.shape[1]), omega))  # (order + 1, bins)
    oral = 1.0 / (poly @ basis)
    oral /= np.abs(oral[:, :1]) + 1e-9
    nasal_resp = 1.0 / (voice.nasal @ np.exp(-1j * np.outer(np.arange(len(voice.nasal)), 2 * np.pi * freqs / sr)))
    nasal_resp = nasal_resp / (np.abs(nasal_resp[0]) + 1e-9)
    tract = ((1.0 - 0.6 * velum[:, None]) * oral + 0.6 * velum[:, None] * nasal_resp[None, :]).astype(np.complex64)

    # Source: KLGLOTT88 flow pulses, tilt low-pass, diplophonia, creak; lip radiation by differencing.
    log_f0 = _fujisaki(ft, voice, accents, phrases, rng) + math.log(sess.f0_shift)
    creaky = np.zeros(frames, dtype=bool)
    for t_end in phrases[1:]:
        if rng.random() < voice.creak:
            creaky |= (ft > t_end - 0.35) & (ft < t_end)
    f0_frames = np.clip(np.exp(log_f0) * np.where(creaky, 0.55, 1.0), 40.0, 450.0)
    centres = np.arange(frames) * hop + nfft // 2
    f0s = np.interp(np.arange(length), centres, f0_frames)
    phase = np.cumsum(f0s) / sr
    period = phase.astype(np.int64)
    frac = phase - period
    oq = voice.open_quotient
    tau = np.clip(frac / oq, 0.0, 1.0)
    flow = np.where(frac < oq, tau**2 - tau**3, 0.0) * (27.0 / 4.0)
    amp = np.ones(int(period[-1]) + 2)
    amp[1::2] -= voice.diplophonia
    amp *= 1.0 + 0.05 * rng.standard_normal(amp.size)
    irregular = np.interp(np.arange(length), centres, creaky.astype(float)) > 0.5
    amp_s = amp[period] * np.where(irregular, rng.uniform(0.3, 1.0, amp.size)[period], 1.0)
    source = np.diff(flow * amp_s, prepend=0.0)
    source /= max(float(np.sqrt(np.mean(source**2))), 1e-9)
    source += voice.breath * rng.standard_normal(length) * np.where(frac < oq, 1.0, 0.3)
    # The glottal roll-off (a fixed first-order low-pass) and the speaker's extra tilt.
    source = lfilter([1.0 - voice.tilt], [1.0, -voice.tilt], lfilter([0.1], [1.0, -0.9], source))

    sig = np.stack([source, rng.standard_normal(length), rng.standard_normal(length)]).astype(np.float32)
    win = np.sqrt(np.hanning(nfft + 1)[:-1]).astype(np.float32)
    spec = np.fft.rfft(np.lib.stride_tricks.sliding_window_view(sig, nfft, axis=1)[:, ::hop] * win, axis=2)
    speech = spec[0] * tract * voice_amp[:, None].astype(np.float32)

    # Frication: noise through the cavity in front of the constriction (a quarter-wave resonance).
    front = np.maximum((1.0 - fplace[seg]) * voice.length, 0.01)
    f_res = _SOUND / (4.0 * front)
    logf = np.log(np.maximum(freqs, 20.0))
    shape = np.exp(-0.5 * ((logf[None, :] - np.log(f_res)[:, None]) / 0.35) ** 2) + 0.15 * (freqs[None, :] > f_res[:, None])
    speech += spec[1] * (shape * fric_amp[:, None]).astype(np.float32)
    speech *= sess.eq.astype(np.float32)

    if sess.codec == "coder":  # spectral holes: bins far below the frame's peak are dropped
        mag = np.abs(speech)
        speech = np.where(mag < 10 ** (-35 / 20) * mag.max(axis=1, keepdims=True), 0.0, speech)
    noise = spec[2] * (sess.noise_shape * sess.eq).astype(np.float32)
    snr = rng.uniform(*_SNR_DB)
    ps = float(np.mean(np.abs(speech) ** 2))
    pn = float(np.mean(np.abs(noise) ** 2)) or 1.0
    total = speech + noise * math.sqrt(ps / (pn * 10.0 ** (snr / 10.0)))
    y = overlap_add(np.fft.irfft(total, n=nfft, axis=1) * win, hop, nfft, n)

    if sess.rt60 > 0:  # a room: exponentially decaying noise impulse response after the direct path
        taps = int(sess.rt60 * sr)
        ir = rng.standard_normal(taps) * np.exp(-6.9 * np.arange(taps) / taps)
        ir[0] = 1.0 / (0.2 + sess.rt60)
        y = fftconvolve(y, ir)[:n]
    if sess.codec == "telephone":  # µ-law 8-bit coding of the band-limited signal
        y = y / (np.max(np.abs(y)) + 1e-9)
        mu = 255.0
        coded = np.round(np.sign(y) * np.log1p(mu * np.abs(y)) / math.log1p(mu) * 127.0) / 127.0
        y = np.sign(coded) * np.expm1(np.abs(coded) * math.log1p(mu)) / mu
    return to_int16(y, rng, _GAIN_DB)


def render_utterance(seed: int, speaker: int, session: int, utt: int, min_s: float, max_s: float, sr: int,
                     cache: dict) -> np.ndarray:
    """Utterance ``utt`` of (speaker, session), the voice and channel built once per session (``cache``)."""
    key = (speaker, session)
    if key not in cache:
        nfft = stft_geometry(sr)[0]
        freqs = np.arange(nfft // 2 + 1) * sr / nfft
        cache.clear()
        cache[key] = (speaker_voice(seed, speaker), session_channel(seed, speaker, session, freqs))
    voice, sess = cache[key]
    return utterance(seed, speaker, session, utt, voice, sess, min_s, max_s, sr)
