"""Embedding speed of a trained model: PyTorch against ONNX Runtime, 2 threads each, real-time factors.

For each model (default: the demo's last models) it exports ONNX, then embeds 1, 4 and 16
toy files per call with each runtime and prints the real-time factor (seconds of audio
per wall-clock second) and the ONNX/PyTorch ratio; the last line is that ratio at 16
files per call for the first model. It also times identification of one file against
100,000 enrolled speakers.

    python benchmarks/bench_inference.py --run runs/demo --audio runs/demo-data/test/wav
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "2")


def _files(audio: Path, count: int) -> list[Path]:
    files = sorted(audio.rglob("*.wav"))[:count]
    if len(files) < count:
        raise SystemExit(f"{audio} holds {len(files)} wav files; {count} are needed")
    return files


def _last_model(run: Path) -> str:
    """The model of the run's last self-supervised stage in its results.json (it follows rounds.count)."""
    from raysv.artifacts.layout import RunLayout
    from raysv.errors import InputError
    from raysv.evaluation.seeds import read_results, self_supervised

    try:
        stages = [s["name"] for s in read_results(RunLayout(run).results)["stages"] if self_supervised(s["name"])]
    except InputError as err:
        raise SystemExit(f"{err}; or name a model with --model") from None
    return str(run / stages[-1] / "model")


def _rtf(model, files: list[Path], per_call: int, repeats: int) -> float:
    import soundfile as sf

    seconds = sum(sf.info(str(f)).duration for f in files)
    model.extract_embedding_list(files[:per_call])  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        for i in range(0, len(files), per_call):
            model.extract_embedding_list(files[i:i + per_call])
    return repeats * seconds / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="model folder (repeatable)")
    parser.add_argument("--run", default="runs/demo",
                        help="without --model: this run's last self-supervised stage (from its results.json)")
    parser.add_argument("--audio", default="runs/demo-data/test/wav")
    parser.add_argument("--files", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from raysv.export import export_onnx
    from raysv.inference import load_model
    from raysv.speakers import SpeakerDB

    torch.set_num_threads(args.threads)
    models = args.model or [_last_model(Path(args.run))]
    files = _files(Path(args.audio), args.files)
    first_ratio = None
    with tempfile.TemporaryDirectory() as tmp:
        for folder in models:
            onnx_path = export_onnx(folder, Path(tmp) / f"{Path(folder).parent.name}.onnx")
            torch_model = load_model(folder, device="cpu", threads=args.threads)
            onnx_model = load_model(onnx_path, runtime="onnx", threads=args.threads)
            print(f"{folder} ({torch_model.meta['encoder']['kind']}): real-time factor, {args.threads} threads")
            print(f"{'files/call':>10} {'pytorch':>9} {'onnx':>9} {'ratio':>6}")
            for per_call in (1, 4, 16):
                pt = _rtf(torch_model, files, per_call, args.repeats)
                ox = _rtf(onnx_model, files, per_call, args.repeats)
                print(f"{per_call:>10} {pt:9.1f} {ox:9.1f} {ox / pt:6.2f}")
                if per_call == 16 and first_ratio is None:
                    first_ratio = ox / pt
        # Identification against 100,000 enrolled speakers (random unit embeddings).
        model = load_model(models[0], device="cpu", threads=args.threads)
        rng = np.random.default_rng(0)
        db = SpeakerDB(Path(tmp) / "speakers.parquet", dim=model.embed_dim)
        for i in range(0, 100_000, 10_000):
            for j in range(i, i + 10_000):
                db.names.append(f"spk{j:06d}")
            db.sums = np.vstack([db.sums, rng.standard_normal((10_000, model.embed_dim)).astype(np.float32)])
            db.counts = np.concatenate([db.counts, np.ones(10_000, np.int64)])
        db.save()
        started = time.perf_counter()
        match = model.identify(db.path, files[0], top=5)
        seconds = time.perf_counter() - started
        print(f"identify one file against 100,000 speakers (load the database, embed, score): {seconds:.2f} s; "
              f"best {match[0].speaker} {match[0].score:.3f}")
    print(f"{first_ratio:.2f}")


if __name__ == "__main__":
    main()
