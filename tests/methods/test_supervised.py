"""Supervised fine-tuning with noisy labels: the loss gate and label correction act on real training losses.

A small waveform classification problem (eight harmonic "voices", each utterance with its
own pitch jitter, vibrato, level and noise) is trained in-process with ``run_epochs`` through
``SupervisedMethod``: only ``build_encoder`` is replaced by a small log-mel → linear encoder,
so the AAM head, the optimiser, the GMM gate, the correction and the label table are the
method's own. Thirty per cent of the labels are flipped to another class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from raysv.artifacts.labels import read_labels, write_labels
from raysv.audio.features import Fbank
from raysv.methods.supervised import FinetuneConfig, SupervisedMethod, correct_labels, gmm_crossing
from raysv.models.round_model import backbone_parameters
from raysv.train.loop import run_epochs

SR = 16000
CLASSES = 8
PER_CLASS = 24
SECONDS = 0.75
CROP = 8000  # 0.5 s training crops
N_MELS = 40
BATCH = 16
FLIP = 0.3
GATE_EPOCH = 4
CORRECT_EPOCH = 6
EPOCHS = 7


def voices(classes: int, per_class: int, seconds: float, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Harmonic voices: a pitch, spectral tilt and formant per class; jitter, vibrato, level and noise per utterance."""
    rng = np.random.default_rng(seed)
    f0s = 110.0 * 2.0 ** (np.arange(classes) * 0.4)
    rng.shuffle(f0s)
    formants = rng.uniform(500, 3000, classes)
    tilts = rng.uniform(-12, -3, classes)
    t = np.arange(int(seconds * SR)) / SR
    waves, labels = [], []
    for c in range(classes):
        for _ in range(per_class):
            f0 = f0s[c] * (1 + 0.01 * rng.standard_normal())
            k = np.arange(1, int(5000 / f0) + 1)
            formant = formants[c] * (1 + 0.01 * rng.standard_normal())
            gain_db = tilts[c] * np.log2(k) + 12 * np.exp(-0.5 * ((k * f0 - formant) / 300) ** 2)
            vibrato = 1 + 0.01 * np.sin(2 * np.pi * rng.uniform(3, 6) * t + rng.uniform(0, 2 * np.pi))
            phase = 2 * np.pi * np.cumsum(f0 * vibrato) / SR
            phases = rng.uniform(0, 2 * np.pi, (len(k), 1))
            w = (10 ** (gain_db / 20)[:, None] * np.sin(k[:, None] * phase + phases)).sum(0)
            w = w / np.abs(w).max() * rng.uniform(0.2, 0.8)
            w = w + rng.standard_normal(len(t)) * w.std() * 10 ** (-rng.uniform(20, 30) / 20)
            waves.append(w.astype(np.float32))
            labels.append(c)
    return waves, np.asarray(labels)


def utterance_stats(fbank: Fbank, wave: torch.Tensor) -> torch.Tensor:
    feats = fbank(wave)
    return torch.cat([feats.mean(dim=-1), feats.std(dim=-1)], dim=-1)


class ToyEncoder(nn.Module):
    """Fixed log-mel front-end → utterance mean and std, standardised → linear ``backbone`` → projection."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, embed_dim: int = 32):
        super().__init__()
        self.embed_dim = embed_dim
        self.fbank = Fbank(n_mels=N_MELS)
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        self.backbone = nn.Linear(2 * N_MELS, 32)
        self.proj = nn.Linear(32, embed_dim)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = (utterance_stats(self.fbank, wave) - self.mean) / self.std
        return self.proj(self.backbone(x))

    def spec(self) -> dict:
        return {"kind": "toy", "n_mels": N_MELS, "embed_dim": self.embed_dim}


class ToyMethod(SupervisedMethod):
    def __init__(self, cfg: FinetuneConfig, labels: Path, stats: tuple[torch.Tensor, torch.Tensor]):
        super().__init__(cfg, seed=0, steps_per_epoch=PER_CLASS * CLASSES // BATCH, labels=str(labels))
        self.stats = stats

    def build_encoder(self) -> nn.Module:
        return ToyEncoder(*self.stats)


def toy_config() -> FinetuneConfig:
    f = FinetuneConfig()
    f.epochs = EPOCHS
    f.l2sp = 0.0
    f.lr.backbone = f.lr.head = 1e-3
    f.lr.decay = 1.0
    f.loss.scale = 10.0
    f.loss_gate.start_epoch = GATE_EPOCH
    f.label_correction.start_epoch = CORRECT_EPOCH
    # The gate on last epoch's linear losses, corrections kept in the label table, a plain loss:
    # the alternatives to the reference's rules, whose own tests are in test_noisy_labels.py.
    f.loss_gate.space, f.loss_gate.compare = "linear", "previous"
    f.label_correction.logits, f.label_correction.persist = "cosine", True
    f.objective, f.clip_grad, f.lr.weight_decay = "plain", 5.0, 1e-4
    return f


class Corpus:
    def __init__(self, seed: int = 0):
        self.waves, self.true = voices(CLASSES, PER_CLASS, SECONDS, seed)
        self.n = len(self.true)
        self.fixed = torch.from_numpy(np.stack([w[:CROP] for w in self.waves]))
        stats = utterance_stats(Fbank(n_mels=N_MELS), self.fixed)
        self.stats = (stats.mean(dim=0), stats.std(dim=0))

    def batches(self, labels: np.ndarray):
        """Per epoch: a seeded shuffle, random 0.5 s crops, and a noisy ``wave`` beside its ``clean`` crop."""

        def make(epoch: int):
            rng = np.random.default_rng(1000 + epoch)
            order = rng.permutation(self.n)
            for start in range(0, self.n - BATCH + 1, BATCH):
                idx = order[start:start + BATCH]
                offsets = rng.integers(0, len(self.waves[0]) - CROP + 1, size=len(idx))
                clean = torch.from_numpy(np.stack([self.waves[i][o:o + CROP] for i, o in zip(idx, offsets)]))
                noise = torch.from_numpy(rng.standard_normal(clean.shape).astype(np.float32))
                yield {
                    "wave": clean + 0.05 * clean.std(dim=1, keepdim=True) * noise,
                    "clean": clean,
                    "utt_index": torch.from_numpy(idx),
                    "label": torch.from_numpy(labels[idx].astype(np.int64)),
                }

        return make

    def predict(self, method: SupervisedMethod) -> np.ndarray:
        """Class of each utterance's first 0.5 s under the current model (no margin)."""
        model = method.model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            cosine = model.classifier.cosine(model.encoder(self.fixed))
        model.train(was_training)
        return cosine.argmax(dim=-1).numpy()


def train(
    corpus: Corpus, labels: np.ndarray, folder: Path, bf16: bool = False, on_setup=None
) -> tuple[ToyMethod, dict]:
    write_labels(folder, np.arange(corpus.n), labels.astype(np.int32))
    method = ToyMethod(toy_config(), folder, corpus.stats)
    method.bf16 = bf16
    method.setup(torch.device("cpu"), lambda m: m)
    if on_setup is not None:
        on_setup(method)
    log: dict = {"prev": [], "threshold": [], "metrics": [], "labels": [], "pred": []}
    log["initial"] = corpus.predict(method)

    def before(epoch: int) -> None:
        log["prev"].append(method.prev_losses.numpy().copy())

    def after(epoch: int, metrics: dict, seen: np.ndarray) -> None:
        assert np.array_equal(np.sort(seen), np.arange(corpus.n))
        log["threshold"].append(method.gate_threshold)
        log["metrics"].append(metrics)
        log["labels"].append(method.labels.numpy().copy())
        log["pred"].append(corpus.predict(method))

    run_epochs(method, corpus.batches(labels), 0, after, before)
    return method, log


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Single-threaded torch: on a shared, loaded machine, extra threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus(seed=0)


@pytest.fixture(scope="module")
def noisy_run(corpus, tmp_path_factory):
    rng = np.random.default_rng(104)
    flipped = np.zeros(corpus.n, dtype=bool)
    flipped[rng.choice(corpus.n, int(round(FLIP * corpus.n)), replace=False)] = True
    noisy = corpus.true.copy()
    noisy[flipped] = (corpus.true[flipped] + rng.integers(1, CLASSES, flipped.sum())) % CLASSES
    folder = tmp_path_factory.mktemp("noisy_labels")
    method, log = train(corpus, noisy, folder)
    return {"method": method, "log": log, "noisy": noisy, "flipped": flipped, "folder": folder}


def test_loss_gate_drops_mostly_flipped_samples(corpus, noisy_run):
    log, flipped, noisy = noisy_run["log"], noisy_run["flipped"], noisy_run["noisy"]
    assert flipped.sum() == 58 and np.all(noisy[flipped] != corpus.true[flipped])
    # No gate before its start epoch; every epoch before it trains on every sample.
    for epoch in range(GATE_EPOCH):
        assert log["threshold"][epoch] is None and np.isnan(log["metrics"][epoch]["gate_threshold"])
        assert log["metrics"][epoch]["dropped"] == 0
    # Early-learning regime: the model has learnt the clean majority, not the flipped labels.
    pred = log["pred"][GATE_EPOCH - 1]
    assert np.mean(pred[~flipped] == corpus.true[~flipped]) >= 0.9
    assert np.mean(pred[flipped] == corpus.true[flipped]) >= 0.7
    assert np.mean(pred[flipped] == noisy[flipped]) <= 0.2

    prev = log["prev"][GATE_EPOCH]
    threshold = log["threshold"][GATE_EPOCH]
    assert np.isfinite(prev).all() and threshold is not None
    assert threshold == pytest.approx(gmm_crossing(prev, seed=0))
    dropped = prev > threshold
    precision = flipped[dropped].mean()
    recall = dropped[flipped].mean()
    assert precision >= 0.8, f"dropped {dropped.sum()} samples, only {precision:.2f} of them flipped"
    assert recall >= 0.8
    # train_step left exactly those out (label correction has not started yet).
    assert log["metrics"][GATE_EPOCH]["dropped"] == int(dropped.sum())
    assert log["metrics"][GATE_EPOCH]["corrected"] == 0


def test_label_correction_restores_true_labels(corpus, noisy_run):
    log, flipped, noisy, true = noisy_run["log"], noisy_run["flipped"], noisy_run["noisy"], corpus.true
    for epoch in range(CORRECT_EPOCH):
        assert np.array_equal(log["labels"][epoch], noisy)
    labels = log["labels"][CORRECT_EPOCH]
    changed = labels != noisy
    assert changed.sum() >= flipped.sum() // 2
    assert log["metrics"][CORRECT_EPOCH]["corrected"] == int(changed.sum())
    restored = np.mean(labels[changed] == true[changed])
    assert restored > 0.5, f"only {restored:.2f} of {changed.sum()} relabelled samples got their true label"
    assert np.mean(flipped[changed]) > 0.5  # it mostly relabels samples that were wrong
    assert np.mean(labels == true) >= np.mean(noisy == true) + 0.15
    # The corrected table is what the method hands on as the next stage's labels.
    index, final = noisy_run["method"].final_labels()
    assert np.array_equal(index, np.arange(corpus.n)) and np.array_equal(final, labels)
    # The file the run started from is untouched.
    assert np.array_equal(read_labels(noisy_run["folder"])[1], noisy)


def test_true_labels_accuracy_rises(corpus, tmp_path):
    method, log = train(corpus, corpus.true, tmp_path)
    accuracy = [np.mean(p == corpus.true) for p in [log["initial"], *log["pred"]]]
    assert accuracy[0] < 0.3 and accuracy[-1] >= 0.9
    assert max(accuracy[:2]) < min(accuracy[3:])
    train_accuracy = [m["accuracy"] for m in log["metrics"]]
    assert train_accuracy[-1] > train_accuracy[0] + 0.3
    losses = [m["loss"] for m in log["metrics"][:GATE_EPOCH]]
    assert all(b < a for a, b in zip(losses, losses[1:]))
    # On clean labels the noisy-label tools leave the labels essentially as they are.
    assert np.mean(method.labels.numpy() == corpus.true) >= 0.95


def test_true_labels_learnt_under_bf16_autocast(corpus, tmp_path):
    """``ray.precision`` bf16: the encoder's layers run in bf16, the AAM head's cosines and losses in fp32."""
    dtypes: dict[str, set] = {"backbone": set(), "head": set()}

    def record(method: ToyMethod) -> None:
        model = method.model
        model.encoder.backbone.register_forward_hook(lambda m, i, out: dtypes["backbone"].add(out.dtype))
        model.classifier.register_forward_hook(lambda m, i, out: dtypes["head"].update(t.dtype for t in out))

    method, log = train(corpus, corpus.true, tmp_path, bf16=True, on_setup=record)
    assert dtypes == {"backbone": {torch.bfloat16, torch.float32}, "head": {torch.float32}}
    accuracy = [np.mean(p == corpus.true) for p in log["pred"]]
    assert accuracy[-1] >= 0.9
    assert np.mean(method.labels.numpy() == corpus.true) >= 0.95


def test_gmm_crossing_between_modes_and_none_when_unimodal():
    from scipy.stats import norm

    rng = np.random.default_rng(0)
    low, high = rng.normal(1.0, 0.4, 700), rng.normal(6.0, 1.5, 300)
    crossing = gmm_crossing(np.concatenate([low, high]))
    assert crossing is not None and 1.0 < crossing < 6.0
    grid = np.linspace(1.0, 6.0, 50001)
    diff = 0.7 * norm.pdf(grid, 1.0, 0.4) - 0.3 * norm.pdf(grid, 6.0, 1.5)
    expected = grid[np.argmax(diff < 0)]  # where the true weighted densities cross
    assert crossing == pytest.approx(expected, abs=0.25)
    assert np.mean(low > crossing) < 0.01 and np.mean(high > crossing) > 0.98
    # NaNs (unseen samples) are ignored.
    assert gmm_crossing(np.concatenate([low, high, [np.nan] * 50])) == pytest.approx(crossing)

    # One Gaussian: a 2-component fit splits it into overlapping halves whose weighted densities
    # do cross; the mixture has a single mode, so the gate must drop nothing.
    for seed in range(3):
        assert gmm_crossing(np.random.default_rng(seed).normal(2.0, 0.5, 1000)) is None
    assert gmm_crossing(np.full(100, 3.0)) is None
    assert gmm_crossing(np.array([0.1, 5.0, 0.2, 6.0])) is None


def test_gate_drops_nothing_on_unimodal_losses(corpus, tmp_path):
    write_labels(tmp_path, np.arange(corpus.n), corpus.true.astype(np.int32))
    method = ToyMethod(toy_config(), tmp_path, corpus.stats)
    method.setup(torch.device("cpu"), lambda m: m)
    method.prev_losses = torch.from_numpy(np.random.default_rng(1).normal(3.0, 0.5, corpus.n)).float()
    stats = method.start_epoch(GATE_EPOCH)
    assert method.gate_threshold is None and np.isnan(stats["gate_threshold"])
    batch = next(iter(corpus.batches(corpus.true)(GATE_EPOCH)))
    method.train_step(batch)
    assert method.end_epoch(GATE_EPOCH)["dropped"] == 0


def test_correct_labels_sharpens_and_thresholds():
    cosine = torch.tensor([[0.9, 0.1, 0.0], [0.30, 0.32, 0.31]])
    predicted, confident = correct_labels(cosine, temperature=0.1, threshold=0.5)
    assert predicted.tolist() == [0, 1]
    assert confident.tolist() == [True, False]  # 0.02 apart is no confident prediction


def test_l2sp_zero_at_start_and_grows(tmp_path):
    from transformers import WavLMModel

    from raysv.models.wavlm_mhfa import save_tiny_wavlm

    pretrained = save_tiny_wavlm(tmp_path / "wavlm")
    waves, true = voices(4, 2, 0.5, seed=3)
    write_labels(tmp_path / "labels", np.arange(len(true)), true.astype(np.int32))
    batch = {
        "wave": torch.from_numpy(np.stack(waves)),
        "utt_index": torch.arange(len(true)),
        "label": torch.from_numpy(true),
    }
    reference = {n: p.detach() for n, p in WavLMModel.from_pretrained(str(pretrained)).named_parameters()}

    def run(l2sp: float) -> tuple[SupervisedMethod, list[float]]:
        cfg = FinetuneConfig()
        m = cfg.model
        m.kind, m.pretrained, m.heads, m.compression, m.embed_dim = "wavlm_mhfa", str(pretrained), 2, 8, 16
        cfg.lr.backbone = cfg.lr.head = 1e-3
        cfg.l2sp = l2sp
        cfg.objective = "plain"  # l2sp · Σ‖θ−θ₀‖²; the reference's normalised form: test_noisy_labels.py
        method = SupervisedMethod(cfg, seed=0, steps_per_epoch=4, labels=str(tmp_path / "labels"))
        method.setup(torch.device("cpu"), lambda mod: mod)
        method.start_epoch(0)
        return method, [method.train_step(batch)["l2sp"] for _ in range(4)]

    method, penalties = run(0.01)
    backbone = method.encoder().backbone
    names = {id(p): n for n, p in backbone.named_parameters()}
    assert {id(p) for p in method.backbone_params} == {id(p) for p in backbone_parameters(method.encoder())}
    assert method.backbone_params
    assert all(not names[id(p)].startswith("feature_extractor") for p in method.backbone_params)
    assert all(names[id(p)] != "masked_spec_embed" for p in method.backbone_params)
    assert penalties[0] == 0.0  # measured before the first update
    assert all(b > a for a, b in zip(penalties, penalties[1:]))
    moved = sum(float((p.detach() - reference[names[id(p)]]).pow(2).sum()) for p in method.backbone_params)
    assert float(method.l2sp().detach()) == pytest.approx(moved, rel=1e-5) and moved > penalties[-1]
    frozen = backbone.feature_extractor.conv_layers[0].conv.weight
    assert torch.equal(frozen, reference["feature_extractor.conv_layers.0.conv.weight"])

    free, _ = run(0.0)
    pulled, _ = run(1e3)
    assert float(pulled.l2sp().detach()) < 0.5 * float(free.l2sp().detach())


def test_classifier_carried_over_only_to_the_large_margin_stage(corpus, noisy_run, tmp_path):
    from raysv.artifacts.checkpoint import save_training_state

    source = noisy_run["method"]
    save_training_state(tmp_path, {"method": source.state_dict()})
    trained = source.model.classifier.weight.detach()

    def classifier_after_setup(large_margin: bool) -> torch.Tensor:
        method = ToyMethod(toy_config(), noisy_run["folder"], corpus.stats)
        method.init, method.init_classifier = str(tmp_path), large_margin
        method.setup(torch.device("cpu"), lambda m: m)
        return method.model.classifier.weight.detach()

    assert torch.equal(classifier_after_setup(True), trained)  # same labels: continue
    assert not torch.allclose(classifier_after_setup(False), trained)  # a new round's labels: start afresh


def test_resume_keeps_labels_optimizer_and_next_step(corpus, noisy_run, tmp_path):
    method, noisy = noisy_run["method"], noisy_run["noisy"]
    state = method.state_dict()
    torch.save(state, tmp_path / "training.pt")
    loaded = torch.load(tmp_path / "training.pt", weights_only=True)

    resumed = ToyMethod(toy_config(), noisy_run["folder"], corpus.stats)
    resumed.setup(torch.device("cpu"), lambda m: m)
    assert np.array_equal(resumed.labels.numpy(), noisy)
    resumed.load_state_dict(loaded)

    assert torch.equal(resumed.labels, method.labels)
    assert not np.array_equal(resumed.labels.numpy(), noisy)  # the corrections came back
    assert torch.allclose(resumed.prev_losses, method.prev_losses, equal_nan=True)
    original_params = dict(method.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        assert torch.equal(p, original_params[name]), name
    a, b = method.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert a["state"].keys() == b["state"].keys() and len(a["state"]) == len(list(method.model.parameters()))
    for key in a["state"]:
        for name, value in a["state"][key].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][key][name])), (key, name)
    assert [g["lr"] for g in a["param_groups"]] == [g["lr"] for g in b["param_groups"]]
    assert float(resumed.l2sp().detach()) == float(method.l2sp().detach()) > 0  # same pull toward the starting weights

    epoch = EPOCHS
    batches = list(corpus.batches(noisy)(epoch))[:3]
    method.start_epoch(epoch)
    resumed.start_epoch(epoch)
    assert method.gate_threshold is not None and resumed.gate_threshold == method.gate_threshold
    losses = []
    for batch in batches:
        losses.append(method.train_step(dict(batch))["loss"])
        assert resumed.train_step(dict(batch))["loss"] == losses[-1]
    assert torch.equal(resumed.labels, method.labels)
    for name, p in resumed.model.named_parameters():
        assert torch.equal(p, original_params[name]), name

    # Without the saved state the same step gives another loss.
    fresh = ToyMethod(toy_config(), noisy_run["folder"], corpus.stats)
    fresh.setup(torch.device("cpu"), lambda m: m)
    fresh.start_epoch(epoch)
    assert fresh.train_step(dict(batches[0]))["loss"] != pytest.approx(losses[0], rel=1e-3)


def test_ecapa_from_a_checkpoint_is_the_backbone_and_warms_up(tmp_path):
    """A round ECAPA started from DINO trains at the backbone rate, ramped up; from scratch at the head rate."""
    from raysv.artifacts.checkpoint import save_model
    from raysv.models.ecapa import ECAPAEncoder

    encoder = ECAPAEncoder(channels=16, mfa_channels=48, embed_dim=8, n_mels=20)
    save_model(tmp_path / "dino", encoder)
    write_labels(tmp_path / "labels", np.arange(4), np.array([0, 1, 0, 1], dtype=np.int32))
    cfg = FinetuneConfig()
    cfg.model.kind = "ecapa"
    cfg.lr.backbone, cfg.lr.head, cfg.lr.decay = 1e-3, 1e-2, 0.5
    cfg.lr.backbone_warmup_epochs = 2.0
    batch = {"wave": torch.randn(4, 8000), "utt_index": torch.arange(4)}

    pretrained = SupervisedMethod(cfg, seed=0, steps_per_epoch=4, labels=str(tmp_path / "labels"),
                                  init=str(tmp_path / "dino"))
    pretrained.setup(torch.device("cpu"), lambda m: m)
    names = {id(p) for p in pretrained.encoder().parameters()}
    assert {id(p) for p in pretrained.backbone_params} == names
    assert all(id(p) not in names for p in pretrained.optimizer.param_groups[1]["params"])
    before = [p.detach().clone() for p in pretrained.backbone_params]
    rates = []
    for epoch in range(3):
        pretrained.start_epoch(epoch)
        for _ in range(4):
            pretrained.train_step(batch)
            rates.append([g["lr"] for g in pretrained.optimizer.param_groups])
    backbone, head = np.array(rates).T
    # Step s of 4 per epoch: ramp s/8 over 2 epochs, then the per-epoch decay; the head only decays.
    expected = [1e-3 * 0.5 ** (s // 4) * min(1.0, s / 8) for s in range(12)]
    assert backbone == pytest.approx(expected)
    assert head == pytest.approx([1e-2 * 0.5 ** (s // 4) for s in range(12)])
    # The first step ran at rate 0: the encoder moved only from the second step on.
    assert any(not torch.equal(a, b) for a, b in zip(before, pretrained.backbone_params))

    scratch = SupervisedMethod(cfg, seed=0, steps_per_epoch=4, labels=str(tmp_path / "labels"))
    scratch.setup(torch.device("cpu"), lambda m: m)
    assert scratch.backbone_params == []
