"""The run directory, as one object: every path a run writes or reads is asked of :class:`RunLayout`.

::

    <runs>/<name>/
      config.json  state.json  results.json  rounds.png  run.log  run.lock
      round_<r>/<stage>/…            one folder per stage, _complete.json written last
        …/model/{model.pt, model.json, training.pt}     training stages
        …/embeddings.parquet, extract.json              round_<r>/extract
        …/labels.parquet, clusters.json                 round_<r>/cluster
      pretrained/tiny_wavlm/          a tiny WavLM built for tests and the demo
      sweeps/<name>/                  Ray Tune sweeps over a round
      ray/                            Ray Train storage unless ray.storage says otherwise
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MARKER = "_complete.json"


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @classmethod
    def of(cls, runs: str | Path, name: str) -> "RunLayout":
        return cls(Path(runs) / name)

    # -- run-level files
    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def rounds_plot(self) -> Path:
        return self.root / "rounds.png"

    @property
    def log(self) -> Path:
        return self.root / "run.log"

    @property
    def lock(self) -> Path:
        return self.root / "run.lock"

    @property
    def ray_storage(self) -> Path:
        return self.root / "ray"

    @property
    def tiny_wavlm(self) -> Path:
        return self.root / "pretrained" / "tiny_wavlm"

    def sweep(self, name: str) -> Path:
        return self.root / "sweeps" / name

    # -- stages (``stage`` is an id such as ``round_1/finetune``)
    def stage(self, stage: str) -> Path:
        return self.root / stage

    def marker(self, stage: str) -> Path:
        return self.stage(stage) / MARKER

    def model(self, stage: str) -> Path:
        """The model folder of a training stage."""
        return self.stage(stage) / "model"

    def embeddings(self, round_index: int) -> Path:
        return self.stage(f"round_{round_index}/extract") / "embeddings.parquet"

    def labels(self, round_index: int) -> Path:
        """The pseudo-labels made from round ``round_index``'s model (used by round ``round_index + 1``)."""
        return self.stage(f"round_{round_index}/cluster") / "labels.parquet"

    def cohort(self, stage: str) -> Path:
        """Where an evaluation stage keeps the training embeddings it AS-normalises against."""
        return self.stage(stage) / "cohort"
