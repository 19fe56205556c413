"""cluster.yaml passes Ray's own `ray up` validation and has what validation cannot check;
the job entry points parse, map --storage, fail before touching the cluster, and hold GPUs."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from zipfile import ZipFile

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster.yaml"
DOCS = REPO / "README.md"

# vCPUs, GPUs and memory (GiB) of the EC2 instance types the cluster uses.
INSTANCES = {"m6i.4xlarge": (16, 0, 64), "c6i.16xlarge": (64, 0, 128), "p4d.24xlarge": (96, 8, 1152)}
OBJECT_STORE_CAP_GIB = 200e9 / 2**30  # Ray's default object-store ceiling


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


@pytest.fixture(scope="module")
def cfg(raw) -> dict:
    """The config as `ray up` sees it: defaults filled in, then schema-validated."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


def workers(cfg: dict) -> dict:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def setup_commands(cfg: dict, name: str) -> list[str]:
    """The setup commands a node type runs (a node type's own list replaces the merged one)."""
    node = cfg["available_node_types"][name]
    if name == cfg["head_node_type"]:
        return cfg["head_setup_commands"]
    return node.get("worker_setup_commands", cfg["worker_setup_commands"])


def shm_gib(cfg: dict, name: str) -> float:
    docker = cfg["docker"]
    options = list(docker.get("run_options", []))
    if name == cfg["head_node_type"]:
        options += docker.get("head_run_options", [])
    else:
        options += docker.get("worker_run_options", [])
        options += cfg["available_node_types"][name].get("docker", {}).get("worker_run_options", [])
    sizes = [re.fullmatch(r"--shm-size=(\d+)g", o) for o in options if o.startswith("--shm-size")]
    assert len(sizes) == 1 and sizes[0], f"{name}: expected one --shm-size=<N>g, got {options}"
    return float(sizes[0].group(1))


def test_ray_validation_accepts_the_file_and_catches_a_typo(raw, cfg):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    assert cfg["provider"]["type"] == "aws" and cfg["head_node_type"] in cfg["available_node_types"]
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_a100x8"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_workers_scale_from_zero_and_the_head_runs_no_ray_work(cfg):
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and head["max_workers"] == 0
    assert len(workers(cfg)) >= 2
    for name, node in workers(cfg).items():
        assert node["min_workers"] == 0, name
        assert node["max_workers"] >= 1, name


def test_declared_resources_and_shm_fit_each_instance(cfg):
    for name, node in cfg["available_node_types"].items():
        cpus, gpus, ram = INSTANCES[node["node_config"]["InstanceType"]]
        if name != cfg["head_node_type"]:
            assert node["resources"].get("CPU") == cpus, name
            assert node["resources"].get("GPU", 0) == gpus, name
        # Ray caps the object store at 95 % of /dev/shm; below 30 % of RAM it would shrink.
        shm = shm_gib(cfg, name)
        assert 0.95 * shm >= min(0.3 * ram, OBJECT_STORE_CAP_GIB), (name, shm)
        assert shm <= 0.5 * ram, (name, shm)


def test_a_gpu_worker_type_with_faiss_gpu(cfg):
    gpu_types = {k: v for k, v in workers(cfg).items() if v["resources"].get("GPU", 0) > 0}
    assert gpu_types, "no worker type offers GPUs"
    for name in gpu_types:
        cmds = setup_commands(cfg, name)
        install = next(i for i, c in enumerate(cmds) if "/home/ray/raysv" in c)
        swap = next(i for i, c in enumerate(cmds) if "faiss-gpu" in c)
        assert install < swap, "faiss-gpu must replace the faiss-cpu that installing raysv brings"
        assert "pip uninstall -y faiss-cpu" in cmds[swap]
    for name in cfg["available_node_types"]:
        if name not in gpu_types:
            assert not any("faiss-gpu" in c for c in setup_commands(cfg, name)), name
            assert any("/home/ray/raysv" in c for c in setup_commands(cfg, name)), name


def test_nothing_is_open_to_the_internet(raw, cfg):
    text = CLUSTER.read_text() + DOCS.read_text()
    assert "0.0.0.0/0" not in text and "::/0" not in text
    for rule in cfg["provider"].get("security_group", {}).get("IpPermissions", []):
        assert not rule.get("IpRanges") and not rule.get("Ipv6Ranges"), rule
    # A node type without SecurityGroupIds gets Ray's default group, which opens SSH to 0.0.0.0/0.
    for name, node in cfg["available_node_types"].items():
        assert node["node_config"].get("SecurityGroupIds"), name
    start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "--dashboard-host=0.0.0.0" not in start


def test_image_matches_the_installed_and_pinned_ray():
    import ray
    from packaging.specifiers import SpecifierSet

    raw = yaml.safe_load(CLUSTER.read_text())
    docker = raw["docker"]
    images = {docker["image"], docker.get("head_image"), docker.get("worker_image")} - {None}
    images |= {n["docker"]["worker_image"] for n in raw["available_node_types"].values() if "worker_image" in n.get("docker", {})}
    pyproject = (REPO / "pyproject.toml").read_text()
    pin = SpecifierSet(re.search(r'"ray\[[^\]]*\]([^"]*)"', pyproject).group(1))
    requires_python = SpecifierSet(re.search(r'requires-python\s*=\s*"([^"]+)"', pyproject).group(1))
    for image in images:
        m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-gpu", image)
        assert m, f"{image}: expected rayproject/ray:<version>-py3XX-gpu"
        assert m.group(1) == ray.__version__ and m.group(1) in pin, (image, ray.__version__, pin)
        assert f"3.{m.group(2)}" in requires_python
    setup = " ".join(raw["setup_commands"])
    assert re.search(r'"ray\[[^\]]*\]==([\d.]+)"', setup).group(1) == ray.__version__


def test_token_authentication_stays_on(cfg):
    for path in (CLUSTER, DOCS, REPO / "jobs" / "pipeline.py", REPO / "jobs" / "sweep.py"):
        assert not re.search(r"RAY_AUTH_MODE\W*(disabled|none)", path.read_text(), re.I), path
    env = dict(o.split(" ", 1)[1].split("=", 1) for o in cfg["docker"]["run_options"] if o.startswith("--env "))
    assert env["RAY_AUTH_MODE"] == "token"
    # The token file the nodes use is the one `ray get-auth-token --generate` wrote locally.
    assert cfg["file_mounts"][env["RAY_AUTH_TOKEN_PATH"]] == "~/.ray/auth_token"


def test_mlflow_runs_on_the_head_and_jobs_get_its_address(raw, cfg):
    cmds = cfg["head_start_ray_commands"]
    server = next(i for i, c in enumerate(cmds) if "mlflow server" in c)
    start = next(i for i, c in enumerate(cmds) if "ray start --head" in c)
    assert server < start
    # Run the head's own export line: it must yield the node's address, which workers can reach.
    export = re.search(r"export MLFLOW_TRACKING_URI=.*?:5000(?=;)", cmds[start]).group(0)
    bin_dir = str(Path(sys.executable).parent)
    out = subprocess.run(["bash", "-c", f"{export}; echo $MLFLOW_TRACKING_URI"], capture_output=True, text=True,
                         timeout=120, env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(Path.home())})
    assert re.fullmatch(r"http://\d+\.\d+\.\d+\.\d+:5000\n", out.stdout), (out.stdout, out.stderr)
    assert cmds[start].index(export) < cmds[start].index("ray start --head")
    assert re.search(r"--artifacts-destination s3://\S+", cmds[server])
    assert json.dumps(raw).count("s3://") == 1, "the bucket is named in one place"


def test_job_upload_leaves_out_the_venv_and_run_outputs(tmp_path):
    """What `ray job submit --working-dir .` packs, with the repository's .gitignore."""
    from ray._private.runtime_env.packaging import create_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    tree = tmp_path / "repo"
    keep = {"jobs/pipeline.py", "jobs/sweep.py", "configs/voxceleb2.yaml", "raysv/config.py", "raysv/data/prepare.py"}
    drop = {".venv/lib/python3.11/site-packages/torch/__init__.py", "runs/voxceleb2/state.json",
            "data/train_shards/part-00000.parquet", ".git/HEAD", "raysv/__pycache__/config.cpython-311.pyc"}
    repo_like_tree(tree, keep, drop)
    package = tmp_path / "package.zip"

    def upload(working_dir, excludes, is_file=False):
        create_package(working_dir, package, include_gitignore=True, excludes=excludes)

    upload_working_dir_if_needed({"working_dir": str(tree)}, include_gitignore=True, upload_fn=upload)
    packed = {n for n in ZipFile(package).namelist() if not n.endswith("/")}
    assert packed == keep | {".gitignore"}


def repo_like_tree(root: Path, keep: set[str], drop: set[str]) -> None:
    for rel in keep | drop:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    shutil.copy(REPO / ".gitignore", root / ".gitignore")


@pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync, as `ray up` does")
def test_file_mount_of_the_working_tree_leaves_out_the_venv_and_run_outputs(tmp_path, raw):
    from ray.autoscaler._private.command_runner import SSHCommandRunner

    keep = {"pyproject.toml", "raysv/config.py", "jobs/pipeline.py", "configs/voxceleb2.yaml", "raysv/data/prepare.py"}
    drop = {".venv/bin/python", "runs/demo/state.json", "data/x.flac", ".git/HEAD", "raysv/__pycache__/a.pyc"}
    repo_like_tree(tmp_path / "src", keep, drop)
    assert raw["file_mounts"]["/home/ray/raysv"] == "."
    args = SSHCommandRunner._create_rsync_filter_args(None, {k: raw.get(k) for k in ("rsync_exclude", "rsync_filter")})
    subprocess.run(["rsync", "-a", *args, f"{tmp_path / 'src'}/", f"{tmp_path / 'dst'}/"], check=True, timeout=60)
    copied = {str(p.relative_to(tmp_path / "dst")) for p in (tmp_path / "dst").rglob("*") if p.is_file()}
    assert copied == keep | {".gitignore"}


# ---------------------------------------------------------------- jobs/


def load_job(name: str):
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        spec = importlib.util.spec_from_file_location(f"raysv_job_{name}", REPO / "jobs" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(REPO / "jobs"))


@pytest.mark.parametrize("name", ["pipeline", "sweep"])
def test_job_help(name):
    out = subprocess.run([sys.executable, f"jobs/{name}.py", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ["--config", "--storage", "--gpus", "key=value"] + (["--until", "--restart-from"] if name == "pipeline" else []):
        assert flag in out.stdout, flag


def test_storage_root_sets_run_directory_and_train_storage():
    from raysv.run_config import load_config

    job = load_job("pipeline")
    parse = job.job_parser("test").parse_args
    demo = str(REPO / "configs" / "demo.yaml")

    cfg = load_config(demo, job.job_overrides(parse(["--config", demo, "--storage", "/mnt/shared/raysv/"])))
    assert (cfg.runs, cfg.ray.storage) == ("/mnt/shared/raysv/runs", "/mnt/shared/raysv/ray")
    cfg = load_config(demo, job.job_overrides(parse(["--config", demo, "--storage", "s3://bucket/raysv"])))
    assert (cfg.runs, cfg.ray.storage) == ("runs", "s3://bucket/raysv/ray")
    args = parse(["--config", demo, "--storage", "/shared", "runs=/elsewhere", "dino.epochs=3"])
    cfg = load_config(demo, job.job_overrides(args))
    assert (cfg.runs, cfg.ray.storage, cfg.dino.epochs) == ("/elsewhere", "/shared/ray", 3)
    cfg = load_config(demo, job.job_overrides(parse(["--config", demo])))
    assert (cfg.runs, cfg.ray.storage) == ("runs", None)


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--until", "round_9/dino"], "no such stage"), (["dino.epochs=lots"], "dino.epochs"),
     (["--restart-from", "round_0/nothing"], "round_0/dino")],
)
def test_pipeline_job_rejects_bad_input_before_touching_the_cluster(monkeypatch, extra, message):
    job = load_job("pipeline")
    monkeypatch.setattr(job, "cluster", lambda gpus: pytest.fail("connected to Ray despite bad input"))
    with pytest.raises(SystemExit) as exit_info:
        job.main(["--config", str(REPO / "configs" / "demo.yaml"), *extra])
    assert message in str(exit_info.value.code)


class FakeRay:
    """Ray as the job sees it: GPUs appear after the autoscaler has been asked twice."""

    def __init__(self):
        self.requests: list[list[dict]] = []
        self.polls = 0

    def init(self, address=None, **kw):
        assert address == "auto", "a job must attach to the running cluster"

    def cluster_resources(self):
        self.polls += 1
        return {"CPU": 64.0, "GPU": 8.0 if self.polls > 2 else 0.0}

    def request_resources(self, bundles=None, **kw):
        self.requests.append(list(bundles))


@pytest.fixture
def fake_ray(monkeypatch):
    import ray
    import ray.autoscaler.sdk

    fake = FakeRay()
    monkeypatch.setattr(ray, "init", fake.init)
    monkeypatch.setattr(ray, "cluster_resources", fake.cluster_resources)
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", fake.request_resources)
    return fake


def test_gpus_are_requested_waited_for_and_released(monkeypatch, fake_ray):
    job = load_job("pipeline")
    monkeypatch.setattr(job, "time", SimpleNamespace(monotonic=time.monotonic, sleep=lambda s: None))
    before = signal.getsignal(signal.SIGTERM)
    with job.cluster(8):
        assert fake_ray.requests == [[{"GPU": 1}] * 8]
        assert fake_ray.polls == 3
        assert signal.getsignal(signal.SIGTERM) is not before
    assert fake_ray.requests[-1] == []
    assert signal.getsignal(signal.SIGTERM) is before

    fake_ray.requests.clear()
    with pytest.raises(RuntimeError, match="stage failed"):
        with job.cluster(8):
            raise RuntimeError("stage failed")
    assert fake_ray.requests[-1] == [], "a failed run must not keep the GPU nodes"


def test_gpu_wait_gives_up_with_a_message(monkeypatch, fake_ray):
    import ray

    job = load_job("pipeline")
    clock = iter(range(0, 10_000, 100))
    monkeypatch.setattr(job, "time", SimpleNamespace(monotonic=lambda: next(clock), sleep=lambda s: None))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"GPU": 0.0})
    with pytest.raises(SystemExit, match="only 0 of 8 GPUs"):
        with job.cluster(8, timeout_s=600):
            pytest.fail("ran without the GPUs")
    assert fake_ray.requests[-1] == []


def test_without_gpus_the_autoscaler_is_left_alone(fake_ray):
    job = load_job("pipeline")
    with job.cluster(0):
        pass
    assert fake_ray.requests == []


def test_every_node_keeps_idle_workers_for_the_next_stage(cfg):
    """As raysv's local clusters (raysv.runtime.local_system_config): three idle workers per CPU."""
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in cfg[key] if "ray start" in c)
        export = re.search(r"export RAY_num_workers_soft_limit=[^;]+(?=;)", start)
        assert export and start.index(export.group(0)) < start.index("ray start"), (key, start)
        out = subprocess.run(["bash", "-c", f"{export.group(0)}; echo $RAY_num_workers_soft_limit"],
                             capture_output=True, text=True, timeout=30)
        assert int(out.stdout) == 3 * len(os.sched_getaffinity(0)), (key, out.stdout, out.stderr)
