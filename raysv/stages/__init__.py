"""One module per stage kind; ``KINDS`` is the registry the pipeline dispatches on.

The functions behind each kind (``train_dino``, ``finetune``, ``extract``, ``cluster``,
``evaluate_checkpoint``) are also what the CLI's single-stage commands call.
"""

from __future__ import annotations

from raysv.stages.base import Stage, StageContext, StageKind, StageResult
from raysv.stages.cluster import ClusterStage
from raysv.stages.dino import DinoStage
from raysv.stages.evaluate import EvalStage
from raysv.stages.extract import ExtractStage
from raysv.stages.finetune import FinetuneStage, LmftStage, SupervisedLmftStage, SupervisedStage
from raysv.stages.simclr import SimclrStage

KINDS: dict[str, StageKind] = {
    kind.name: kind
    for kind in (DinoStage(), SimclrStage(), FinetuneStage(), LmftStage(), SupervisedStage(), SupervisedLmftStage(),
                 ExtractStage(), ClusterStage(), EvalStage())
}

__all__ = ["KINDS", "Stage", "StageContext", "StageKind", "StageResult"]
