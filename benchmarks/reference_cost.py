"""GPU-hours of the reference run (configs/voxceleb2.yaml), from model FLOPs counted on this machine.

Counts, with ``torch.utils.flop_counter`` on the full-size models (random weights, CPU), the
FLOPs of one training utterance of each stage — DINO (ECAPA-TDNN 1024/3072 + the 65,536-
prototype head: teacher on the 2 global crops, student forward and backward on all 6), a
round's fine-tune (WavLM Base+ + MHFA, 3 s crop, forward and backward through the transformer,
plus the clean crop's forward when label correction is on), the large-margin stage (6 s), and
one embedding (an average VoxCeleb2 file of 7.8 s; an evaluation file: 15 crops of 4 s plus the
whole 8.2 s file) — then multiplies by the recipe's epochs and utterance counts and divides by
an assumed sustained rate (``--peak`` × ``--mfu``; replace them by ``gpu_check.py``'s measured
throughput once a GPU has run it). Prints the arithmetic of every line; the last line is the
total in GPU-hours.

    python benchmarks/reference_cost.py [--peak 312e12] [--mfu 0.35]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOX2_UTTERANCES = 1_092_009
VOX2_MEAN_SECONDS = 7.8  # VoxCeleb2 dev: 2,442 h over 1,092,009 files (capped at extract.max_seconds 20)
VOX1_FILES = 153_516  # VoxCeleb1, every file of the E list (O and H are subsets)
VOX1_MEAN_SECONDS = 8.2
SAMPLE_RATE = 16000


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def dino_flops() -> int:
    """One utterance of a DINO step: teacher forward on 2 × 4 s, student forward + backward on 2 × 4 s + 4 × 2 s."""
    from raysv.methods.dino import EncoderWithHead
    from raysv.models.ecapa import ECAPAEncoder
    from raysv.models.heads import DINOHead

    student = EncoderWithHead(ECAPAEncoder(1024, 3072, 512), DINOHead(512, 2048, 256, 65536))
    teacher = EncoderWithHead(ECAPAEncoder(1024, 3072, 512), DINOHead(512, 2048, 256, 65536)).eval()
    globals_ = torch.randn(2, 2, 4 * SAMPLE_RATE)  # two utterances (BatchNorm needs more than one)
    locals_ = torch.randn(2, 4, 2 * SAMPLE_RATE)

    def step() -> None:
        with torch.no_grad():
            teacher([globals_])
        out, _ = student([globals_, locals_])
        outs = out if isinstance(out, (list, tuple)) else [out]
        sum(o.float().sum() for o in outs).backward()

    return _flops(step) // 2


def wavlm_flops(seconds: float, train: bool, clean_crop: bool = False) -> int:
    """One utterance through WavLM Base+ + MHFA: forward, and with ``train`` the backward of what trains."""
    from transformers import WavLMModel

    from raysv.models.heads import AAMSoftmax
    from raysv.models.round_model import freeze_wavlm
    from raysv.models.wavlm_mhfa import WavLMMHFA, reference_wavlm_base_plus_config

    config = reference_wavlm_base_plus_config()
    config._attn_implementation = "eager"
    encoder = WavLMMHFA(WavLMModel(config), heads=64, compression=128, embed_dim=256)
    freeze_wavlm(encoder.backbone, "layers")
    classifier = AAMSoftmax(256, 7500)
    wave = torch.randn(1, int(seconds * SAMPLE_RATE))

    def step() -> None:
        if not train:
            with torch.no_grad():
                encoder.eval()(wave)
            return
        encoder.train()
        losses, _ = classifier(encoder(wave), torch.zeros(1, dtype=torch.long))
        losses.mean().backward()
        if clean_crop:
            with torch.no_grad():
                classifier(encoder(wave), torch.zeros(1, dtype=torch.long))

    return _flops(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak", type=float, default=312e12, help="GPU peak FLOP/s (A100 bf16 dense: 312e12)")
    parser.add_argument("--mfu", type=float, default=0.35, help="assumed sustained fraction of the peak")
    parser.add_argument("--kmeans-flops", type=float, default=19.5e12 * 0.6,
                        help="sustained FP32 FLOP/s of faiss-gpu k-means (A100: 19.5e12 peak, 60 %%)")
    args = parser.parse_args()

    from raysv.run_config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "voxceleb2.yaml")
    rate = args.peak * args.mfu
    rounds = cfg.rounds.count
    gated_from = cfg.finetune.label_correction.start_epoch
    ft, ft_lc = wavlm_flops(cfg.finetune.crop_seconds, True), wavlm_flops(cfg.finetune.crop_seconds, True, True)
    per = {
        "dino": dino_flops(),
        "finetune": ft,
        "finetune_lc": ft_lc,
        "lmft": wavlm_flops(cfg.lmft.crop_seconds, True),
        "embed": wavlm_flops(VOX2_MEAN_SECONDS, False),
        "eval": 15 * wavlm_flops(4.0, False) + wavlm_flops(VOX1_MEAN_SECONDS, False),
    }
    for name, f in per.items():
        print(f"FLOPs per utterance, {name:<12}{f / 1e9:>10.1f} GFLOP")
    n = VOX2_UTTERANCES
    ft_epochs = cfg.finetune.epochs
    lines = [
        ("DINO", f"{cfg.dino.epochs} epochs x {n:,} x {per['dino'] / 1e9:.1f} GFLOP", cfg.dino.epochs * n * per["dino"]),
        ("fine-tune rounds", f"{rounds} rounds x ({gated_from} x {per['finetune'] / 1e9:.1f} + "
         f"{ft_epochs - gated_from} x {per['finetune_lc'] / 1e9:.1f}) GFLOP x {n:,}",
         rounds * n * (gated_from * per["finetune"] + (ft_epochs - gated_from) * per["finetune_lc"])),
        ("large margin", f"{cfg.lmft.epochs} epochs x {n:,} x {per['lmft'] / 1e9:.1f} GFLOP",
         cfg.lmft.epochs * n * per["lmft"]),
        ("extraction", f"{rounds} x {n:,} files x {per['embed'] / 1e9:.1f} GFLOP (the DINO round's ECAPA: less)",
         rounds * n * per["embed"]),
        ("evaluation", f"{rounds + 1} models x {VOX1_FILES:,} files x {per['eval'] / 1e9:.1f} GFLOP",
         (rounds + 1) * VOX1_FILES * per["eval"]),
    ]
    print(f"\nat {args.peak / 1e12:.0f} TFLOP/s x {args.mfu:.0%} = {rate / 1e12:.0f} TFLOP/s sustained per GPU:")
    total = 0.0
    for name, arithmetic, flops in lines:
        hours = flops / rate / 3600
        total += hours
        print(f"  {name:<17}{arithmetic} = {flops:.2e} FLOP -> {hours:,.1f} GPU-h")
    km = rounds * VOX2_UTTERANCES * cfg.cluster.k1 * 256 * 2 * cfg.cluster.niter
    km_hours = km / args.kmeans_flops / 3600
    total += km_hours
    print(f"  {'k-means':<17}{rounds} x {VOX2_UTTERANCES:,} x {cfg.cluster.k1:,} x 256 x 2 x {cfg.cluster.niter} iterations"
          f" = {km:.2e} FLOP at {args.kmeans_flops / 1e12:.1f} TFLOP/s -> {km_hours:.1f} GPU-h")
    print(f"reference run: {total:,.0f} GPU-hours ({total / 8:,.0f} h on 8 GPUs)")


if __name__ == "__main__":
    main()
