"""benchmarks/gpu_check.py stays working: its CPU smoke run, with Ray, MLflow and faiss unimportable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_smoke_needs_no_ray_mlflow_or_faiss():
    code = ("import runpy, sys\n"
            "for name in ('ray', 'mlflow', 'faiss', 'pyarrow', 'omegaconf'): sys.modules[name] = None\n"
            f"sys.argv = ['gpu_check.py', '--cpu-smoke']\n"
            f"runpy.run_path({str(ROOT / 'benchmarks' / 'gpu_check.py')!r}, run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    for start in ("DINO step", "fine-tune step", "extraction", "k-means"):
        assert any(line.startswith(start) and "utt/s" in line or line.startswith(start) and " s," in line
                   for line in lines), (start, lines)
    assert "(torch)" in done.stdout  # no faiss: the torch k-means
