"""Log-mel filterbank features computed inside the model, on the model's device."""

from __future__ import annotations

import torch
import torchaudio

from raysv.audio.io import SAMPLE_RATE

LOG_FLOOR = 1e-6
"""Added to the mel energies before the log so silence stays finite (log(1e-6) ≈ -13.8)."""


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
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate,
            n_fft=512,
            win_length=int(0.025 * sample_rate),
            hop_length=int(0.010 * sample_rate),
            f_min=20.0,
            f_max=sample_rate / 2,
            window_fn=torch.hamming_window,
            n_mels=n_mels,
            power=2.0,
            center=True,
        )

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.dim() == 1:
            wave = wave.unsqueeze(0)
        with torch.autocast(device_type=wave.device.type, enabled=False):
            feats = torch.log(self.mel(wave.float()) + LOG_FLOOR)
        if self.norm != "none":
            feats = feats - feats.mean(dim=-1, keepdim=True)
        if self.norm == "mean_std":
            feats = feats / torch.sqrt(feats.pow(2).mean(dim=-1, keepdim=True) + 1e-5)
        return feats
