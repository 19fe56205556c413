"""Iterative LDA of the pseudo-labels: cluster, find the directions that separate the clusters, cluster there again.

A self-supervised embedding mixes the speaker with what varies between one speaker's
recordings (channel, room, words). Linear discriminant analysis fitted on the current
clusters keeps the directions along which the clusters differ more than their members
do, with the within-cluster spread whitened; clustering again in that space, and fitting
again on the new clusters, lets the speaker's share of the noisy labels pull the rest
along. Clustering, training a back-end on the clusters and clustering again is how
speaker-recognition back-ends were adapted to unlabelled domains (Shum et al., Odyssey
2014). Cheap beside k-means: two scatter matrices of the embedding's size per pass.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from raysv.config import ConfigError, check_positive
from raysv.errors import InputError


@dataclass
class LdaConfig:
    """``cluster.lda``: after the first clustering, this many passes of LDA on the labels and clustering again (0: off)."""

    iterations: int = 0
    dim: int = 64  # at most; the number of clusters minus one and the embedding's size bound it too
    # of the within-cluster covariance towards a scaled identity: a few utterances per cluster do not
    # estimate a full covariance
    shrinkage: float = 0.1

    def validate(self, prefix: str = "cluster.lda") -> None:
        if not isinstance(self.iterations, int) or isinstance(self.iterations, bool) or self.iterations < 0:
            raise ConfigError(f"{prefix}.iterations: a whole number >= 0 (0: off), got {self.iterations!r}")
        check_positive(f"{prefix}.dim", self.dim)
        if not 0.0 <= self.shrinkage <= 1.0:
            raise ConfigError(f"{prefix}.shrinkage: a fraction in [0, 1], got {self.shrinkage!r}")


def lda_space(x: np.ndarray, labels: np.ndarray, dim: int, shrinkage: float) -> np.ndarray:
    """Every row of ``x`` projected on the LDA directions of ``labels`` (rows labelled -1 are not fitted on)."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    fitted = labels >= 0
    classes = len(np.unique(labels[fitted]))
    if classes < 2:
        raise InputError(f"cluster.lda: {classes} cluster(s) to fit LDA on; it needs 2 or more (set cluster.lda.iterations: 0)")
    components = min(int(dim), classes - 1, x.shape[1])
    lda = LinearDiscriminantAnalysis(n_components=components, solver="eigen", shrinkage=float(shrinkage))
    with warnings.catch_warnings():  # a cluster of one utterance adds no spread: nothing to warn about
        warnings.filterwarnings("ignore", message="Only one sample available")
        lda.fit(x[fitted], labels[fitted])
    return lda.transform(x).astype(np.float32)


def refine_labels(
    x: np.ndarray, labels: np.ndarray, cfg: LdaConfig, regroup: Callable[[np.ndarray], np.ndarray]
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``cfg.iterations`` passes of: LDA of ``x`` on the labels, ``regroup`` of the projected rows into new labels.

    Every row is labelled here: ``keep`` and ``min_cluster_size`` drop rows only after the passes.

    Returns the last labels, the space they were made in, and for ``clusters.json`` the LDA's size
    and, pass by pass, the NMI of the new labels against the ones before (near 1: settled).
    """
    from sklearn.metrics import normalized_mutual_info_score

    space = x
    agreement = []
    for _ in range(cfg.iterations):
        space = lda_space(x, labels, cfg.dim, cfg.shrinkage)
        new = regroup(space)
        agreement.append(round(float(normalized_mutual_info_score(labels, new)), 4))
        labels = new
    return labels, space, {"lda_iterations": int(cfg.iterations), "lda_dim": int(space.shape[1]),
                           "lda_previous_nmi": agreement}
