"""Evaluation figures: DET curve, score histogram, EER/NMI per stage.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so importing
this module never changes the user's backend and works without a display.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import norm

from raysv.evaluation.metrics import compute_eer
from raysv.evaluation.scoring import check_trials, error_rates

_DET_TICKS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100)
    return path


def plot_det(scores: np.ndarray, labels: np.ndarray, path: str | Path, title: str = "") -> Path:
    """DET curve (miss vs false-alarm rate on normal-deviate axes) with the EER point; writes a PNG."""
    scores, targets = check_trials(scores, labels)
    _, p_miss, p_fa = error_rates(scores, targets)
    eer = compute_eer(scores, targets.astype(np.int64))
    lo = min(_DET_TICKS[0], 0.5 / max(int(targets.sum()), int((~targets).sum())))
    clip = lambda p: norm.ppf(np.clip(p, lo, 1 - lo))  # noqa: E731
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.plot(clip(p_fa), clip(p_miss), lw=1.5, label="DET")
    ax.plot([clip(eer)], [clip(eer)], "o", color="C3", label=f"EER {100 * eer:.2f} %")
    ax.plot(clip(np.array([lo, 1 - lo])), clip(np.array([lo, 1 - lo])), ":", color="0.6", lw=0.8)
    ticks = [t for t in _DET_TICKS if t >= lo]
    labels_txt = [f"{100 * t:g}" for t in ticks]
    for set_ticks, set_labels in ((ax.set_xticks, ax.set_xticklabels), (ax.set_yticks, ax.set_yticklabels)):
        set_ticks(norm.ppf(ticks))
        set_labels(labels_txt)
    limit = norm.ppf([ticks[0], ticks[-1]])
    ax.set_xlim(*limit)
    ax.set_ylim(*limit)
    ax.set_xlabel("false-alarm rate (%)")
    ax.set_ylabel("miss rate (%)")
    ax.grid(True, lw=0.4)
    ax.legend(loc="upper right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_score_histogram(
    scores: np.ndarray, labels: np.ndarray, path: str | Path, threshold: float | None = None
) -> Path:
    """Target and non-target score densities on shared bins, with the decision threshold; writes a PNG."""
    scores, targets = check_trials(scores, labels)
    bins = np.histogram_bin_edges(scores, bins=min(100, max(10, int(math.sqrt(scores.size)))))
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.hist(scores[~targets], bins=bins, density=True, alpha=0.6, label=f"non-target ({int((~targets).sum())})")
    ax.hist(scores[targets], bins=bins, density=True, alpha=0.6, label=f"target ({int(targets.sum())})")
    if threshold is not None:
        ax.axvline(float(threshold), color="k", ls="--", lw=1, label=f"threshold {float(threshold):.3f}")
    ax.set_xlabel("score")
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_rounds(stages: list[dict[str, Any]], path: str | Path) -> Path:
    """EER (%) and, where given, NMI per stage/round; ``eer`` is a fraction. Writes a PNG."""
    if not stages:
        raise ValueError("plot_rounds needs at least one stage")
    names, eers, nmis = [], [], []
    for i, st in enumerate(stages):
        if "name" not in st or "eer" not in st:
            raise ValueError(f"stage {i} ({st!r}) needs 'name' and 'eer'")
        names.append(str(st["name"]))
        eers.append(100.0 * float(st["eer"]))
        nmi = st.get("nmi")
        nmis.append(float("nan") if nmi is None else float(nmi))
    x = np.arange(len(stages))
    has_nmi = not all(math.isnan(v) for v in nmis)
    fig = Figure(figsize=(max(5.0, 1.1 * len(stages)), 6 if has_nmi else 3.5))
    axes = fig.subplots(2 if has_nmi else 1, 1, sharex=True, squeeze=False)[:, 0]
    axes[0].plot(x, eers, "o-", color="C0")
    for xi, v in zip(x, eers):
        axes[0].annotate(f"{v:.2f}", (xi, v), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=8)
    axes[0].set_ylabel("EER (%)")
    axes[0].margins(x=0.08, y=0.2)
    axes[0].grid(True, lw=0.4)
    if has_nmi:
        nmi_arr = np.array(nmis)
        ok = ~np.isnan(nmi_arr)
        axes[1].plot(x[ok], nmi_arr[ok], "s-", color="C2")
        axes[1].set_ylabel("NMI")
        axes[1].grid(True, lw=0.4)
    axes[-1].set_xticks(x)
    axes[-1].set_xticklabels(names, rotation=30, ha="right")
    fig.tight_layout()
    return _save(fig, path)
