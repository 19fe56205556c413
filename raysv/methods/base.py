"""What every training method provides to the shared loop in ``raysv.train.loop``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

Wrap = Callable[[torch.nn.Module], torch.nn.Module]
"""Moves a module to the device and wraps it for data parallelism (``prepare_model``)."""


@dataclass
class LrConfig:
    """Two learning rates (pre-trained backbone, new back-end), decayed every epoch."""

    backbone: float = 2e-5
    head: float = 5e-3
    decay: float = 0.95  # multiplied in every epoch
    weight_decay: float = 0.01  # AdamW's, on every group (the reference: PyTorch's default)
    # Fine-tuning: the backbone's rate ramps up linearly from 0 over this many epochs, so the
    # new (random) classifier settles before its gradients reach the pre-trained encoder.
    backbone_warmup_epochs: float = 0.0


class Method:
    """A training method: builds its modules, takes steps, and says what to save.

    A method is built from its own config section (``config_class``), the run's seed and
    what the driver computed (steps per epoch, label files): ``cls(section, seed, **args)``.
    ``epochs`` and ``batch_size`` (global, split over the workers) drive the loop;
    ``state_dict`` must hold only tensors, numbers, strings and containers of
    them so that checkpoints load with ``weights_only=True``.
    """

    name: str = "method"
    config_class: type = object
    custom_batches = False  # True: the loop streams rows and the method's ``rebatch`` forms the batches
    bf16 = False  # set by the loop (``raysv.runtime.use_bf16``): forward passes under bf16 autocast
    epochs: int = 1
    batch_size: int = 1

    def setup(self, device: torch.device, wrap: Wrap) -> None:
        raise NotImplementedError

    def start_epoch(self, epoch: int) -> dict[str, float]:
        return {}

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        raise NotImplementedError

    def rebatch(self, batches: Any, epoch: int, batch_size: int) -> Any:
        """With ``custom_batches``: NumPy batches of ``batch_size`` rows from a stream of row batches."""
        raise NotImplementedError

    def end_epoch(self, epoch: int) -> dict[str, float]:
        return {}

    def encoder(self) -> torch.nn.Module:
        """The module that turns waveforms into embeddings, saved as ``model.pt``."""
        raise NotImplementedError

    def model_info(self) -> dict[str, Any]:
        """Extra entries for ``model.json``."""
        return {"method": self.name}

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The bare module inside a DDP wrapper."""
    return getattr(module, "module", module)


def cosine_schedule(start: float, end: float, step: int, total: int, warmup: int = 0, warmup_start: float = 0.0) -> float:
    """Linear warm-up from ``warmup_start`` to ``start``, then cosine from ``start`` to ``end``."""
    if step < warmup:
        return warmup_start + (start - warmup_start) * step / max(warmup, 1)
    progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average over the DDP workers (identity when not distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor)
        tensor /= torch.distributed.get_world_size()
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor)
    return tensor


def autocast(device: torch.device, enabled: bool):
    """bf16 mixed precision where ``enabled`` (losses and features stay fp32), plain fp32 otherwise."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)
