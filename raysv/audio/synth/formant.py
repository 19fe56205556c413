"""The ``formant`` toy voice: a Rosenberg glottal source through cascaded formant resonators.

Each speaker's voice is a set of traits drawn from ``(seed, global speaker number)``; each
session adds its own channel and day-to-day voice drift, each utterance its own noise and gain.

Synthesis: a glottal flow-derivative pulse train (Rosenberg shape, jitter,
shimmer, aspiration) is filtered by a cascade of five formant resonators whose
frequencies glide between phone targets. The time-varying filter is applied per
short-time frame (32 ms, 75 % overlap, weighted overlap-add), which keeps the
whole utterance vectorised. Fricatives and bursts are shaped noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from raysv.audio.synth.dsp import overlap_add, smooth, stft_geometry, to_int16

_TAG_SPEAKER, _TAG_SESSION, _TAG_UTT = 11, 12, 13

# Formant targets F1-F3 (Hz) of an adult male voice (Peterson & Barney 1952).
_VOWELS = np.array(
    [[270, 2290, 3010], [390, 1990, 2550], [530, 1840, 2480], [660, 1720, 2410], [730, 1090, 2440],
     [570, 840, 2410], [440, 1020, 2240], [300, 870, 2240], [640, 1190, 2390], [490, 1350, 1690]],
    dtype=np.float64,
)
_APPROX = np.array([[310, 700, 2300], [280, 2200, 3000], [360, 1000, 2700], [350, 1150, 1600]], dtype=np.float64)
_NASALS = np.array([[260, 1000, 2200], [260, 1500, 2500]], dtype=np.float64)
_HIGH_FORMANTS = np.array([3400.0, 4400.0])
_BANDWIDTHS = np.array([70.0, 95.0, 140.0, 200.0, 260.0])
# Fricatives: (centre Hz, log-frequency width, level, voiced?) for s, sh, f, th, z, v.
_FRICATIVES = [(6000, 0.30, 0.45, False), (3300, 0.30, 0.40, False), (4500, 1.0, 0.12, False),
               (5000, 0.9, 0.10, False), (6000, 0.30, 0.25, True), (4500, 1.0, 0.08, True)]
# Stop bursts: (centre Hz, log-frequency width) for p, t, k.
_BURSTS = [(1000, 0.9), (4200, 0.5), (2300, 0.35)]

# Spread of speaker traits (standard deviations; log-scale where multiplicative).
_F0_SD = 0.2  # log mean F0 within a sex
_SCALE_SD = 0.07  # formant scale (vocal-tract length) within a sex
_SETTING_SD = 0.07  # articulatory setting: global log shift of F1, F2, F3
_TILT_SD = 4.0  # source spectral tilt, dB per octave
_BW_SD = 0.3  # log formant bandwidth scale
_FRIC_SD = 0.15  # log fricative centre frequency scale
_FRIC_GAIN_SD = 0.5  # log fricative level
_PAUSE = (0.05, 0.2)  # pause between phrases, s

# Nuisance: day-to-day voice drift, session channel, utterance noise and gain. Tuned so
# that the fbank-mean baseline scores about 25 % EER on the default corpus.
_SESSION_F0 = 0.04  # log F0 drift per session
_SESSION_TILT_DB = 0.5  # vocal-effort drift per session, dB per octave
_UTT_F0 = 0.03  # log F0 drift per utterance
_EQ_DB = 2.0  # std of each random EQ band, dB
_CHANNEL_TILT_DB = 0.4  # std of the channel's overall tilt, dB per octave
_HIGHPASS = (50.0, 150.0)  # Hz
_LOWPASS = (0.85, 1.1)  # fraction of Nyquist (above 1: no band limit)
_TELEPHONE_P = 0.1  # share of sessions band-limited to 3.4-4.2 kHz
_NOISE_SLOPE = (-5.0, -1.0)  # background-noise colour, dB per octave
_HUMS = 1  # at most this many narrow-band hums in a session's background noise
_SNR_DB = (20.0, 45.0)
_GAIN_DB = (-6.0, -2.0)  # utterance level around -20 dBFS


@dataclass(frozen=True)
class Voice:
    """Fixed traits of one speaker."""

    f0: float  # mean F0, Hz
    f0_range: float  # intonation spread, semitones (std)
    formant_scale: float  # 1 / relative vocal-tract length
    bandwidth_scale: float
    tilt: float  # extra spectral tilt of the source, dB per octave
    open_quotient: float
    speed_quotient: float
    breath: float  # aspiration noise relative to voicing
    jitter: float
    shimmer: float
    rate: float  # speaking rate, > 1 is faster
    high_formants: np.ndarray  # F4, F5 in Hz
    zero: float  # hypopharyngeal anti-resonance, Hz
    vowel_offsets: np.ndarray  # (10, 3) multiplicative formant offsets
    approx_offsets: np.ndarray  # (4, 3)
    fric_scale: float
    fric_gain: float


def speaker_voice(seed: int, speaker: int) -> Voice:
    """Traits of global speaker number ``speaker``; a pure function of (seed, speaker)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG_SPEAKER, speaker]))
    female = rng.random() < 0.5
    f0 = math.exp(rng.normal(math.log(205.0 if female else 115.0), _F0_SD))
    scale = rng.normal(1.15 if female else 1.0, _SCALE_SD)
    setting = rng.normal(0.0, _SETTING_SD, size=3)  # articulatory setting: global F1-F3 shifts
    return Voice(
        f0=f0,
        f0_range=rng.uniform(1.2, 4.0),
        formant_scale=scale,
        bandwidth_scale=math.exp(rng.normal(0.0, _BW_SD)),
        tilt=rng.normal(0.0, _TILT_SD),
        open_quotient=rng.uniform(0.4, 0.8),
        speed_quotient=rng.uniform(1.5, 3.5),
        breath=math.exp(rng.uniform(math.log(0.03), math.log(0.5))),
        jitter=rng.uniform(0.002, 0.02),
        shimmer=rng.uniform(0.02, 0.12),
        rate=math.exp(rng.normal(0.0, 0.15)),
        high_formants=_HIGH_FORMANTS * scale * np.exp(rng.normal(0.0, 0.06, size=2)),
        zero=scale * rng.uniform(3800.0, 5600.0),
        vowel_offsets=np.exp(rng.normal(0.0, 0.05, size=_VOWELS.shape) + setting),
        approx_offsets=np.exp(rng.normal(0.0, 0.05, size=_APPROX.shape) + setting),
        fric_scale=math.exp(rng.normal(0.0, _FRIC_SD)) * scale,
        fric_gain=math.exp(rng.normal(0.0, _FRIC_GAIN_SD)),
    )


@dataclass(frozen=True)
class Session:
    """One recording session: channel response, background-noise colour, voice drift."""

    channel: np.ndarray  # amplitude response on the rfft bins
    noise_shape: np.ndarray  # amplitude spectrum of the background noise
    f0_shift: float
    tilt_shift: float


def session_channel(seed: int, speaker: int, session: int, freqs: np.ndarray) -> Session:
    rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG_SESSION, speaker, session]))
    nyq = freqs[-1]
    logf = np.log2(np.maximum(freqs, 20.0))
    db = np.zeros_like(freqs)
    for _ in range(rng.integers(3, 7)):  # random peaking EQ bands
        centre = rng.uniform(math.log2(100.0), math.log2(0.9 * nyq))
        width = rng.uniform(0.3, 1.2)
        db += rng.normal(0.0, _EQ_DB) * np.exp(-0.5 * ((logf - centre) / width) ** 2)
    db += rng.normal(0.0, _CHANNEL_TILT_DB) * (logf - math.log2(1000.0))  # overall tilt, dB / octave
    amp = 10.0 ** (db / 20.0)
    hp = rng.uniform(*_HIGHPASS)
    amp /= np.sqrt(1.0 + (hp / np.maximum(freqs, 1.0)) ** 8)
    if rng.random() < _TELEPHONE_P:  # telephone-like band limit
        lp = rng.uniform(3400.0, 4200.0)
    else:
        lp = rng.uniform(*_LOWPASS) * nyq
    amp /= np.sqrt(1.0 + (freqs / lp) ** 12)
    noise_db = rng.uniform(*_NOISE_SLOPE) * (logf - math.log2(500.0))
    for _ in range(rng.integers(0, _HUMS + 1)):  # hums and whines
        centre = rng.uniform(math.log2(60.0), math.log2(0.9 * nyq))
        noise_db += rng.uniform(3.0, 15.0) * np.exp(-0.5 * ((logf - centre) / 0.05) ** 2)
    return Session(amp, 10.0 ** (noise_db / 20.0), math.exp(rng.normal(0.0, _SESSION_F0)),
                   rng.normal(0.0, _SESSION_TILT_DB))


def _plan(rng: np.random.Generator, voice: Voice, duration: float) -> tuple[np.ndarray, ...]:
    """Random phone sequence as per-segment arrays (end time, voicing, frication, formants)."""
    ends: list[float] = []
    vlev: list[float] = []
    flev: list[float] = []
    fcen: list[float] = []
    fwid: list[float] = []
    nasal: list[bool] = []
    knots_t: list[float] = []
    knots_f: list[np.ndarray] = []
    t = 0.0
    slow = 1.0 / voice.rate

    def add(d: float, v: float = 0.0, f: float = 0.0, fc: float = 1000.0, fw: float = 1.0, nas: bool = False,
            target: np.ndarray | None = None, plateau: bool = True) -> None:
        nonlocal t
        d *= slow
        if target is not None:
            if plateau:
                knots_t.extend([t + 0.25 * d, t + 0.75 * d])
                knots_f.extend([target, target])
            else:
                knots_t.append(t + 0.5 * d)
                knots_f.append(target)
        t += d
        ends.append(t)
        vlev.append(v)
        flev.append(f)
        fcen.append(fc)
        fwid.append(fw)
        nasal.append(nas)

    def consonant(kind: int) -> None:
        if kind == 0:  # stop: closure, burst, aspiration
            place = rng.integers(len(_BURSTS))
            fc, fw = _BURSTS[place]
            voiced = rng.random() < 0.4
            add(rng.uniform(0.03, 0.07), v=0.08 if voiced else 0.0)
            add(rng.uniform(0.008, 0.02), f=0.7, fc=fc * voice.fric_scale, fw=fw)
            if not voiced:
                add(rng.uniform(0.015, 0.05), f=0.15, fc=1500.0 * voice.fric_scale, fw=1.2)
        elif kind == 1:  # fricative
            fc, fw, lev, voiced = _FRICATIVES[rng.integers(len(_FRICATIVES))]
            add(rng.uniform(0.06, 0.14), v=0.25 if voiced else 0.0, f=lev, fc=fc * voice.fric_scale, fw=fw)
        elif kind == 2:  # nasal
            target = _NASALS[rng.integers(len(_NASALS))] * voice.formant_scale
            add(rng.uniform(0.04, 0.09), v=0.3, nas=True, target=target)
        else:  # approximant
            i = rng.integers(len(_APPROX))
            add(rng.uniform(0.03, 0.07), v=0.6, target=_APPROX[i] * voice.approx_offsets[i] * voice.formant_scale,
                plateau=False)

    add(rng.uniform(0.05, 0.3))
    while t < duration:
        for _ in range(rng.integers(2, 9)):
            for _ in range(rng.choice(3, p=[0.25, 0.55, 0.2])):
                consonant(rng.choice(4, p=[0.35, 0.3, 0.15, 0.2]))
            i = rng.integers(len(_VOWELS))
            stress = rng.uniform(0.6, 1.0)
            add(rng.uniform(0.06, 0.18) * (0.7 + stress * 0.5), v=stress,
                target=_VOWELS[i] * voice.vowel_offsets[i] * voice.formant_scale)
            if rng.random() < 0.4:
                consonant(rng.choice(3, p=[0.4, 0.4, 0.2]))
        add(rng.uniform(*_PAUSE))
    if not knots_t:
        knots_t, knots_f = [0.0], [_VOWELS[8] * voice.formant_scale]
    return (np.asarray(ends), np.asarray(vlev), np.asarray(flev), np.asarray(fcen), np.asarray(fwid),
            np.asarray(nasal), np.asarray(knots_t), np.stack(knots_f))


def utterance(seed: int, speaker: int, session: int, utt: int, voice: Voice, sess: Session,
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
    ft = np.arange(frames) * hop / sr  # frame centre times

    ends, vlev, flev, fcen, fwid, nasal, kt, kf = _plan(rng, voice, duration)
    seg = np.minimum(np.searchsorted(ends, ft, side="right"), len(ends) - 1)
    fpm = sr / hop / 1000.0  # frames per millisecond
    voice_amp = smooth(vlev[seg], max(1, int(round(30 * fpm))))
    fric_amp = smooth(flev[seg], max(1, int(round(12 * fpm))))

    # Formant and bandwidth tracks.
    f123 = np.stack([np.interp(ft, kt, kf[:, k]) for k in range(3)], axis=1)
    f123 = smooth(f123, max(1, int(round(20 * fpm))))
    hi = np.broadcast_to(voice.high_formants, (frames, 2))
    formants = np.concatenate([f123, hi], axis=1)
    bw = np.broadcast_to(_BANDWIDTHS * voice.bandwidth_scale, (frames, 5)).copy()
    bw[:, 1:] *= np.where(nasal[seg], 3.0, 1.0)[:, None]
    keep = formants < 0.45 * sr
    formants = np.minimum(formants, 0.45 * sr)

    # Intonation: smooth random contour plus declination, in semitones around the speaker's F0.
    step = 0.25 / voice.rate
    knots = rng.standard_normal(int(duration / step) + 3)
    contour = np.interp(ft / step, np.arange(len(knots)), knots)
    contour = smooth(contour, max(1, int(round(120 * fpm))))
    contour = (contour - contour.mean()) / max(float(np.std(contour)), 0.5)
    decl = 1.5 * (0.5 - ft / max(duration, 1e-3))
    semis = voice.f0_range * contour + decl
    f0_utt = voice.f0 * sess.f0_shift * math.exp(rng.normal(0.0, _UTT_F0))
    f0_frames = np.clip(f0_utt * 2.0 ** (semis / 12.0), 55.0, 450.0)

    # Glottal source at the sample rate; sample i sits at utterance time (i - nfft/2) / sr.
    centres = np.arange(frames) * hop + nfft // 2
    f0s = np.interp(np.arange(length), centres, f0_frames)
    phase = np.cumsum(f0s) / sr
    jit = 1.0 + voice.jitter * rng.standard_normal(int(phase[-1]) + 2)
    phase = np.cumsum(f0s * jit[phase.astype(np.int64)]) / sr
    period = phase.astype(np.int64)
    frac = phase - period
    shim = 1.0 + voice.shimmer * rng.standard_normal(int(period[-1]) + 1)
    oq, sq = voice.open_quotient, voice.speed_quotient
    tp, tn = oq * sq / (1.0 + sq), oq / (1.0 + sq)
    flow = np.where(frac < tp, 0.5 * (1.0 - np.cos(np.pi * frac / tp)),
                    np.where(frac < tp + tn, np.cos(np.pi * (frac - tp) / (2.0 * tn)), 0.0))
    dflow = np.diff(flow * shim[period], prepend=0.0)
    dflow /= max(float(np.sqrt(np.mean(dflow**2))), 1e-9)
    sig = np.empty((3, length), dtype=np.float32)  # excitation, frication noise, background noise
    sig[0] = dflow + rng.standard_normal(length, dtype=np.float32) * np.where(frac < oq, voice.breath, 0.35 * voice.breath)
    sig[1] = rng.standard_normal(length, dtype=np.float32)
    sig[2] = rng.standard_normal(length, dtype=np.float32)
    win = np.sqrt(np.hanning(nfft + 1)[:-1]).astype(np.float32)
    spec = np.fft.rfft(np.lib.stride_tricks.sliding_window_view(sig, nfft, axis=1)[:, ::hop] * win, axis=2)

    # Cascade of resonators, unity gain at DC: the product of the five second-order
    # denominators is a 10th-order polynomial, evaluated on the rfft bins with one FFT.
    r = np.where(keep, np.exp(-np.pi * bw / sr), 0.0)
    c = np.where(keep, 2.0 * r * np.cos(2.0 * np.pi * formants / sr), 0.0)
    poly = np.zeros((frames, 11))
    poly[:, 0] = 1.0
    for k in range(5):
        a = poly.copy()
        poly[:, 1:] -= c[:, k:k + 1] * a[:, :-1]
        poly[:, 2:] += (r[:, k:k + 1] ** 2) * a[:, :-2]
    dc_gain = np.prod(1.0 - c + r**2, axis=1)
    tract = (dc_gain[:, None] / np.fft.rfft(poly, n=nfft, axis=1)).astype(np.complex64)
    if voice.zero < 0.45 * sr:
        rz = math.exp(-np.pi * 250.0 / sr)
        cz = 2.0 * rz * math.cos(2.0 * np.pi * voice.zero / sr)
        tract *= (np.fft.rfft([1.0, -cz, rz * rz], n=nfft) / (1.0 - cz + rz * rz)).astype(np.complex64)
    octaves = np.log2((freqs + 200.0) / 1200.0)
    tilt = 10.0 ** ((voice.tilt + sess.tilt_shift) * octaves / 20.0)
    speech = spec[0] * tract * (voice_amp[:, None] * tilt[None, :]).astype(np.float32)

    logf = np.log(np.maximum(freqs, 20.0))
    shape = np.exp(-0.5 * ((logf[None, :] - np.log(fcen[seg])[:, None]) / fwid[seg][:, None]) ** 2)
    speech += spec[1] * (shape * (fric_amp * (3.0 * voice.fric_gain))[:, None]).astype(np.float32)
    speech *= sess.channel.astype(np.float32)

    noise = spec[2] * (sess.noise_shape * np.sqrt(sess.channel)).astype(np.float32)
    snr = rng.uniform(*_SNR_DB)
    ps = float(np.mean(np.abs(speech) ** 2))
    pn = float(np.mean(np.abs(noise) ** 2))
    total = speech + noise * math.sqrt(ps / (pn * 10.0 ** (snr / 10.0)))

    out = np.fft.irfft(total, n=nfft, axis=1) * win
    return to_int16(overlap_add(out, hop, nfft, n), rng, _GAIN_DB)


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
