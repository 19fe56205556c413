"""One script a GPU machine runs in minutes: the reference-scale steps' throughput and memory.

Prints, each with its ratio to the GPU's peak where one applies:

1. DINO step throughput: ECAPA-TDNN 1024/3072 with the 65,536-prototype head, 2 × 4 s
   global and 4 × 2 s local crops (utterances/s);
2. WavLM Base+ + MHFA fine-tune step throughput, bf16, 3 s crops, AAM-softmax over 7,500
   classes (utterances/s and model FLOPs utilisation);
3. embedding extraction throughput, whole 8 s utterances (utterances/s);
4. k-means of 1,092,009 × 256 into 50,000 centroids, 20 iterations (seconds): faiss-gpu
   when it imports, else a k-means in torch on the GPU (it says which);

and the peak GPU memory of each. It needs torch and transformers (and raysv's model code
from this checkout) — no Ray, MLflow or faiss. ``--cpu-smoke`` runs the same code on CPU at
reduced sizes, so the script stays working (``make test`` runs it).

    python benchmarks/gpu_check.py            # on a GPU machine
    python benchmarks/gpu_check.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # raysv from this checkout, installed or not

# Dense bf16 / tf32 tensor-core peaks (FLOP/s) of common GPUs, for the utilisation figures.
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12,
         "V100": 125e12, "T4": 65e12}


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAKS.items() if k in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_gb(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GB" if device.type == "cuda" else "n/a on CPU"


def _timed(step, warmup: int, steps: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - started) / steps


def dino_step(device: torch.device, smoke: bool) -> dict:
    from raysv.methods.dino import EncoderWithHead, dino_loss
    from raysv.models.ecapa import ECAPAEncoder
    from raysv.models.heads import DINOHead

    channels, mfa, out_dim, batch = (64, 192, 1024, 4) if smoke else (1024, 3072, 65536, 32)
    g, lo = (16000, 8000) if smoke else (64000, 32000)
    student = EncoderWithHead(ECAPAEncoder(channels, mfa, 512), DINOHead(512, 2048, 256, out_dim)).to(device)
    teacher = EncoderWithHead(ECAPAEncoder(channels, mfa, 512), DINOHead(512, 2048, 256, out_dim)).to(device)
    opt = torch.optim.SGD(student.parameters(), lr=0.2, momentum=0.9)
    center = torch.zeros(1, out_dim, device=device)
    globals_ = torch.randn(batch, 2, g, device=device)
    locals_ = torch.randn(batch, 4, lo, device=device)

    def step() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            with torch.no_grad():
                t_out, _ = teacher([globals_])
            s_out, _ = student([globals_, locals_])
        loss = dino_loss(s_out, t_out, center, 0.1, 0.04)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    _reset_memory(device)
    seconds = _timed(step, 1 if smoke else 3, 1 if smoke else 10, device)
    return {"utt_per_s": batch / seconds, "peak_gb": _peak_memory_gb(device), "batch": batch}


def finetune_step(device: torch.device, smoke: bool) -> dict:
    from transformers import WavLMModel

    from raysv.models.heads import AAMSoftmax
    from raysv.models.round_model import freeze_wavlm
    from raysv.models.wavlm_mhfa import WavLMMHFA, reference_wavlm_base_plus_config, tiny_wavlm_config

    config = tiny_wavlm_config() if smoke else reference_wavlm_base_plus_config()
    config._attn_implementation = "eager"  # WavLM has no SDPA attention in transformers
    encoder = WavLMMHFA(WavLMModel(config), heads=64, compression=128, embed_dim=256)
    freeze_wavlm(encoder.backbone, "layers")
    classes, batch, samples = (50, 4, 16000) if smoke else (7500, 64, 48000)
    classifier = AAMSoftmax(256, classes)
    encoder.to(device).train()
    classifier.to(device)
    params = [p for p in list(encoder.parameters()) + list(classifier.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.01)
    wave = torch.randn(batch, samples, device=device)
    labels = torch.randint(0, classes, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            losses, _ = classifier(encoder(wave), labels)
        loss = losses.float().mean()
        opt.zero_grad(set_to_none=True)
        (loss / loss.detach()).backward()
        opt.step()

    _reset_memory(device)
    seconds = _timed(step, 1 if smoke else 3, 1 if smoke else 10, device)
    # Model FLOPs: 6 × trainable-and-frozen parameters touched per frame of the transformer (forward
    # 2, backward 4), 50 frames a second; the CNN's forward on the samples is left out (no backward).
    transformer = sum(p.numel() for p in encoder.backbone.encoder.parameters())
    frames = batch * samples / 320
    flops = 6 * transformer * frames
    peak = _peak_flops(device)
    return {"utt_per_s": batch / seconds, "mfu": flops / seconds / peak if peak else None,
            "peak_gb": _peak_memory_gb(device), "batch": batch, "seconds": samples / 16000}


def extraction(device: torch.device, smoke: bool) -> dict:
    from transformers import WavLMModel

    from raysv.models.wavlm_mhfa import WavLMMHFA, reference_wavlm_base_plus_config, tiny_wavlm_config

    config = tiny_wavlm_config() if smoke else reference_wavlm_base_plus_config()
    config._attn_implementation = "eager"  # WavLM has no SDPA attention in transformers
    encoder = WavLMMHFA(WavLMModel(config), heads=64, compression=128, embed_dim=256).to(device).eval()
    batch, samples = (2, 16000) if smoke else (64, 128000)
    wave = torch.randn(batch, samples, device=device)

    def step() -> None:
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            encoder(wave)

    _reset_memory(device)
    seconds = _timed(step, 1 if smoke else 2, 1 if smoke else 5, device)
    return {"utt_per_s": batch / seconds, "peak_gb": _peak_memory_gb(device), "seconds_each": samples / 16000}


def kmeans(device: torch.device, smoke: bool) -> dict:
    n, d, k, niter = (20000, 64, 200, 3) if smoke else (1_092_009, 256, 50_000, 20)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(n, d, generator=gen)
    _reset_memory(device)
    try:
        import faiss  # noqa: F401

        if device.type == "cuda" and faiss.get_num_gpus() > 0:
            started = time.perf_counter()
            km = faiss.Kmeans(d, k, niter=niter, gpu=True, seed=0, max_points_per_centroid=n // k + 1)
            km.train(x.numpy())
            return {"seconds": time.perf_counter() - started, "with": "faiss-gpu", "peak_gb": "n/a (faiss)"}
    except ImportError:
        pass
    xd = x.to(device)
    started = time.perf_counter()
    centroids = xd[torch.randperm(n, generator=gen)[:k].to(device)].clone()
    chunk = 4096 if smoke else 8192  # rows per distance block: 8192 × 50,000 floats = 1.6 GB
    for _ in range(niter):
        sums = torch.zeros(k, d, device=device)
        counts = torch.zeros(k, device=device)
        c_norm = (centroids * centroids).sum(1)
        for start in range(0, n, chunk):
            block = xd[start:start + chunk]
            assign = (c_norm[None, :] - 2 * block @ centroids.T).argmin(1)  # ‖x − c‖² minus the constant ‖x‖²
            sums.index_add_(0, assign, block)
            counts.index_add_(0, assign, torch.ones_like(assign, dtype=torch.float32))
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)
    _sync(device)
    return {"seconds": time.perf_counter() - started, "with": "torch", "peak_gb": _peak_memory_gb(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="the same code on CPU at reduced sizes")
    args = parser.parse_args()
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: no CUDA device; run with --cpu-smoke to check the script on CPU")
    device = torch.device("cpu" if smoke else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name(device)}, peak {(_peak_flops(device) or math.nan) / 1e12:.0f} "
              f"TFLOP/s (bf16 dense), torch {torch.__version__}")
    else:
        torch.set_num_threads(2)
        print(f"device: CPU smoke test (reduced sizes), torch {torch.__version__}")
    started = time.perf_counter()
    d = dino_step(device, smoke)
    print(f"DINO step (ECAPA {'64' if smoke else '1024'}, 2 global + 4 local crops, batch {d['batch']}): "
          f"{d['utt_per_s']:.1f} utt/s, peak {d['peak_gb']}")
    f = finetune_step(device, smoke)
    mfu = f"{100 * f['mfu']:.1f} % MFU" if f["mfu"] is not None else "MFU n/a"
    print(f"fine-tune step ({'tiny WavLM' if smoke else 'WavLM Base+'} + MHFA, bf16, {f['seconds']:.0f} s crops, "
          f"batch {f['batch']}): {f['utt_per_s']:.1f} utt/s, {mfu}, peak {f['peak_gb']}")
    e = extraction(device, smoke)
    print(f"extraction ({e['seconds_each']:.0f} s utterances): {e['utt_per_s']:.1f} utt/s, peak {e['peak_gb']}")
    k = kmeans(device, smoke)
    print(f"k-means {'20,000 × 64 → 200, 3' if smoke else '1,092,009 × 256 → 50,000, 20'} iterations "
          f"({k['with']}): {k['seconds']:.1f} s, peak {k['peak_gb']}")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
