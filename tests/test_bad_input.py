"""Bad input at the command line: one line naming the input and the problem, exit code 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from conftest import save_tiny_ecapa


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small model, four good files, and one file of each kind of bad audio."""
    root = tmp_path_factory.mktemp("bad_input")
    model = save_tiny_ecapa(root / "model", threshold=0.5)
    rng = np.random.default_rng(0)
    wav = root / "wav"
    wav.mkdir()
    for i in range(4):
        sf.write(wav / f"good{i}.wav", (0.1 * rng.standard_normal(16000)).astype(np.float32), 16000)
    (wav / "empty.wav").write_bytes(b"")
    nan = np.full(16000, np.nan, np.float32)
    sf.write(wav / "nan.wav", nan, 16000, subtype="FLOAT")  # a valid header: found only when decoded
    sf.write(wav / "short.wav", np.zeros(80, np.float32), 16000)
    return model, wav


def raysv(*args: str, ray_address: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_ADDRESS=ray_address) if ray_address else None  # the session's cluster, not a new one
    return subprocess.run([sys.executable, "-m", "raysv.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def assert_one_line_error(done: subprocess.CompletedProcess, *named: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr and "UDF failed" not in done.stderr, done.stderr
    assert len(lines) == 1, done.stderr
    for text in named:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def evaluate_list(files, tmp_path, ray_session, lines: str) -> subprocess.CompletedProcess:
    """``raysv evaluate --checkpoint`` of the small model on a trial list of ``lines``, on the session's cluster."""
    model, wav = files
    trials = tmp_path / "trials.txt"
    trials.write_text(lines)
    return raysv("evaluate", "--checkpoint", model, "--trials", trials, "--audio-root", wav,
                 ray_address=ray_session.get_runtime_context().gcs_address)


def test_malformed_trial_line_names_file_and_line(files, tmp_path):
    _, wav = files
    trials = tmp_path / "trials.txt"
    trials.write_text("1 good0.wav good1.wav\n0 good0.wav\n")
    done = raysv("evaluate", "--embedder", "fbank-mean", "--trials", trials, "--audio-root", wav)
    assert_one_line_error(done, f"{trials}:2:", "expected 'label enroll test'")
    trials.write_text("1 good0.wav good1.wav\nyes good0.wav good2.wav\n")
    assert_one_line_error(raysv("evaluate", "--embedder", "fbank-mean", "--trials", trials, "--audio-root", wav),
                          f"{trials}:2:", "'yes good0.wav good2.wav'")


def test_evaluate_names_all_unusable_files_before_embedding(ray_session, files, tmp_path):
    done = evaluate_list(files, tmp_path, ray_session,
                         "1 good0.wav empty.wav\n0 good1.wav short.wav\n1 good2.wav missing.wav\n0 good0.wav good3.wav\n")
    line = assert_one_line_error(done,
                                 "3 of 7 files", "empty.wav", "short.wav", "missing.wav", "--skip-bad")
    assert "good" not in line


def test_nan_audio_met_while_embedding_names_the_file_not_ray(ray_session, files, tmp_path):
    """NaN samples pass the header check; the embedding actor's failure reaches the user as one line."""
    done = evaluate_list(files, tmp_path, ray_session, "1 good0.wav nan.wav\n0 good1.wav good2.wav\n")
    assert_one_line_error(done, "nan.wav", "NaN")


@pytest.mark.parametrize("bad, reason", [("empty.wav", "empty"), ("nan.wav", "NaN")])
def test_verify_names_the_bad_file(files, bad, reason):
    model, wav = files
    assert_one_line_error(raysv("verify", "--checkpoint", model, wav / "good0.wav", wav / bad), bad, reason)


def test_embed_names_every_bad_file_and_writes_nothing(files, tmp_path):
    model, wav = files
    out = tmp_path / "e.npy"
    done = raysv("embed", "--checkpoint", model, wav / "good0.wav", wav / "short.wav", wav / "missing.wav",
                 "--out", out, "--format", "npy")
    assert_one_line_error(done, "2 of 3 files", "short.wav", "shorter than 0.1 s", "missing.wav", "no such file")
    assert not out.exists()


def test_enroll_names_the_bad_file_and_leaves_no_database(files, tmp_path):
    model, wav = files
    db = tmp_path / "db.parquet"
    done = raysv("enroll", "--checkpoint", model, "--db", db, "alice", wav / "good0.wav", wav / "nan.wav")
    assert_one_line_error(done, "nan.wav", "NaN")
    assert not db.exists(), "a failed enrolment must not leave a half-written database"


def test_verbose_flag_shows_the_traceback(files, tmp_path):
    model, wav = files
    done = raysv("-v", "verify", "--checkpoint", model, wav / "good0.wav", wav / "empty.wav")
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_run_names_a_missing_trial_list_before_training(toy, tmp_path):
    """The evaluation stages' inputs are checked before the first stage trains, not after it."""
    from conftest import tiny_overrides

    missing = tmp_path / "vox1" / "list_test_all2.txt"
    done = raysv("run", "--config", "configs/demo.yaml", *tiny_overrides(toy, tmp_path / "runs"),
                 f"data.trials.E={{path: {missing}, audio_root: {toy.test / 'wav'}}}")
    assert_one_line_error(done, str(missing))
    assert not list((tmp_path / "runs").rglob("model.json")), "a stage ran before the trial lists were checked"
