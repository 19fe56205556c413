"""Training on noisy pseudo-labels: the loss gate and label correction (wavlm_ssl_sv's LGL and LC).

The gate: a two-component Gaussian mixture fitted to last epoch's per-sample losses (in log
space, as the reference does) splits "clean" from "noisy"; each step, a sample whose loss lies
past the crossing of the two weighted components is left out. Label correction: a sample the
gate drops is trained, for that step, on the class its clean crop is confidently predicted as.
"""

from __future__ import annotations

import numpy as np
import torch


def gmm_crossing(values: np.ndarray, seed: int = 0) -> float | None:
    """Value where a 2-component GMM's weighted densities cross between the two means.

    Returns None when the values are not bimodal: the fitted mixture density has no
    dip between the two means (a unimodal sample split into two overlapping
    components), no crossing between the means (one component dominates
    everywhere), too few samples, or degenerate spread. (The reference stops training
    with an assertion there; raysv trains that epoch without a gate.)
    """
    from sklearn.mixture import GaussianMixture

    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size < 10 or np.ptp(x) <= 1e-12:
        return None
    gmm = GaussianMixture(2, random_state=seed, reg_covar=1e-6).fit(x.reshape(-1, 1))
    means = gmm.means_.ravel()
    lo, hi = np.sort(means)
    if hi - lo <= 1e-9:
        return None
    grid = np.linspace(lo, hi, 2001).reshape(-1, 1)
    # Every mode of a two-Gaussian mixture lies between its means: bimodal iff the density dips there.
    density = np.exp(gmm.score_samples(grid))
    rim = np.minimum(np.maximum.accumulate(density), np.maximum.accumulate(density[::-1])[::-1])
    if not np.any(density < rim * (1.0 - 1e-6)):
        return None
    post = gmm.predict_proba(grid)[:, int(np.argmax(means))]  # P(high-loss component | x)
    above = np.nonzero(post >= 0.5)[0]
    if above.size == 0 or above[0] == 0:
        return None  # the high-loss component wins everywhere or nowhere between the means
    i = int(above[0])
    p0, p1 = post[i - 1], post[i]
    t = (0.5 - p0) / (p1 - p0) if p1 != p0 else 0.0
    return float(grid[i - 1, 0] + t * (grid[i, 0] - grid[i - 1, 0]))


def gate_space(losses: torch.Tensor | np.ndarray, space: str) -> torch.Tensor | np.ndarray:
    """Losses on the scale the gate works in: ``log`` (the reference) or ``linear``. NaN stays NaN."""
    if space == "linear":
        return losses
    if isinstance(losses, torch.Tensor):
        return torch.log(losses.clamp_min(1e-12))
    return np.log(np.maximum(losses, 1e-12))


def kept_by_gate(values: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Samples the gate keeps: value not past ``threshold`` (NaN, an unseen sample, is kept)."""
    if threshold is None:
        return torch.ones_like(values, dtype=torch.bool)
    return ~(values > threshold)


def correct_labels(logits: torch.Tensor, temperature: float, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sharpened prediction ``softmax(logits / T)``: (predicted class, whether its probability passes)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    confidence, predicted = probs.max(dim=-1)
    return predicted, confidence > threshold
