"""SimCLR baseline: the (AM-)NT-Xent loss, the gradient-carrying all-gather, and training in-process."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raysv.config import to_dict
from raysv.methods.base import LrConfig
from raysv.methods.simclr import SimclrConfig, SimclrMethod, gather_with_grad, nt_xent, positive_accuracy
from raysv.models.ecapa import EcapaConfig
from raysv.run_config import Config, load_config


# ---------------------------------------------------------------- loss against direct computations


def loop_nt_xent(z: np.ndarray, temperature: float, margin: float) -> float:
    """Pair by pair, in float64: -log(e^{(cos_p - m)/T} / (e^{(cos_p - m)/T} + Σ_neg e^{cos_n/T}))."""
    n, v, _ = z.shape
    zn = z / np.linalg.norm(z, axis=-1, keepdims=True)
    losses = []
    for i in range(n):
        for a in range(v):
            for b in range(v):
                if a == b:
                    continue
                pos = (float(zn[i, a] @ zn[i, b]) - margin) / temperature
                terms = [pos] + [
                    float(zn[i, a] @ zn[j, c]) / temperature for j in range(n) if j != i for c in range(v)
                ]
                top = max(terms)
                log_denominator = top + math.log(sum(math.exp(t - top) for t in terms))
                losses.append(log_denominator - pos)
    return float(np.mean(losses))


@pytest.mark.parametrize("views", [2, 3])
@pytest.mark.parametrize("margin", [0.0, 0.2])
def test_nt_xent_matches_pairwise_loop(views: int, margin: float) -> None:
    rng = np.random.default_rng(views)
    z = rng.normal(size=(5, views, 8))
    got = nt_xent(torch.from_numpy(z), temperature=0.1, margin=margin)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(loop_nt_xent(z, 0.1, margin), rel=1e-5)


def test_nt_xent_two_views_is_textbook_simclr() -> None:
    """V = 2, no margin: 2N-way cross-entropy on cos/T with the diagonal removed (Chen et al. 2020)."""
    torch.manual_seed(0)
    n = 6
    z1, z2 = torch.randn(n, 16), torch.randn(n, 16)
    h = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = (h @ h.t() / 0.5).fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    expected = F.cross_entropy(logits, target)
    got = nt_xent(torch.stack([z1, z2], dim=1), temperature=0.5)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_margin_raises_loss_by_penalising_positives() -> None:
    torch.manual_seed(1)
    z = torch.randn(4, 2, 8)
    assert nt_xent(z, 0.1, margin=0.2) > nt_xent(z, 0.1, margin=0.0)


def test_aligned_views_score_lower_than_shuffled() -> None:
    torch.manual_seed(2)
    base = torch.randn(16, 32)
    aligned = torch.stack([base + 0.1 * torch.randn_like(base), base + 0.1 * torch.randn_like(base)], dim=1)
    shuffled = aligned.clone()
    shuffled[:, 1] = aligned[torch.randperm(16), 1]
    assert nt_xent(aligned, 0.1) < 0.1 * nt_xent(shuffled, 0.1)
    assert positive_accuracy(aligned).item() == 1.0


def test_single_utterance_has_zero_loss_and_finite_gradient() -> None:
    z = torch.randn(1, 2, 4, requires_grad=True)
    loss = nt_xent(z, 0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(z.grad).all()


# ---------------------------------------------------------------- gather across 2 gloo workers


def _make_problem() -> tuple[torch.nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    encoder = torch.nn.Linear(12, 6).double()
    x = torch.randn(8, 2, 12, dtype=torch.float64)  # 8 utterances, 2 views
    return encoder, x


def _worker(rank: int, world: int, store: str, out: str) -> None:
    """One process of a 2-worker group: DDP with equal slices, then manual averaging with 3 + 5 utterances."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results = {}
        encoder, x = _make_problem()
        ddp = DistributedDataParallel(encoder)
        local = x[rank * 4 : (rank + 1) * 4]
        z = gather_with_grad(ddp(local.reshape(-1, 12)).reshape(4, 2, -1))
        loss = nt_xent(z, 0.2, margin=0.1)
        loss.backward()
        results["ddp_loss"] = loss.detach()
        results["ddp_grads"] = [p.grad.clone() for p in encoder.parameters()]
        results["ddp_gathered"] = z.detach()

        encoder, x = _make_problem()
        bounds = [(0, 3), (3, 8)][rank]
        local = x[bounds[0] : bounds[1]]
        z = gather_with_grad(encoder(local.reshape(-1, 12)).reshape(len(local), 2, -1))
        loss = nt_xent(z, 0.2, margin=0.1)
        loss.backward()
        for p in encoder.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        results["uneven_loss"] = loss.detach()
        results["uneven_grads"] = [p.grad.clone() for p in encoder.parameters()]
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gather_across_two_workers_matches_one_worker_with_whole_batch(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    # fork: the workers need only what this process has imported, and start in a fraction of the time
    mp.start_processes(
        _worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )

    encoder, x = _make_problem()
    z = encoder(x.reshape(-1, 12)).reshape(8, 2, -1)
    loss = nt_xent(z, 0.2, margin=0.1)
    loss.backward()
    expected = [p.grad for p in encoder.parameters()]
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["ddp_gathered"], z.detach(), atol=1e-12, rtol=0)
        for key in ("ddp", "uneven"):
            assert got[f"{key}_loss"].item() == pytest.approx(loss.item(), abs=1e-6)
            for g, e in zip(got[f"{key}_grads"], expected):
                torch.testing.assert_close(g, e, atol=1e-6, rtol=0)


def test_gather_is_identity_without_a_process_group() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x


# ---------------------------------------------------------------- training in-process


def tiny_config(projector: bool = False) -> Config:
    cfg = Config()
    cfg.finetune.model.kind = "ecapa"
    cfg.finetune.model.ecapa = EcapaConfig(channels=32, mfa_channels=96, embed_dim=16, norm="mean")
    cfg.simclr = SimclrConfig(
        views=2,
        crop_seconds=0.5,
        temperature=0.1,
        margin=0.1,
        projector=projector,
        projector_dim=16,
        epochs=4,
        batch_size=8,
        lr=LrConfig(backbone=1e-3, head=1e-3, decay=1.0, weight_decay=0.0),
    )
    return cfg


def make_method(cfg: Config, steps_per_epoch: int, **kw) -> SimclrMethod:
    """The method as the training loop builds it: its own section, the round model's config."""
    return SimclrMethod(cfg.simclr, seed=cfg.seed, steps_per_epoch=steps_per_epoch,
                        model=to_dict(cfg.finetune.model), **kw)


def _utterances(count: int, seconds: float, seed: int) -> torch.Tensor:
    """Each utterance hops every 50 ms between its own 3 tones.

    Per-utterance mean normalisation of the fbank removes a stationary spectrum, so the
    identity is carried by which bands switch on and off over time.
    """
    g = torch.Generator().manual_seed(seed)
    samples, hop = int(seconds * 16000), 800
    freqs = 150 + 3500 * torch.rand(count, 3, generator=g)
    which = torch.randint(0, 3, (count, samples // hop + 1), generator=g).repeat_interleave(hop, 1)[:, :samples]
    phase = 2 * math.pi * torch.cumsum(freqs.gather(1, which), dim=1) / 16000
    return 0.1 * torch.sin(phase)


def _batches(utts: torch.Tensor, steps: int, crop: int, seed: int):
    """A fake Ray Data iterator: every step all utterances, 2 random crops each plus noise."""

    def batches(epoch: int):
        g = torch.Generator().manual_seed(seed + epoch)
        for _ in range(steps):
            starts = torch.randint(0, utts.shape[1] - crop, (utts.shape[0], 2), generator=g)
            views = torch.stack([torch.stack([u[s : s + crop] for s in st]) for u, st in zip(utts, starts)])
            noise = 0.02 * torch.randn(views.shape, generator=g)
            yield {"views": views + noise, "utt_index": torch.arange(utts.shape[0])}

    return batches


def test_simclr_method_trains_and_round_trips(tmp_path: Path) -> None:
    from raysv.artifacts.checkpoint import save_model
    from raysv.models import load_encoder
    from raysv.train.loop import run_epochs

    torch.set_num_threads(1)
    cfg = tiny_config()
    method = make_method(cfg, steps_per_epoch=3)
    method.setup(torch.device("cpu"), lambda m: m)
    batches = _batches(_utterances(8, 1.5, seed=0), steps=3, crop=8000, seed=0)
    history: list[dict] = []
    run_epochs(method, batches, 0, lambda e, m, seen: history.append(m))

    losses = [h["loss"] for h in history]
    assert len(losses) == cfg.simclr.epochs and all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    assert history[-1]["accuracy"] > history[0]["accuracy"]
    assert history[-1]["rows"] == 3 * 8
    assert method.step == cfg.simclr.epochs * 3

    # weights_only round trip, then both copies take the same next step
    torch.save(method.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    other = make_method(tiny_config(), steps_per_epoch=3)
    other.setup(torch.device("cpu"), lambda m: m)
    other.load_state_dict(state)
    assert other.step == method.step
    batch = next(iter(batches(99)))
    torch.manual_seed(5)
    a = method.train_step(dict(batch))
    torch.manual_seed(5)
    b = other.train_step(dict(batch))
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    for p, q in zip(method.encoder().parameters(), other.encoder().parameters()):
        torch.testing.assert_close(p, q)

    # the saved encoder is the trained one
    save_model(tmp_path / "ckpt", method.encoder(), method.model_info())
    loaded, meta = load_encoder(tmp_path / "ckpt")
    assert meta["method"] == "simclr"
    method.encoder().eval()
    wave = batch["views"][:, 0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(wave), method.encoder()(wave))


def test_projector_is_trained_but_not_kept() -> None:
    torch.set_num_threads(1)
    method = make_method(tiny_config(projector=True), steps_per_epoch=1)
    method.setup(torch.device("cpu"), lambda m: m)
    batch = next(iter(_batches(_utterances(4, 1.0, seed=1), steps=1, crop=8000, seed=1)(0)))
    before = [p.detach().clone() for p in method.model.projector.parameters()]
    stats = method.train_step(batch)
    assert math.isfinite(stats["loss"]) and stats["crops"] == 8
    assert any(not torch.equal(p, q) for p, q in zip(before, method.model.projector.parameters()))
    assert "projector" not in " ".join(method.encoder().state_dict())
    assert method.encoder()(batch["views"][:, 0]).shape == (4, 16)


def test_wavlm_backbone_gets_its_own_learning_rate(tmp_path: Path) -> None:
    from raysv.models.wavlm_mhfa import save_tiny_wavlm

    torch.set_num_threads(1)
    folder = save_tiny_wavlm(tmp_path / "tiny", hidden_size=32, layers=2, heads=2, intermediate=64, conv_dim=16)
    cfg = tiny_config()
    cfg.finetune.model.kind = "wavlm_mhfa"
    cfg.finetune.model.heads = 4
    cfg.finetune.model.compression = 8
    cfg.finetune.model.embed_dim = 16
    cfg.simclr.lr = LrConfig(backbone=1e-4, head=2e-3, decay=0.5, weight_decay=0.0)
    method = make_method(cfg, steps_per_epoch=1, pretrained=str(folder))
    method.setup(torch.device("cpu"), lambda m: m)
    backbone_group, head_group = method.optimizer.param_groups
    encoder = method.encoder()
    transformer = {id(p) for p in encoder.backbone.encoder.layers.parameters()}
    assert transformer == {id(p) for p in backbone_group["params"]}  # only the layers train (the reference)
    assert {id(p) for p in encoder.mhfa.parameters()} <= {id(p) for p in head_group["params"]}
    assert not any(p.requires_grad for p in encoder.backbone.feature_extractor.parameters())
    conv_before = [p.detach().clone() for p in encoder.backbone.feature_extractor.parameters()]
    layer_before = [p.detach().clone() for p in encoder.backbone.encoder.layers.parameters()]
    batch = next(iter(_batches(_utterances(4, 1.0, seed=2), steps=1, crop=8000, seed=2)(0)))
    stats = method.train_step(batch)
    assert stats["lr_backbone"] == pytest.approx(1e-4) and stats["lr_head"] == pytest.approx(2e-3)
    method.start_epoch(1)
    stats = method.train_step(batch)
    assert stats["lr_backbone"] == pytest.approx(5e-5) and stats["lr_head"] == pytest.approx(1e-3)
    assert all(torch.equal(p, q) for p, q in zip(conv_before, encoder.backbone.feature_extractor.parameters()))
    assert any(not torch.equal(p, q) for p, q in zip(layer_before, encoder.backbone.encoder.layers.parameters()))


# ---------------------------------------------------------------- configs

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["demo_simclr.yaml", "voxceleb2_simclr.yaml"])
def test_simclr_configs_load(name: str, tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / name)
    simclr = cfg.simclr
    assert simclr.views == 2 and simclr.temperature > 0 and simclr.batch_size >= 2 * cfg.ray.num_workers
    if name.startswith("voxceleb2"):
        assert cfg.finetune.model.kind == "wavlm_mhfa" and cfg.finetune.model.pretrained == "microsoft/wavlm-base-plus"
        assert (simclr.temperature, simclr.crop_seconds, simclr.batch_size) == (0.03, 3.0, 256)
        assert (simclr.lr.backbone, simclr.lr.head) == (cfg.finetune.lr.backbone, cfg.finetune.lr.head)
    else:
        demo = load_config(CONFIGS / "demo.yaml")
        assert cfg.finetune.model.ecapa == demo.finetune.model.ecapa
        assert cfg.data.shards == demo.data.shards and cfg.data.trials == demo.data.trials
