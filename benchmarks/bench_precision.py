"""Training steps in fp32 against bf16 autocast on this CPU (``ray.precision``), the demo's models.

Times the DINO step (ECAPA student and teacher, two 2 s views per utterance) and the
fine-tune step (ECAPA + AAM-softmax, one 2 s crop) of ``configs/demo.yaml`` at its batch
sizes, the two precisions interleaved in one process with the demo's 2 torch threads.
bf16 pays only on CPUs with bf16 instructions (AVX512-BF16, AMX); the last line is the
DINO step's fp32/bf16 ratio.

    python benchmarks/bench_precision.py
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from raysv.artifacts.labels import write_labels
from raysv.methods.dino import DinoMethod
from raysv.methods.supervised import SupervisedMethod
from raysv.run_config import load_config
from raysv.runtime import cpu_has_bf16

SAMPLES = 32000  # the demo's 2 s crops


def _timed(method, batch: dict, steps: int) -> float:
    method.train_step(batch)  # warm-up: oneDNN picks its kernels on the first call
    started = time.perf_counter()
    for _ in range(steps):
        method.train_step(batch)
    return (time.perf_counter() - started) / steps


def _methods(config: str, labels_dir: str, bf16: bool) -> tuple[DinoMethod, SupervisedMethod]:
    cfg = load_config(config, ["finetune.model.ecapa_init=scratch"])
    dino = DinoMethod(cfg.dino, seed=0, steps_per_epoch=80)
    tune = SupervisedMethod(cfg.finetune, seed=0, steps_per_epoch=40, labels=labels_dir)
    for method in (dino, tune):
        method.bf16 = bf16
        method.setup(torch.device("cpu"), lambda m: m)
        method.start_epoch(0)
    return dino, tune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    rng = np.random.default_rng(0)
    n = 4 * max(cfg.dino.batch_size, cfg.finetune.batch_size)
    dino_batch = {"global": torch.randn(cfg.dino.batch_size, cfg.dino.crops.global_count, SAMPLES) * 0.1,
                  "utt_index": torch.arange(cfg.dino.batch_size)}
    tune_batch = {"wave": torch.randn(cfg.finetune.batch_size, SAMPLES) * 0.1,
                  "utt_index": torch.arange(cfg.finetune.batch_size)}
    with tempfile.TemporaryDirectory() as labels_dir:
        write_labels(labels_dir, np.arange(n), rng.integers(0, 120, n).astype(np.int32))
        times: dict[str, dict[str, list[float]]] = {"dino": {"fp32": [], "bf16": []}, "finetune": {"fp32": [], "bf16": []}}
        for _ in range(args.repeats):
            for name, bf16 in (("fp32", False), ("bf16", True)):
                dino, tune = _methods(args.config, labels_dir, bf16)
                times["dino"][name].append(_timed(dino, dino_batch, args.steps))
                times["finetune"][name].append(_timed(tune, tune_batch, args.steps))
    print(f"CPU with bf16 instructions: {cpu_has_bf16()}; {args.threads} threads")
    for stage, by in times.items():
        fp32, bf16 = min(by["fp32"]), min(by["bf16"])
        print(f"{stage:9s} step: fp32 {fp32:.3f} s, bf16 {bf16:.3f} s, {fp32 / bf16:.2f} x")
    print(f"{min(times['dino']['fp32']) / min(times['dino']['bf16']):.2f}")


if __name__ == "__main__":
    main()
