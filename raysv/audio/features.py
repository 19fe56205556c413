"""Log-mel filterbank features computed inside the model, on the model's device."""

from __future__ import annotations

import torch
import torchaudio

from raysv.audio.io import SAMPLE_RATE

LOG_FLOOR = 1e-6
"""Added to the mel energies before the log so silence stays finite (log(1e-6) ≈ -13.8)."""


class Fbank(torch.nn.Module):
    """80-d log-mel fbank: 25 ms Hamming window, 10 ms hop, 512-point FFT, log(x + 1e-6).

    With ``mean_norm`` each frequency's mean over time is subtracted per utterance
    (the normalisation the encoders use; the ``fbank-mean`` baseline does not).
    Input ``(B, samples)`` float waveform, output ``(B, n_mels, frames)``.
    """

    def __init__(self, n_mels: int = 80, sample_rate: int = SAMPLE_RATE, mean_norm: bool = False):
        super().__init__()
        self.n_mels = n_mels
        self.sample_rate = sample_rate
        self.mean_norm = mean_norm
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
        if self.mean_norm:
            feats = feats - feats.mean(dim=-1, keepdim=True)
        return feats
