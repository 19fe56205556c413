"""Augmentation: shapes, SNRs, determinism, MUSAN/RIR folders, synthetic impulse responses."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from raysv.audio.augment import SYNTHETIC_CLIPS, SYNTHETIC_SECONDS, Augmenter, reverberate, synthetic_rir

SR = 16000


def _speech(n: int = SR, seed: int = 0) -> np.ndarray:
    """A speech-like test signal: a few harmonics under a slow envelope."""
    t = np.arange(n) / SR
    rng = np.random.default_rng(seed)
    x = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in (180, 360, 540, 900))
    return (0.1 * x * (1.2 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def _snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    clean = clean.astype(np.float64)
    noise = noisy.astype(np.float64) - clean
    return 10 * np.log10(np.mean(clean**2) / np.mean(noise**2))


def _peak_hz(x: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / SR)[np.argmax(spec)])


def _tone(path: Path, hz: float, seconds: float, sr: int = SR) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), sr)


@pytest.mark.parametrize("n", [1, 400, SR, 3 * SR + 7])
def test_output_length_and_dtype(n: int) -> None:
    aug = Augmenter(noise_prob=1.0, reverb_prob=1.0)
    wave = _speech(n).astype(np.float64)
    for seed in range(4):
        out = aug(wave, np.random.default_rng(seed))
        assert out.dtype == np.float32
        assert out.shape == (n,)
        assert np.all(np.isfinite(out))


def test_snr_matches_configured_value_per_kind() -> None:
    snrs = {"noise": 3.0, "music": 9.0, "babble": 15.0}
    aug = Augmenter(noise_prob=1.0, reverb_prob=0.0, snr_noise=(3.0, 3.0),
                    snr_music=(9.0, 9.0), snr_babble=(15.0, 15.0))
    wave = _speech(2 * SR)
    seen = set()
    for seed in range(20):
        out, info = aug.augment(wave, np.random.default_rng(seed))
        seen.add(info.noise_kind)
        assert info.snr_db == pytest.approx(snrs[info.noise_kind])
        assert abs(_snr_db(wave, out) - snrs[info.noise_kind]) < 0.5
        np.testing.assert_allclose(out - wave, info.noise, atol=1e-5)
    assert seen == set(snrs)


def test_drawn_snr_within_range_and_measured() -> None:
    aug = Augmenter(noise_prob=1.0, reverb_prob=0.0)
    wave = _speech(SR)
    for seed in range(30):
        out, info = aug.augment(wave, np.random.default_rng(seed))
        lo, hi = aug.snr[info.noise_kind]
        assert lo <= info.snr_db <= hi
        assert abs(_snr_db(wave, out) - info.snr_db) < 0.5


def test_probabilities_zero_and_one() -> None:
    wave = _speech(SR)
    off = Augmenter(noise_prob=0.0, reverb_prob=0.0)
    np.testing.assert_array_equal(off(wave, np.random.default_rng(0)), wave)
    counts = {"reverb": 0, "noise": 0}
    half = Augmenter(noise_prob=0.5, reverb_prob=0.5)
    rng = np.random.default_rng(1)
    for _ in range(200):
        _, info = half.augment(_speech(800), rng)
        counts["reverb"] += info.reverb
        counts["noise"] += info.noise_kind is not None
    assert 70 < counts["reverb"] < 130 and 70 < counts["noise"] < 130


def test_deterministic_for_seeded_rng() -> None:
    aug = Augmenter(noise_prob=1.0, reverb_prob=1.0)
    wave = _speech(SR)
    a = aug(wave, np.random.default_rng(123))
    b = aug(wave, np.random.default_rng(123))
    c = aug(wave, np.random.default_rng(124))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_crops_get_independent_augmentation() -> None:
    aug = Augmenter(noise_prob=1.0, reverb_prob=0.5)
    batch = np.stack([_speech(SR)] * 6)
    out = aug.augment_batch(batch, np.random.default_rng(0))
    assert out.shape == batch.shape and out.dtype == np.float32
    diffs = out - batch
    for i in range(6):
        for j in range(i + 1, 6):
            assert not np.allclose(diffs[i], diffs[j])
    lists = aug.augment_batch([_speech(500), _speech(900)], np.random.default_rng(0))
    assert [len(x) for x in lists] == [500, 900]


def test_musan_folders_are_used(tmp_path: Path) -> None:
    musan = tmp_path / "musan"
    _tone(musan / "noise" / "free-sound" / "n1.wav", 1250.0, 0.3)  # shorter than the crop: repeated
    aug = Augmenter(musan=str(musan), noise_prob=1.0, reverb_prob=0.0, snr_noise=(5.0, 5.0))
    assert aug.kinds == ("noise",)
    wave = _speech(SR)
    out, info = aug.augment(wave, np.random.default_rng(0))
    assert info.noise_kind == "noise"
    assert _peak_hz(out - wave) == pytest.approx(1250.0, abs=2.0)
    assert abs(_snr_db(wave, out) - 5.0) < 0.5

    # Babble comes from speech/; an 8 kHz file is resampled to 16 kHz (the tone keeps its pitch).
    babble_root = tmp_path / "musan2"
    for i in range(2):
        _tone(babble_root / "speech" / f"s{i}.flac", 700.0, 1.5, sr=8000)
    aug = Augmenter(musan=str(babble_root), noise_prob=1.0, reverb_prob=0.0, snr_babble=(10.0, 10.0))
    out, info = aug.augment(wave, np.random.default_rng(1))
    assert info.noise_kind == "babble"
    assert _peak_hz(out - wave) == pytest.approx(700.0, abs=2.0)
    assert abs(_snr_db(wave, out) - 10.0) < 0.5

    _tone(babble_root / "music" / "m.wav", 440.0, 2.0)
    aug = Augmenter(musan=str(babble_root), noise_prob=1.0, reverb_prob=0.0)
    kinds = {aug.augment(wave, np.random.default_rng(s))[1].noise_kind for s in range(20)}
    assert kinds == {"babble", "music"}


def test_rir_folder_aligned_to_direct_path(tmp_path: Path) -> None:
    rir = np.zeros(400, dtype=np.float32)
    rir[100] = 0.8  # direct path after a 100-sample pre-delay
    rir[150] = 0.4  # one reflection 50 samples later
    (tmp_path / "rirs" / "room").mkdir(parents=True)
    sf.write(tmp_path / "rirs" / "room" / "r.wav", rir, SR)
    aug = Augmenter(rir=str(tmp_path / "rirs"), noise_prob=0.0, reverb_prob=1.0)
    wave = _speech(4000)
    out, info = aug.augment(wave, np.random.default_rng(0))
    assert info.reverb
    delayed = np.r_[np.zeros(50), wave[:-50]]
    expected = (wave + 0.5 * delayed) / np.sqrt(1.25)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_reverb_roughly_preserves_level() -> None:
    rng = np.random.default_rng(0)
    white = rng.standard_normal(3 * SR)
    ratios = [np.mean(reverberate(white, synthetic_rir(rng, SR)) ** 2) / np.mean(white**2) for _ in range(5)]
    assert all(0.75 < r < 1.33 for r in ratios), ratios


def test_missing_and_empty_folders_raise_at_construction(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_musan"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        Augmenter(musan=str(missing))
    empty = tmp_path / "musan"
    (empty / "noise").mkdir(parents=True)
    (empty / "noise" / "README.txt").write_text("not audio")
    with pytest.raises(ValueError, match=f"{empty}.*noise/ music/ speech/"):
        Augmenter(musan=str(empty))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "no_rirs")):
        Augmenter(rir=str(tmp_path / "no_rirs"))
    (tmp_path / "rirs").mkdir()
    with pytest.raises(ValueError, match=str(tmp_path / "rirs")):
        Augmenter(rir=str(tmp_path / "rirs"))


def test_bad_settings_named() -> None:
    with pytest.raises(ValueError, match="noise_prob"):
        Augmenter(noise_prob=1.5)
    with pytest.raises(ValueError, match="snr_music"):
        Augmenter(snr_music=(10.0, 5.0))
    with pytest.raises(ValueError, match="1-D"):
        Augmenter()(np.zeros((2, 100)), np.random.default_rng(0))


def test_synthetic_rir_decays_exponentially() -> None:
    rng = np.random.default_rng(0)
    for rt60 in (0.25, 0.5, 0.8):
        rir = synthetic_rir(rng, SR, rt60=rt60).astype(np.float64)
        assert np.argmax(np.abs(rir)) == 0  # the direct path leads
        assert np.sum(rir**2) == pytest.approx(1.0, rel=1e-5)
        frame = SR // 100  # 10 ms frames of the tail
        tail = rir[1:]
        n_frames = len(tail) // frame
        energy = (tail[: n_frames * frame] ** 2).reshape(n_frames, frame).sum(axis=1)
        t = (np.arange(n_frames) + 0.5) * frame / SR
        level_db = 10 * np.log10(energy)
        slope, intercept = np.polyfit(t, level_db, 1)
        fit = slope * t + intercept
        r2 = 1 - np.sum((level_db - fit) ** 2) / np.sum((level_db - level_db.mean()) ** 2)
        assert r2 > 0.95
        assert slope == pytest.approx(-60.0 / rt60, rel=0.15)
    lengths = [len(synthetic_rir(rng, SR)) / SR for _ in range(50)]
    assert 0.2 <= min(lengths) and max(lengths) <= 0.8


def test_from_config_and_pickle() -> None:
    @dataclass
    class AugmentConfig:
        musan: str | None = None
        rir: str | None = None
        noise_prob: float = 1.0
        reverb_prob: float = 1.0
        snr_noise: list = None  # YAML gives lists
        snr_music: tuple = (5.0, 15.0)
        snr_babble: tuple = (13.0, 20.0)
        babble_speakers: tuple = (2, 3)

    cfg = AugmentConfig(snr_noise=[1, 2])
    aug = Augmenter.from_config(cfg)
    assert aug.snr["noise"] == (1.0, 2.0) and aug.babble_speakers == (2, 3)
    assert aug.noise_prob == 1.0 and aug.sample_rate == SR
    wave = _speech(SR)
    expected = aug(wave, np.random.default_rng(5))
    clone = pickle.loads(pickle.dumps(aug))
    np.testing.assert_array_equal(clone(wave, np.random.default_rng(5)), expected)


def test_file_cache_is_bounded_and_not_pickled(tmp_path: Path) -> None:
    musan = tmp_path / "musan"
    for i in range(5):
        _tone(musan / "noise" / f"n{i}.wav", 300.0 + 100 * i, 0.2)
    aug = Augmenter(musan=str(musan), noise_prob=1.0, reverb_prob=0.0)
    aug.cache_size = 3
    rng = np.random.default_rng(0)
    for _ in range(30):
        aug(_speech(800), rng)
    assert 0 < len(aug._cache) <= 3
    assert len(pickle.loads(pickle.dumps(aug))._cache) == 0


def test_unreadable_noise_file_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    musan = tmp_path / "musan"
    _tone(musan / "noise" / "good.wav", 900.0, 0.5)
    (musan / "noise" / "broken.wav").write_bytes(b"RIFF not really a wav file")
    aug = Augmenter(musan=str(musan), noise_prob=1.0, reverb_prob=0.0)
    wave = _speech(SR)
    with caplog.at_level("WARNING", logger="raysv.audio.augment"):
        for seed in range(10):
            out = aug(wave, np.random.default_rng(seed))
            assert _peak_hz(out - wave) == pytest.approx(900.0, abs=2.0)
    assert "broken.wav" in caplog.text
    assert aug.noise_files["noise"] == [str(musan / "noise" / "good.wav")]

    only_broken = tmp_path / "musan2"
    (only_broken / "music").mkdir(parents=True)
    (only_broken / "music" / "x.flac").write_bytes(b"junk")
    aug = Augmenter(musan=str(only_broken), noise_prob=1.0, reverb_prob=0.0)
    with pytest.raises(ValueError, match=f"{only_broken}/music"):
        aug(wave, np.random.default_rng(0))


def test_channel_eq_shapes_spectrum_as_its_gain_curve() -> None:
    from scipy.signal import welch

    from raysv.audio.augment import apply_gains, random_eq_gains

    rng = np.random.default_rng(3)
    white = rng.standard_normal(4 * SR)
    freqs = np.fft.rfftfreq(white.size, 1 / SR)
    gains = random_eq_gains(freqs, np.random.default_rng(7), eq_db=6.0, lowpass_prob=0.0)
    out = apply_gains(white, gains)
    assert np.mean(out**2) == pytest.approx(np.mean(white**2), rel=1e-9)  # level kept
    f, p_in = welch(white, SR, nperseg=512)
    _, p_out = welch(out, SR, nperseg=512)
    measured = 10 * np.log10(p_out / p_in)
    expected = np.interp(f, freqs, gains)
    band = (f > 200) & (f < 7000)
    offset = np.mean(measured[band] - expected[band])  # the level normalisation is a constant shift
    assert np.max(np.abs(measured[band] - expected[band] - offset)) < 1.5
    assert np.ptp(expected[band]) > 3.0  # the curve is not flat


def test_channel_eq_band_limit_and_probability() -> None:
    from raysv.audio.augment import random_eq_gains

    freqs = np.fft.rfftfreq(SR, 1 / SR)
    gains = random_eq_gains(freqs, np.random.default_rng(0), eq_db=0.0, lowpass_prob=1.0)
    assert np.all(gains[freqs > 8000 - 1] <= -59.0) and np.ptp(gains[freqs < 2500]) < 1e-9
    x = _speech()
    rng = np.random.default_rng(1)
    never = Augmenter(noise_prob=0.0, reverb_prob=0.0, eq_prob=0.0)
    assert np.array_equal(never(x, rng), x)
    always = Augmenter(noise_prob=0.0, reverb_prob=0.0, eq_prob=1.0)
    out, info = always.augment(x, rng)
    assert info.eq and not np.allclose(out, x, atol=1e-4)
    with pytest.raises(ValueError, match="eq_prob"):
        Augmenter(eq_prob=1.5)
    with pytest.raises(ValueError, match="eq_db"):
        Augmenter(eq_db=-1.0)


def test_mu_law_matches_torchaudio_and_has_256_levels() -> None:
    import torch
    import torchaudio.functional as taf

    from raysv.audio.augment import mu_law

    x = np.linspace(-1.0, 1.0, 20001)
    reference = taf.mu_law_decoding(taf.mu_law_encoding(torch.from_numpy(x), 256), 256).numpy()
    out = mu_law(x)
    assert np.max(np.abs(out - reference)) < 1e-6
    assert len(np.unique(np.round(out, 9))) == 256
    assert np.array_equal(mu_law(np.array([-3.0, 3.0])), mu_law(np.array([-1.0, 1.0])))  # clipped


def test_telephone_channel_band_limits_and_codes() -> None:
    from raysv.audio.augment import telephone_channel

    white = np.random.default_rng(0).standard_normal(2 * SR) * 0.1
    out = telephone_channel(white, np.random.default_rng(1), SR)
    spec = np.abs(np.fft.rfft(out)) ** 2
    freqs = np.fft.rfftfreq(out.size, 1 / SR)
    assert spec[(freqs < 150) | (freqs > 4200)].sum() < 1e-3 * spec.sum()
    assert spec[(freqs > 500) & (freqs < 2900)].sum() > 0.6 * spec.sum()
    assert len(np.unique(out)) <= 256 < len(np.unique(white))  # 8-bit codes
    a, b = (telephone_channel(white, np.random.default_rng(s), SR) for s in (2, 3))
    assert not np.allclose(a, b)  # band edges and level drawn per call


def test_telephone_probability_and_untouched_stream_when_off() -> None:
    x = _speech()
    plain = Augmenter(noise_prob=0.5, reverb_prob=0.5, eq_prob=0.5)
    off = Augmenter(noise_prob=0.5, reverb_prob=0.5, eq_prob=0.5, telephone_prob=0.0)
    for seed in range(4):  # off draws nothing: the same crops as before the option existed
        assert np.array_equal(plain(x, np.random.default_rng(seed)), off(x, np.random.default_rng(seed)))
    always = Augmenter(noise_prob=0.0, reverb_prob=0.0, telephone_prob=1.0)
    out, info = always.augment(x, np.random.default_rng(0))
    assert info.telephone and out.dtype == np.float32 and not np.allclose(out, x, atol=1e-3)
    assert np.array_equal(info.speech.astype(np.float32), out)  # no noise: the coded speech is the output
    with pytest.raises(ValueError, match="telephone_prob"):
        Augmenter(telephone_prob=-0.1)
    assert Augmenter.from_config({"telephone_prob": 0.25}).telephone_prob == 0.25


def test_synthetic_noise_is_a_fixed_set_of_clips_in_every_process() -> None:
    """Without MUSAN, noise is a random segment of one of a fixed set of synthetic clips per kind,
    the same set in every process (an Augmenter unpickled in a Ray worker makes it again)."""
    aug = Augmenter(noise_prob=1.0, reverb_prob=0.0, babble_speakers=(3, 4))
    clone = pickle.loads(pickle.dumps(aug))
    rng = np.random.default_rng(3)
    for kind in ("noise", "music", "babble"):
        clips = aug._synthetic_clips(kind)
        assert len(clips) == SYNTHETIC_CLIPS and {c.size for c in clips} == {int(SYNTHETIC_SECONDS * SR)}
        assert len({c.tobytes() for c in clips}) == SYNTHETIC_CLIPS  # all different
        for mine, theirs in zip(clips, clone._synthetic_clips(kind)):
            np.testing.assert_array_equal(mine, theirs)
        for n in (SR, 2 * SR):
            noise = aug.draw_noise(kind, n, rng)
            assert noise.shape == (n,)
            piece = noise.astype(np.float32)
            starts = [(i, s) for i, c in enumerate(clips) for s in np.flatnonzero(c[: c.size - n + 1] == piece[0])]
            assert [i for i, s in starts if np.array_equal(clips[i][s:s + n], piece)]  # a piece of one of the clips
    # A crop longer than the clips still gets noise over its whole length.
    long = aug.draw_noise("babble", int(SYNTHETIC_SECONDS * SR) + 5, rng)
    assert long.shape == (int(SYNTHETIC_SECONDS * SR) + 5,) and np.std(long[-SR:]) > 0
