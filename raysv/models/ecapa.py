"""ECAPA-TDNN (Desplanques et al., Interspeech 2020): the round-0 encoder trained with DINO.

Reads top to bottom: building blocks (Res2 dilated convolution, squeeze-excitation,
SE-Res2Block, attentive statistics pooling) → ``ECAPATDNN`` on fbank features →
``ECAPAEncoder`` on raw waveforms.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from raysv.audio.features import Fbank


@dataclass
class EcapaConfig:
    """ECAPA-TDNN sizes (the reference DINO encoder: 1024 channels, 3072 before pooling)."""

    channels: int = 1024
    mfa_channels: int = 3072
    embed_dim: int = 192
    n_mels: int = 80
    norm: str = "mean_std"  # per-utterance fbank normalisation: mean_std (sslsv's InstanceNorm) | mean


class Res2Conv1d(nn.Module):
    """Res2Net dilated convolution: channel groups see growing receptive fields at one cost.

    The input is split into ``scale`` groups; group 1 passes through, group i ≥ 2 is
    ``BN(ReLU(conv(x_i + y_{i-1})))`` (group 2 without the previous output), so later
    groups accumulate context from earlier ones.
    """

    def __init__(self, channels: int, kernel_size: int, dilation: int, scale: int = 8):
        super().__init__()
        if channels % scale != 0:
            raise ValueError(f"channels ({channels}) must be divisible by the Res2Net scale ({scale})")
        self.scale = scale
        self.width = channels // scale
        padding = dilation * (kernel_size - 1) // 2
        self.convs = nn.ModuleList(
            nn.Conv1d(self.width, self.width, kernel_size, dilation=dilation, padding=padding)
            for _ in range(scale - 1)
        )
        self.norms = nn.ModuleList(nn.BatchNorm1d(self.width) for _ in range(scale - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(x, self.width, dim=1)
        outputs = [chunks[0]]
        previous: torch.Tensor | None = None
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            inp = chunks[i + 1] if previous is None else chunks[i + 1] + previous
            previous = norm(torch.relu(conv(inp)))
            outputs.append(previous)
        return torch.cat(outputs, dim=1)


class SqueezeExcitation(nn.Module):
    """Channel gating from the utterance mean: lets each block rescale channels by global context."""

    def __init__(self, channels: int, bottleneck: int = 128):
        super().__init__()
        self.down = nn.Conv1d(channels, bottleneck, kernel_size=1)
        self.up = nn.Conv1d(bottleneck, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=2, keepdim=True)
        s = torch.sigmoid(self.up(torch.relu(self.down(s))))
        return x * s


class SERes2Block(nn.Module):
    """1×1 conv → Res2 dilated conv → 1×1 conv → SE, each conv followed by ReLU and BN, plus a residual."""

    def __init__(self, channels: int, kernel_size: int, dilation: int, scale: int = 8, se_bottleneck: int = 128):
        super().__init__()
        self.conv_in = nn.Conv1d(channels, channels, kernel_size=1)
        self.norm_in = nn.BatchNorm1d(channels)
        self.res2 = Res2Conv1d(channels, kernel_size, dilation, scale)
        self.conv_out = nn.Conv1d(channels, channels, kernel_size=1)
        self.norm_out = nn.BatchNorm1d(channels)
        self.se = SqueezeExcitation(channels, se_bottleneck)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm_in(torch.relu(self.conv_in(x)))
        h = self.res2(h)
        h = self.norm_out(torch.relu(self.conv_out(h)))
        return x + self.se(h)


def _weighted_mean_std(x: torch.Tensor, weights: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of ``x`` over time (dim 2) under ``weights`` that sum to 1 over time."""
    mean = (x * weights).sum(dim=2)
    var = (x.pow(2) * weights).sum(dim=2) - mean.pow(2)
    return mean, var.clamp(min=eps).sqrt()


class AttentiveStatsPool(nn.Module):
    """Channel-dependent attentive statistics pooling with global context.

    The attention sees each frame concatenated with the utterance's mean and std, so
    frame weights can depend on the whole recording (noise level, channel). Output is the
    attention-weighted mean and std, ``(B, 2 * channels)``.
    """

    def __init__(self, channels: int, bottleneck: int = 128):
        super().__init__()
        self.attention = nn.Sequential(
            nn.Conv1d(3 * channels, bottleneck, kernel_size=1),
            nn.ReLU(),
            nn.BatchNorm1d(bottleneck),
            nn.Tanh(),
            nn.Conv1d(bottleneck, channels, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.shape[2]
        uniform = torch.full_like(x[:, :1, :], 1.0 / frames)
        mean, std = _weighted_mean_std(x, uniform)
        context = torch.cat([x, mean.unsqueeze(2).expand(-1, -1, frames), std.unsqueeze(2).expand(-1, -1, frames)], 1)
        weights = torch.softmax(self.attention(context), dim=2)
        mean, std = _weighted_mean_std(x, weights)
        return torch.cat([mean, std], dim=1)


class ECAPATDNN(nn.Module):
    """ECAPA-TDNN on features ``(B, n_mels, frames)`` → embeddings ``(B, embed_dim)`` (not normalised).

    Conv(k5)+ReLU+BN, three SE-Res2Blocks (k3, dilations 2/3/4), multi-layer feature
    aggregation of the three block outputs, attentive statistics pooling, BN, Linear, BN.
    """

    def __init__(
        self,
        channels: int = 512,
        mfa_channels: int = 1536,
        embed_dim: int = 192,
        n_mels: int = 80,
        scale: int = 8,
        se_bottleneck: int = 128,
        attention_bottleneck: int = 128,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.conv_in = nn.Conv1d(n_mels, channels, kernel_size=5, padding=2)
        self.norm_in = nn.BatchNorm1d(channels)
        self.blocks = nn.ModuleList(
            SERes2Block(channels, kernel_size=3, dilation=d, scale=scale, se_bottleneck=se_bottleneck) for d in (2, 3, 4)
        )
        self.mfa = nn.Conv1d(3 * channels, mfa_channels, kernel_size=1)
        self.pool = AttentiveStatsPool(mfa_channels, attention_bottleneck)
        self.norm_pool = nn.BatchNorm1d(2 * mfa_channels)
        self.fc = nn.Linear(2 * mfa_channels, embed_dim)
        self.norm_embed = nn.BatchNorm1d(embed_dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.norm_in(torch.relu(self.conv_in(feats)))
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        x = torch.relu(self.mfa(torch.cat(outputs, dim=1)))
        x = self.norm_pool(self.pool(x))
        return self.norm_embed(self.fc(x))


class ECAPAEncoder(nn.Module):
    """Waveform ``(B, samples)`` at 16 kHz → mean-normalised log-mel fbank → ECAPA-TDNN → ``(B, embed_dim)``.

    Features are computed inside the module so a checkpoint's ``spec()`` fully describes
    inference, and the fbank runs on whatever device the model is on.
    """

    def __init__(
        self, channels: int = 512, mfa_channels: int = 1536, embed_dim: int = 192, n_mels: int = 80, norm: str = "mean"
    ):
        super().__init__()
        self.channels = channels
        self.mfa_channels = mfa_channels
        self.embed_dim = embed_dim
        self.n_mels = n_mels
        self.norm = norm
        self.features = Fbank(n_mels=n_mels, norm=norm)
        self.tdnn = ECAPATDNN(channels=channels, mfa_channels=mfa_channels, embed_dim=embed_dim, n_mels=n_mels)

    @classmethod
    def from_config(cls, cfg: EcapaConfig) -> "ECAPAEncoder":
        return cls(**asdict(cfg))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.tdnn(self.features(wave))

    def spec(self) -> dict:
        """Everything ``raysv.models.build_encoder`` needs to rebuild this architecture."""
        return {
            "kind": "ecapa",
            "channels": self.channels,
            "mfa_channels": self.mfa_channels,
            "embed_dim": self.embed_dim,
            "n_mels": self.n_mels,
            "norm": self.norm,
        }
