"""Ray Tune sweeps over one round's clustering and fine-tuning, scored by dev-trial EER.

A sweep YAML names a run config whose run directory already holds
``round_{r-1}/extract`` (``raysv run --until round_{r-1}/extract``). Each Tune trial
is a plain function (Ray 2.60's Train-in-Tune pattern): it applies its sampled
settings to round r's config, clusters the round's embeddings into its own folder,
then fits the round model with a ``TorchTrainer`` whose ``TuneReportCallback``
passes rank 0's per-epoch ``dev_eer`` to Tune, so ASHA can stop poor trials early.
The best trial's settings are written as per-round overrides for
``raysv run --merge best.yaml``; they leave completed stages untouched.

Modules: ``spec`` (the sweep YAML and its checks), ``trial`` (what one trial runs),
``driver`` (the Tuner, the trials' table, the best settings).
"""

from raysv.sweep.driver import run_sweep
from raysv.sweep.spec import SweepSpec, load_sweep

__all__ = ["SweepSpec", "load_sweep", "run_sweep"]
