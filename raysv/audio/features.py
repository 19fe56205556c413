"""Log-mel filterbank features computed inside the model, on the model's device, in plain torch.

The mel filters are torchaudio's (HTK mel scale, no area normalisation) computed here, so
models need only torch: they export to ONNX and run on machines without torchaudio.
"""

from __future__ import annotations

import math

import torch

from raysv.audio import SAMPLE_RATE

LOG_FLOOR = 1e-6
"""Added to the mel energies before the log so silence stays finite (log(1e-6) ≈ -13.8)."""


def _mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filters(n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int) -> torch.Tensor:
    """Triangular filters ``(n_freqs, n_mels)`` on the HTK mel scale (torchaudio's ``melscale_fbanks``)."""
    all_freqs = torch.linspace(0, sample_rate // 2, n_freqs)
    m_pts = torch.linspace(2595.0 * math.log10(1.0 + f_min / 700.0), 2595.0 * math.log10(1.0 + f_max / 700.0), n_mels + 2)
    f_pts = _mel_to_hz(m_pts)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts.unsqueeze(0) - all_freqs.unsqueeze(1)
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return torch.clamp(torch.minimum(down, up), min=0.0)


class Fbank(torch.nn.Module):
    """80-d log-mel fbank: 25 ms Hamming window, 10 ms hop, 512-point FFT, log(x + 1e-6).

    ``norm`` per utterance and frequency over time: ``mean`` subtracts the mean, ``mean_std``
    also divides by the standard deviation (sslsv's InstanceNorm1d), ``none`` leaves the
    log energies (the ``fbank-mean`` baseline). Input ``(B, samples)`` float waveform,
    output ``(B, n_mels, frames)``.
    """

    NORMS = ("none", "mean", "mean_std")

    def __init__(self, n_mels: int = 80, sample_rate: int = SAMPLE_RATE, norm: str = "none"):
        super().__init__()
        if norm not in self.NORMS:
            raise ValueError(f"fbank norm must be one of {', '.join(self.NORMS)}, got {norm!r}")
        self.n_mels = n_mels
        self.sample_rate = sample_rate
        self.norm = norm
        self.n_fft = 512
        self.win_length = int(0.025 * sample_rate)
        self.hop_length = int(0.010 * sample_rate)
        self.register_buffer("window", torch.hamming_window(self.win_length), persistent=False)
        self.register_buffer("filters", mel_filters(self.n_fft // 2 + 1, 20.0, sample_rate / 2, n_mels, sample_rate),
                             persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.dim() == 1:
            wave = wave.unsqueeze(0)
        with torch.autocast(device_type=wave.device.type, enabled=False):
            spec = torch.stft(wave.float(), self.n_fft, self.hop_length, self.win_length, self.window,
                              center=True, pad_mode="reflect", return_complex=True)
            power = spec.abs().pow(2.0)  # (B, freqs, frames)
            feats = torch.log(torch.matmul(power.transpose(1, 2), self.filters).transpose(1, 2) + LOG_FLOOR)
        if self.norm != "none":
            feats = feats - feats.mean(dim=-1, keepdim=True)
        if self.norm == "mean_std":
            feats = feats / torch.sqrt(feats.pow(2).mean(dim=-1, keepdim=True) + 1e-5)
        return feats


