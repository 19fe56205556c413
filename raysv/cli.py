"""``raysv``: one command with sub-commands; each parses its arguments and calls the library."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def _config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--config", required=required, help="YAML run config (e.g. configs/demo.yaml)")
    p.add_argument("--merge", action="append", metavar="YAML",
                   help="YAML merged over the config (repeatable), e.g. configs/demo_wavlm.yaml "
                        "or a sweep's best per-round settings")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. dino.epochs=3")


def _load(args) -> "Config":  # noqa: F821
    from raysv.run_config import load_config

    return load_config(args.config, args.overrides, getattr(args, "merge", None))


def _print_metrics(name: str, metrics: dict) -> None:
    from raysv.evaluation.evaluate import format_metrics

    print(format_metrics(name, metrics))


# ---------------------------------------------------------------- commands


def cmd_synth(args) -> None:
    from raysv.audio.synth import synthesize

    summary = synthesize(
        args.out,
        speakers=args.speakers,
        sessions=args.sessions,
        utterances=args.utterances,
        min_seconds=args.min_seconds,
        max_seconds=args.max_seconds,
        seed=args.seed,
        trials=args.trials,
        speaker_offset=args.speaker_offset,
        jobs=args.jobs,
        style=args.style,
    )
    print(f"{summary['utterances']} utterances of {summary['speakers']} {summary['style']} speakers "
          f"({summary['seconds'] / 3600:.2f} h), {summary['trials']} trials, in {summary['out']}"
          + (f"; {summary['note']}" if summary["note"] else ""))


def cmd_prepare(args) -> None:
    from raysv.data.prepare import prepare_shards

    prepare_shards(
        args.audio_root,
        args.out,
        list_file=args.list,
        no_speakers=args.no_speakers,
        shard_size=args.shard_size,
        min_seconds=args.min_seconds,
        overwrite=args.overwrite,
    )


def cmd_compare(args) -> None:
    from raysv.evaluation.compare import compare_scores, format_comparison

    result = compare_scores(args.a, args.b, by=args.by, asnorm=args.asnorm, resamples=args.resamples,
                            level=args.level, seed=args.seed)
    print(json.dumps(result, indent=2) if args.json else format_comparison(result))


def cmd_seeds(args) -> None:
    from raysv.evaluation.seeds import format_spread, seed_spread

    spread = seed_spread(args.runs, trials=args.trials)
    print(json.dumps(spread, indent=2) if args.json else format_spread(spread))


def cmd_evaluate(args) -> None:
    from raysv.artifacts.jsonio import write_json
    from raysv.embedding.core import TrialProtocol
    from raysv.evaluation.evaluate import evaluate_trials
    from raysv.stages.evaluate import evaluate_checkpoint

    if args.checkpoint and args.config and not args.trials:
        if args.skip_bad:
            args.overrides = [*args.overrides, "eval.skip_bad=true"]
        cfg = _load(args)
        results = evaluate_checkpoint(cfg, args.checkpoint, plots_dir=args.plots)
        for name, metrics in results.items():
            _print_metrics(name, metrics)
        if args.json:
            write_json(args.json, results)
        return
    if not args.trials or not args.audio_root:
        raise SystemExit("raysv evaluate: give --trials and --audio-root (or --checkpoint with --config)")
    metrics = evaluate_trials(
        args.trials,
        args.audio_root,
        embedder=args.embedder,
        checkpoint=args.checkpoint,
        protocol=TrialProtocol(crops=args.crops, crop_seconds=args.crop_seconds, positions=args.crop_positions,
                               fusion=args.fusion),
        plots_dir=args.plots,
        skip_bad=args.skip_bad,
        ray=_load(args).ray if args.checkpoint else None,
    )
    _print_metrics(Path(args.trials).name, metrics)
    if args.json:
        write_json(args.json, {k: metrics[k] for k in ("eer", "min_dcf_0.01", "min_dcf_0.05", "trials")})


def cmd_train_dino(args) -> None:
    args.method = "dino"
    cmd_train_ssl(args)


def cmd_train_ssl(args) -> None:
    from raysv.stages.dino import train_dino
    from raysv.stages.evaluate import evaluate_checkpoint
    from raysv.stages.simclr import train_simclr

    cfg = _load(args)
    out = Path(args.out) if args.out else cfg.layout.model(f"round_0/{args.method}")
    checkpoint = (train_dino if args.method == "dino" else train_simclr)(cfg, out)
    print(f"model: {checkpoint}")
    if cfg.data.trials:
        for name, metrics in evaluate_checkpoint(cfg, checkpoint, plots_dir=out.parent / "eval").items():
            _print_metrics(name, metrics)


def cmd_extract(args) -> None:
    from raysv.stages.extract import extract

    cfg = _load(args)
    info = extract(cfg, args.checkpoint, args.out, shards=args.shards)
    print(f"{info['count']} embeddings of dimension {info['dim']} in {args.out}")


def cmd_cluster(args) -> None:
    from raysv.pseudo.lda import LdaConfig
    from raysv.pseudo.remote import run_clustering

    manifest = args.manifest
    if manifest is None and args.shards:
        manifest = Path(args.shards) / "manifest.parquet"
    diag = run_clustering(
        args.embeddings,
        args.out,
        k1=args.k1,
        k2=args.k2,
        min_cluster_size=args.min_cluster_size,
        niter=args.niter,
        seed=args.seed,
        manifest=manifest,
        metric=args.metric,
        k2_factor=args.k2_factor,
        k2_fallback=args.k2_fallback,
        previous=args.previous,
        lda=LdaConfig(iterations=args.lda_iterations, dim=args.lda_dim),
    )
    print(json.dumps(diag, indent=2, default=float))


def cmd_labels(args) -> None:
    from raysv.artifacts.labels import speaker_labels, write_labels
    from raysv.artifacts.shards import read_manifest

    utt, labels, names = speaker_labels(read_manifest(args.shards))
    path = write_labels(args.out, utt, labels)
    print(f"{len(utt)} utterances of {len(names)} speakers: {path}")


def cmd_finetune(args) -> None:
    from raysv.stages.evaluate import evaluate_checkpoint
    from raysv.stages.finetune import finetune

    cfg = _load(args)
    out = Path(args.out) if args.out else cfg.layout.model("finetune")
    checkpoint = finetune(cfg, args.labels, out, init=args.init, large_margin=args.large_margin)
    print(f"model: {checkpoint}")
    if cfg.data.trials:
        for name, metrics in evaluate_checkpoint(cfg, checkpoint, plots_dir=out.parent / "eval").items():
            _print_metrics(name, metrics)


def cmd_run(args) -> None:
    from raysv.pipeline import run_pipeline

    cfg = _load(args)
    run_pipeline(cfg, until=args.until, restart_from=args.restart_from)


def cmd_status(args) -> None:
    from raysv.pipeline import format_status

    print(format_status(args.run_dir))


def _model(args):
    from raysv.inference import load_model

    return load_model(args.checkpoint, runtime=getattr(args, "runtime", None))


def _audio_list(items: list[str]) -> dict[str, Path]:
    """Files named on the command line, or the lines of a Kaldi wav.scp (a single ``.scp`` argument)."""
    from raysv.data.wavscp import read_wav_scp

    if len(items) == 1 and items[0].endswith(".scp"):
        return read_wav_scp(items[0])
    return {item: Path(item) for item in items}


def cmd_embed(args) -> None:
    import numpy as np

    from raysv.audio.io import AudioReadError
    from raysv.errors import InputError

    model = _model(args)
    files = _audio_list(args.files)
    names = list(files)
    vectors, bad = [], []
    for path in files.values():
        try:
            vectors.append(model.embed(path))
        except AudioReadError as err:  # every bad file named at once, nothing written
            bad.append(str(err))
    if bad:
        more = f" … and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise InputError(f"{len(bad)} of {len(files)} files cannot be embedded: {'; '.join(bad[:10])}{more}")
    vectors = np.stack(vectors).astype(np.float32)
    if not args.out:
        for name, v in zip(names, vectors):
            print(name, " ".join(f"{x:.5f}" for x in v))
        return
    fmt = args.format or ("npy" if args.out.endswith(".npy") else "parquet")
    if fmt == "npy":
        np.save(args.out, vectors)
        Path(args.out).with_suffix(".names.txt").write_text("\n".join(names) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1])
        pq.write_table(pa.table({"name": pa.array(names, pa.string()), "embedding": column}), args.out)
    print(f"{len(names)} embeddings of dimension {vectors.shape[1]} written to {args.out} ({fmt})")


def cmd_verify(args) -> None:
    model = _model(args)
    score, same = model.verify(args.a, args.b, threshold=args.threshold)
    print(f"score {score:.4f}: {'same speaker' if same else 'different speakers'}")


def cmd_export(args) -> None:
    from raysv.export import export_onnx

    path = export_onnx(args.checkpoint, args.out, seconds=args.seconds)
    print(f"ONNX model: {path}")


def cmd_enroll(args) -> None:
    model = _model(args)
    count = model.enroll(args.db, args.name, list(_audio_list(args.files).values()))
    print(f"{args.name}: {count} file(s) enrolled in {args.db}")


def cmd_identify(args) -> None:
    model = _model(args)
    threshold = args.threshold if args.threshold is not None else model.embedding_threshold
    if not Path(args.db).is_file():
        raise FileNotFoundError(f"speaker database {args.db} does not exist: enroll speakers first")
    from raysv.speakers import SpeakerDB

    db = SpeakerDB(args.db, dim=model.embed_dim)
    for name, path in _audio_list(args.files).items():
        matches = model.identify(db, path, top=args.top, threshold=threshold)
        print(name, " ".join(f"{m.name}:{m.score:.4f}" for m in matches))


def cmd_sweep(args) -> None:
    from raysv.sweep import run_sweep

    run_sweep(args.config, args.overrides)


# ---------------------------------------------------------------- parser


def _k2(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def _k1(text: str) -> int | None:
    if text in ("none", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or none, got {text!r}") from None


def _at_least(low: int):
    """An argparse type: a whole number of at least ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raysv",
        description="Speaker-verification encoders trained without speaker labels, on Ray: "
        "DINO → clustering → WavLM+MHFA fine-tuning on pseudo-labels, round after round.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="generate a toy multi-speaker corpus (VoxCeleb layout) with trials")
    p.add_argument("--out", required=True)
    p.add_argument("--speakers", type=int, default=40)
    p.add_argument("--sessions", type=int, default=4, help="sessions per speaker")
    p.add_argument("--utterances", type=int, default=8, help="utterances per session")
    p.add_argument("--min-seconds", type=float, default=2.0)
    p.add_argument("--max-seconds", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trials", type=int, default=4000, help="number of trials (half target)")
    p.add_argument("--speaker-offset", type=int, default=0, help="first global speaker number (disjoint voices)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes")
    p.add_argument("--style", choices=("formant", "tube"), default="formant",
                   help="formant: Rosenberg source, formant resonators; tube: KLGLOTT88 source, tube tract, codecs")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("prepare", help="audio files → Parquet shards (FLAC bytes + metadata), as Ray tasks")
    p.add_argument("--audio-root", help="folder searched for audio (speaker = first path component)")
    p.add_argument("--list", help="CSV of path[,speaker] instead of searching the root")
    p.add_argument("--out", required=True)
    p.add_argument("--no-speakers", action="store_true", help="leave the speaker column empty")
    p.add_argument("--shard-size", type=int, default=1000, help="utterances per shard")
    p.add_argument("--min-seconds", type=float, default=0.5, help="shorter files are skipped")
    p.add_argument("--overwrite", action="store_true", help="replace a different existing output")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("evaluate", help="EER and minDCF on a VoxCeleb-format trial list")
    p.add_argument("--trials")
    p.add_argument("--audio-root")
    p.add_argument("--embedder", default="fbank-mean", help="untrained baseline when no --checkpoint")
    p.add_argument("--checkpoint", help="a raysv model folder")
    p.add_argument("--crops", type=int, default=0, help="crops scored beside the whole utterance")
    p.add_argument("--crop-positions", choices=("even", "random"), default="even")
    p.add_argument("--fusion", choices=("score", "embedding"), default="score",
                   help="score: ½ mean of the crop cosines + ½ whole-file cosine; embedding: one averaged embedding")
    p.add_argument("--crop-seconds", type=float, default=4.0)
    p.add_argument("--plots", help="folder for the DET curve, score histogram and scores")
    p.add_argument("--json", help="write the metrics here")
    p.add_argument("--skip-bad", action="store_true",
                   help="drop the trials of unusable audio files (named) instead of stopping")
    _config_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="two evaluations of one trial list: the EER change and its bootstrap interval")
    p.add_argument("a", help="scores.txt of the first model (or its folder, e.g. runs/demo/round_0/eval/toy)")
    p.add_argument("b", help="scores.txt of the second model, same trials")
    p.add_argument("--by", choices=("speaker", "enroll"), default="speaker",
                   help="what the bootstrap resamples: enrolment speakers (first path component) or utterances")
    p.add_argument("--asnorm", action="store_true", help="compare the AS-norm scores instead of the raw ones")
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--level", type=float, default=0.9, help="coverage of the interval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print every figure as JSON")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("seeds", help="runs of one config with other seeds: each stage's mean EER and spread")
    p.add_argument("runs", nargs="+", help="run folders (or their results.json), e.g. runs/demo-s0 runs/demo-s1")
    p.add_argument("--trials", help="the trial list to read (default: each run's first test list)")
    p.add_argument("--json", action="store_true", help="print every figure as JSON")
    p.set_defaults(func=cmd_seeds)

    for name, helptext in (("train-dino", "round 0: DINO on ECAPA-TDNN, then evaluate"),
                           ("train-ssl", "self-supervised training: --method dino or simclr, then evaluate")):
        p = sub.add_parser(name, help=helptext)
        if name == "train-ssl":
            p.add_argument("--method", choices=("dino", "simclr"), default="dino")
        p.add_argument("--out", help="model folder (default <runs>/<name>/round_0/<method>/model)")
        _config_args(p, required=True)
        p.set_defaults(func=cmd_train_dino if name == "train-dino" else cmd_train_ssl)

    p = sub.add_parser("extract", help="embed every utterance of the shards with a checkpoint (Ray actors)")
    p.add_argument("--checkpoint", required=True,
                   help="a raysv model folder, or fbank-mean for the untrained baseline")
    p.add_argument("--shards")
    p.add_argument("--out", required=True)
    _config_args(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("cluster", help="pseudo-labels: k-means (faiss) → Ward AHC of the centroids (or of the "
                       "utterances: --k1 none)")
    p.add_argument("--embeddings", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--k1", type=_k1, required=True,
                   help="k-means centroids, or none: Ward of the utterances themselves (corpora up to 50,000 "
                   "utterances; cluster.k1: null in a config)")
    p.add_argument("--k2", type=_k2, default=None,
                   help="a number, or auto: the Ward cut of best silhouette, a count only where the embeddings "
                   "show one (docs/toy-corpora.md)")
    p.add_argument("--k2-factor", type=float, default=1.0, help="with --k2 auto: groups per estimated speaker")
    p.add_argument("--k2-fallback", type=int, default=None,
                   help="with --k2 auto: the groups where the silhouette shows no count (default: stop with an error)")
    p.add_argument("--lda-iterations", type=_at_least(0), default=0,
                   help="passes of LDA on the labels and clustering again in its space (cluster.lda.iterations)")
    p.add_argument("--lda-dim", type=_at_least(1), default=64, help="LDA directions kept, at most (cluster.lda.dim)")
    p.add_argument("--min-cluster-size", type=int, default=0)
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--metric", choices=("euclidean", "cosine"), default="euclidean",
                   help="euclidean: k-means of the embeddings as they are (the reference); cosine: spherical")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", help="shards whose manifest gives true speakers for NMI/ARI/purity")
    p.add_argument("--manifest", help="manifest.parquet with true speakers (diagnostics only)")
    p.add_argument("--previous", help="labels.parquet the embedding model trained on: NMI/ARI of the new labels "
                                      "against them (no speakers needed)")
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("labels", help="labels.parquet of the true speakers in a shard manifest (supervised reference)")
    p.add_argument("--shards", required=True, help="prepared shard folder (its manifest.parquet names the speakers)")
    p.add_argument("--out", required=True, help="folder to write labels.parquet into")
    p.set_defaults(func=cmd_labels)

    p = sub.add_parser("finetune", help="fine-tune the round model on (pseudo-)labels with AAM-softmax")
    p.add_argument("--labels", required=True, help="labels.parquet (utt_index, label)")
    p.add_argument("--init", help="checkpoint to start from (ECAPA from DINO, or large-margin from a round)")
    p.add_argument("--large-margin", action="store_true", help="use the lmft settings (longer crops, larger margin)")
    p.add_argument("--out")
    _config_args(p, required=True)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("run", help="the whole method, round after round; re-run to resume")
    p.add_argument("--until", help="stop after this stage (e.g. round_0/dino, round_1/cluster)")
    p.add_argument("--restart-from", help="re-run this stage and everything after it")
    _config_args(p, required=True)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="what a run has done: stages, figures, times")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_status)

    runtime_help = "torch (a model folder) or onnx (a file from raysv export); default: from the path"
    p = sub.add_parser("embed", help="whole-file embeddings of audio files (or a Kaldi wav.scp) with a trained model")
    p.add_argument("--checkpoint", required=True, help="a model folder, or an exported .onnx file")
    p.add_argument("files", nargs="+", help="audio files, or one wav.scp (utt_id path per line)")
    p.add_argument("--out", help="file to write (default: print)")
    p.add_argument("--format", choices=("parquet", "npy"), help="parquet: name + embedding; npy: (N, D) and a .names.txt")
    p.add_argument("--runtime", choices=("torch", "onnx"), help=runtime_help)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("verify", help="same speaker or not: score two files with a trained model")
    p.add_argument("--checkpoint", required=True, help="a model folder, or an exported .onnx file")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--threshold", type=float, help="default: the one stored at evaluation")
    p.add_argument("--runtime", choices=("torch", "onnx"), help=runtime_help)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("export", help="the model as ONNX: 16 kHz waveform in, unit embedding out (dynamic batch/length)")
    p.add_argument("--checkpoint", required=True, help="a model folder")
    p.add_argument("--format", choices=("onnx",), default="onnx")
    p.add_argument("--out", help="default: <checkpoint>/model.onnx")
    p.add_argument("--seconds", type=float, default=2.0, help="length of the example waveforms traced")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("enroll", help="add a speaker's files to a speaker database (Parquet: name, sum, count)")
    p.add_argument("--checkpoint", required=True, help="a model folder, or an exported .onnx file")
    p.add_argument("--db", required=True, help="the database file (created when missing)")
    p.add_argument("name")
    p.add_argument("files", nargs="+", help="audio files, or one wav.scp")
    p.add_argument("--runtime", choices=("torch", "onnx"), help=runtime_help)
    p.set_defaults(func=cmd_enroll)

    p = sub.add_parser("identify", help="the best enrolled speakers for each file, 'unknown' below the threshold")
    p.add_argument("--checkpoint", required=True, help="a model folder, or an exported .onnx file")
    p.add_argument("--db", required=True)
    p.add_argument("files", nargs="+", help="audio files, or one wav.scp")
    p.add_argument("--top", type=int, default=1, help="how many speakers to list per file")
    p.add_argument("--threshold", type=float, help="default: the model's whole-file cosine threshold")
    p.add_argument("--runtime", choices=("torch", "onnx"), help=runtime_help)
    p.set_defaults(func=cmd_identify)

    p = sub.add_parser("sweep", help="Ray Tune sweep over clustering sizes and margins for one round")
    _config_args(p, required=True)
    p.set_defaults(func=cmd_sweep)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ["RAYSV_VERBOSE"] = "1"  # Ray's own output too (runtime.verbose)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(message)s" if not args.verbose else "%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("alembic", "mlflow", "urllib3", "filelock", "matplotlib", "fsspec", "httpx"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    from raysv.audio.io import AudioReadError
    from raysv.config import ConfigError
    from raysv.errors import InputError

    try:
        args.func(args)
    except (ConfigError, InputError, AudioReadError, FileNotFoundError, FileExistsError) as err:
        if args.verbose:
            raise
        print(f"raysv {args.command}: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
