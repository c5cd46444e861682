"""Deployment files: cluster/ configs parse and point at files that exist, jobs/render.py joins the job's
cluster, `kvray submit` builds the right job, and the example manifest is what its docs say.

Fast tests start no Ray. The two `slow` tests share a Ray head of their own (own temp dir and ports,
RAY_AUTH_MODE=disabled): one submits two trivial jobs with `submit()`, the other a job with planted
secrets and a driver joining the cluster with a secret on its command line, and looks for the secrets
in Ray's job table, logs and files. Only that head's processes are ended afterwards: never `ray stop`,
which would end every Ray on the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from kvray.commands import submit as submit_command
from kvray.config.job import RenderJob
from kvray.config.stages import STAGES
from kvray.distributed import secrets as sec
from kvray.distributed import submit as sub
from kvray.distributed.local_cluster import start_head
from kvray.io.storage_options import parse_storage_options

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
IMAGE_ROOT = "/home/ray/kvray"  # where cluster/Dockerfile puts the repository


def _yaml_docs(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _load_render_script():
    spec = importlib.util.spec_from_file_location("kvray_jobs_render", REPO / "jobs" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _repo_path(path: str) -> Path:
    """A path in the image (/home/ray/kvray/...) or on a launcher node (~/kvray/...) -> the same file here."""
    for prefix in (IMAGE_ROOT + "/", "~/kvray/"):
        if path.startswith(prefix):
            return REPO / path[len(prefix):]
    return REPO / path


# ---------------------------------------------------------------------------------------------- cluster/


def test_every_cluster_yaml_parses():
    files = sorted(CLUSTER.glob("*.yaml"))
    assert {f.name for f in files} >= {"ray-cluster-gpu.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml",
                                       "job-kv11.yaml", "job-tiny.yaml"}
    for path in files:
        assert _yaml_docs(path), f"{path.name} is empty"


@pytest.mark.parametrize("name", ["job-kv11.yaml", "job-tiny.yaml"])
def test_render_jobs_validate(name):
    job = RenderJob.from_yaml(CLUSTER / name)
    assert job.models.preset == name.removeprefix("job-").removesuffix(".yaml")
    for stage in STAGES:
        assert job.deployment.stage(stage).actors >= 1
    # Flags on top, as `kvray render MANIFEST --out URI --job FILE` applies them.
    moved = RenderJob.from_yaml(CLUSTER / name, manifest="s3://b/m.parquet", out="s3://b/run")
    assert (moved.manifest, moved.out) == ("s3://b/m.parquet", "s3://b/run")


def test_kv11_job_is_planned_for_the_cluster_and_tiny_needs_no_gpu():
    from kvray.distributed.planner import plan_job

    job = RenderJob.from_yaml(CLUSTER / "job-kv11.yaml")
    for gpus in (8, 16):
        planned, chosen = plan_job(job, gpus)
        kv11 = planned.deployment
        assert chosen is not None and chosen.gpu_memory_gib == 80
        assert 0.9 * gpus <= sum(kv11.stage(s).actors * kv11.stage(s).gpus for s in STAGES) <= gpus
        assert all(kv11.stage(s).gpus > 0 for s in STAGES)
        assert kv11.text.batch_size == 16 and kv11.decode.cpus == 8  # the job's own, kept
    tiny = RenderJob.from_yaml(CLUSTER / "job-tiny.yaml")
    assert all(tiny.deployment.stage(s).gpus == 0 for s in STAGES)
    assert tiny.runtime.device == "cpu"
    assert (REPO / tiny.manifest).is_file()  # its default manifest is the bundled example


def test_launcher_config_is_valid_for_ray_and_ships_the_repo():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "ray-cluster-gpu.yaml").read_text())
    validate_config(prepare_config(config))  # Ray's own schema (jsonschema), no cloud calls
    assert config["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"
    assert config["provider"]["type"] == "aws"
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    workers = [n for name, n in nodes.items() if name != config["head_node_type"]]
    assert workers and all(0 <= n["min_workers"] <= n["max_workers"] for n in workers)
    assert config["file_mounts"]["~/kvray"] == "."
    setup = " ".join(config["setup_commands"])
    assert "torch==2.13.0" in setup and "-e ~/kvray" in setup
    for token in shlex.split(setup.replace("&&", " ")):
        if token.startswith("~/kvray/"):
            assert _repo_path(token).exists(), token
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2  # every node in token mode, with the mounted token


def _kuberay_groups(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]


def _check_raycluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == "2.60.0"
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu_groups = spec["workerGroupSpecs"]
    assert gpu_groups
    for group in gpu_groups:
        (container,) = group["template"]["spec"]["containers"]
        limit = container["resources"]["limits"]["nvidia.com/gpu"]
        assert group["rayStartParams"]["num-gpus"] == str(limit)  # Ray's GPU count matches the pod's
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for group in _kuberay_groups(spec):
        for container in group["template"]["spec"]["containers"]:
            assert container["image"].startswith("REGISTRY/kvray:") or "2.60.0" in container["image"]


def test_kuberay_raycluster():
    (doc,) = _yaml_docs(CLUSTER / "kuberay-raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    _check_raycluster_spec(doc["spec"])


def test_kuberay_rayjob_runs_files_that_exist():
    (doc,) = _yaml_docs(CLUSTER / "kuberay-rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    _check_raycluster_spec(spec["rayClusterSpec"])
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    args = shlex.split(spec["entrypoint"])
    assert args[0] == "python"
    assert _repo_path(args[1]) == REPO / "jobs" / "render.py"
    assert (REPO / "jobs" / "render.py").is_file()
    assert "--out" in args
    job_file = _repo_path(args[args.index("--job") + 1])
    assert job_file.is_file()
    RenderJob.from_yaml(job_file)
    _parses_as_render(args[2:])


def _parses_as_render(args: list[str]) -> argparse.Namespace:
    """`kvray render` accepts these arguments (what jobs/render.py hands it), without running anything."""
    from kvray.cli import build_parser

    render = _load_render_script()
    parsed = build_parser().parse_args(["render", *render.with_address(args)])
    assert parsed.address == "auto" or "--address" in args
    return parsed


def test_dockerfile_uses_the_launcher_image_and_the_image_root():
    text = (CLUSTER / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0-py311-gpu" in text
    assert f"WORKDIR {IMAGE_ROOT}" in text


def test_local_script_never_runs_ray_stop():
    text = (CLUSTER / "local.sh").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "ray stop" not in code
    assert "RAY_AUTH_MODE=disabled" in code and "--dashboard-host=127.0.0.1" in code
    subprocess.run(["bash", "-n", str(CLUSTER / "local.sh")], check=True)


def test_readme_names_every_cluster_file():
    readme = (CLUSTER / "README.md").read_text()
    for path in CLUSTER.iterdir():
        if path.name != "README.md" and not path.name.endswith(".dockerignore"):
            assert path.name in readme, path.name


# ------------------------------------------------------------------------------------------ jobs/render.py


def test_render_job_adds_address_auto_unless_given():
    render = _load_render_script()
    assert render.with_address(["m.parquet", "--out", "s3://b/o"]) == ["m.parquet", "--out", "s3://b/o", "--address", "auto"]
    given = ["m", "--address", "10.0.0.1:6379", "--out", "o"]
    assert render.with_address(given) == given
    assert render.with_address(["m", "--out", "o", "--address=auto"]) == ["m", "--out", "o", "--address=auto"]


def test_render_job_forwards_to_kvray_render(monkeypatch):
    render = _load_render_script()
    calls = []
    import kvray.cli

    monkeypatch.setattr(kvray.cli, "main", lambda argv: calls.append(argv) or 7)
    assert render.main(["m.parquet", "--out", "o", "--preset", "tiny"]) == 7
    assert calls == [["render", "m.parquet", "--out", "o", "--preset", "tiny", "--address", "auto"]]


def test_render_job_is_a_thin_script_with_a_docstring():
    render = _load_render_script()
    assert render.__doc__ and "--address auto" in render.__doc__
    result = subprocess.run([sys.executable, str(REPO / "jobs" / "render.py"), "--help"], capture_output=True,
                            text=True, cwd=tempfile.gettempdir(), timeout=120)
    # `kvray render --help` through the entry point, run by path from elsewhere (as Ray jobs do).
    assert result.returncode == 0, result.stderr
    assert "--out" in result.stdout


# ------------------------------------------------------------------------------------------------ submit


def test_entrypoint_quotes_every_argument():
    args = sub.render_args_from(preset="kv11", weights="s3://w/kv11", job="cluster/job-kv11.yaml",
                                storage_options=["endpoint_url=http://minio:9000", "key=a b"])
    command = sub.build_entrypoint("s3://b/my prompts.parquet", "s3://b/out", args)
    assert command == ("python jobs/render.py 's3://b/my prompts.parquet' --out s3://b/out --preset kv11 "
                       "--weights s3://w/kv11 --job cluster/job-kv11.yaml --storage-option "
                       "endpoint_url=http://minio:9000 --storage-option 'key=a b'")
    assert shlex.split(command)[2] == "s3://b/my prompts.parquet"
    parsed = _parses_as_render(shlex.split(command)[2:])
    assert (parsed.manifest, parsed.out, parsed.preset, parsed.job) == (
        "s3://b/my prompts.parquet", "s3://b/out", "kv11", "cluster/job-kv11.yaml")
    assert parsed.storage_option == ["endpoint_url=http://minio:9000", "key=a b"]
    assert sub.build_entrypoint("m", "o") == "python jobs/render.py m --out o"
    assert sub.render_args_from() == []
    planned = _parses_as_render(["m", "--out", "o", *sub.render_args_from(costs="text=1,keyframes=2,interpolate=1,decode=1",
                                                                          gpu_memory=40.0)])
    assert (planned.costs, planned.gpu_memory) == ("text=1,keyframes=2,interpolate=1,decode=1", 40.0)


def _submit_parser():
    parser = argparse.ArgumentParser(prog="kvray")
    submit_command.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_submit_parser_passes_render_options_through(monkeypatch):
    args = _submit_parser().parse_args([
        "submit", "examples/prompts.parquet", "--out", "s3://b/run", "--address", "http://head:8265",
        "--preset", "tiny", "--job", "cluster/job-tiny.yaml", "--storage-option", "anon=false",
        "--storage-option", "endpoint_url=http://x:9000", "--no-follow", "--runtime-env-json", '{"env_vars": {"A": "1"}}',
    ])
    seen = {}
    monkeypatch.setattr(submit_command, "submit", lambda manifest, out, **kw: seen.update(manifest=manifest, out=out, **kw) or 0)
    assert args.run(args) == 0
    assert seen["address"] == "http://head:8265" and seen["follow"] is False
    assert seen["runtime_env"] == {"env_vars": {"A": "1"}}
    assert sub.build_entrypoint(seen["manifest"], seen["out"], seen["render_args"]) == (
        "python jobs/render.py examples/prompts.parquet --out s3://b/run --preset tiny --job cluster/job-tiny.yaml "
        "--storage-option anon=false --storage-option endpoint_url=http://x:9000")


def test_rays_packing_of_the_working_dir_leaves_environments_out(tmp_path):
    """Packed as Ray packs a working_dir: virtual environments (a symlink to one too), outputs and
    caches stay out; the code goes in."""
    import zipfile

    from ray._private.runtime_env.packaging import _zip_files

    root, environment = tmp_path / "repo", tmp_path / "environment"
    for path in (root / "jobs" / "render.py", root / ".venv" / "lib" / "big.so", root / "venv" / "big.so",
                 root / "out" / "v.mp4", root / "kvray" / "__pycache__" / "a.pyc", environment / "big.so"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (root / ".venv-shared").symlink_to(environment, target_is_directory=True)
    env = sub.build_runtime_env(str(root))
    _zip_files(str(root), env["excludes"], str(tmp_path / "package.zip"), include_gitignore=False)
    files = [n for n in zipfile.ZipFile(tmp_path / "package.zip").namelist() if not n.endswith("/")]
    assert files == ["jobs/render.py"]


def test_submit_parser_rejects_bad_options(capsys):
    for bad in (["--storage-option", "novalue"], ["--runtime-env-json", "[1]"], ["--runtime-env-json", "{"]):
        with pytest.raises(SystemExit):
            _submit_parser().parse_args(["submit", "m", "--out", "o", "--address", "h:8265", *bad])


def test_runtime_env_ships_the_repo_without_venv_git_or_outputs():
    env = sub.build_runtime_env()
    assert env["working_dir"] == str(REPO)
    assert {".venv*", ".git/", "__pycache__/", "out/"} <= set(env["excludes"])
    assert "pip" not in env and "env_vars" not in env
    env = sub.build_runtime_env(None, {"env_vars": {"A": "1"}, "excludes": ["big/"]}, pip=["einops"],
                                env_vars={"B": "2"}, extra_excludes=["/renders-1/"])
    assert env["pip"] == ["einops"] and env["env_vars"] == {"B": "2", "A": "1"}
    assert env["excludes"][-2:] == ["/renders-1/", "big/"]
    assert sub.build_runtime_env("s3://b/kvray.zip") == {"working_dir": "s3://b/kvray.zip"}
    assert sub.build_runtime_env("") == {}  # the image holds the code
    assert sub.build_runtime_env(None, {"working_dir": "s3://b/k.zip"})["working_dir"] == "s3://b/k.zip"
    with pytest.raises(sub.SubmitError, match="not a directory"):
        sub.build_runtime_env(str(REPO / "nope"))


def test_local_output_inside_the_repo_is_not_shipped():
    assert sub._output_exclude(str(REPO / "renders" / "a"), None) == ["/renders/a/"]
    assert sub._output_exclude("s3://b/out", None) == []
    assert sub._output_exclude("/elsewhere/out", None) == []


def test_address_and_token(monkeypatch, tmp_path):
    assert sub.normalize_address("head:8265/") == "http://head:8265"
    assert sub.normalize_address("https://ray.example.com") == "https://ray.example.com"
    assert sub.normalize_address("auto") == "auto" and sub.normalize_address(None) is None
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert sub.auth_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-file\n")
    assert sub.auth_headers() == {"Authorization": "Bearer from-file"}
    path = tmp_path / "tok"
    path.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert sub.find_token() == ("from-path", f"RAY_AUTH_TOKEN_PATH={path}")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert sub.auth_headers() == {"Authorization": "Bearer from-env"}
    assert sub.auth_headers("explicit") == {"Authorization": "Bearer explicit"}
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    path.write_text("")
    with pytest.raises(sub.SubmitError, match="empty"):
        sub.auth_headers()


class FakeClient:
    """Ray's JobSubmissionClient as far as submit() uses it."""

    def __init__(self, status="SUCCEEDED", logs="line 1\nline 2\n"):
        self.status, self.logs, self.submitted = status, logs, []

    def submit_job(self, **kwargs):
        self.submitted.append(kwargs)
        return "raysubmit_test"

    async def tail_job_logs(self, job_id):
        for line in self.logs.splitlines(keepends=True):
            yield line

    def get_job_status(self, job_id):
        return self.status

    def get_job_logs(self, job_id):
        return self.logs


@pytest.mark.parametrize("status,code", [("SUCCEEDED", 0), ("FAILED", 1), ("STOPPED", 1)])
def test_submit_follows_logs_and_returns_the_job_outcome(status, code, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok")
    client, seen = FakeClient(status), {}

    def factory(address, headers):
        seen.update(address=address, headers=headers)
        return client

    logs = io.StringIO()
    rc = sub.submit("examples/prompts.parquet", "s3://b/o", address="127.0.0.1:8265", render_args=["--preset", "tiny"],
                    client_factory=factory, stream=logs)
    assert rc == code
    assert seen == {"address": "http://127.0.0.1:8265", "headers": {"Authorization": "Bearer tok"}}
    (job,) = client.submitted
    assert job["entrypoint"] == "python jobs/render.py examples/prompts.parquet --out s3://b/o --preset tiny"
    assert job["runtime_env"]["working_dir"] == str(REPO)
    assert job["metadata"]["kvray_out"] == "s3://b/o"
    assert logs.getvalue() == "line 1\nline 2\n"
    assert "raysubmit_test" in capsys.readouterr().out


def test_submit_without_follow_returns_once_accepted(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    client = FakeClient(status="RUNNING")
    assert sub.submit("m", "s3://bucket/o", address="http://h:8265", follow=False, client_factory=lambda a, h: client) == 0


def test_submit_reports_an_unreachable_address():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(sub.SubmitError, match="cannot reach the Ray dashboard"):
        sub.submit("m", "s3://bucket/o", address=f"127.0.0.1:{port}", working_dir="")
    args = _submit_parser().parse_args(["submit", "m", "--out", "o", "--address", f"127.0.0.1:{port}", "--working-dir", ""])
    assert args.run(args) == 2


def test_explicit_address_wins_over_ray_address_env(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")
    seen = []

    class Client:
        def __init__(self, address, headers=None):
            seen.append((address, os.environ.get("RAY_ADDRESS")))

    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Client)
    sub._client("http://head:8265", {})
    assert seen == [("http://head:8265", None)]
    assert os.environ["RAY_ADDRESS"] == "http://127.0.0.1:9"  # restored


SECRET = "PLANTED-SECRET-7f3a9c"


def test_submit_keeps_secrets_off_the_entrypoint_runtime_env_and_stderr(monkeypatch, capsys):
    monkeypatch.setenv("KVRAY_TEST_KEY", "AKIA-FROM-ENV")
    args = _submit_parser().parse_args([
        "submit", "m", "--out", "s3://b/o", "--address", "h:8265", "--storage-option", f"secret={SECRET}",
        "--storage-option", "anon=false", "--storage-option", "client_kwargs.endpoint_url=http://u:PW-9@minio:9000",
        "--storage-option", "key=@env:KVRAY_TEST_KEY", "--env", f"HF_TOKEN={SECRET}", "--env", "PLAIN=1"])
    client, bundles = FakeClient(), []
    record = client.submit_job

    def submit_job(**kwargs):  # the bundle, as Ray packages it
        (package,) = kwargs["runtime_env"]["py_modules"]
        path = Path(package) / sec.BUNDLE_FILE
        bundles.append((package, path.stat().st_mode & 0o777, json.loads(path.read_text())))
        return record(**kwargs)

    client.submit_job = submit_job
    monkeypatch.setattr(sub, "_client", lambda address, headers, source="": client)
    assert args.run(args) == 0
    (job,), ((package, mode, data),) = client.submitted, bundles
    assert job["entrypoint"] == "python jobs/render.py m --out s3://b/o --storage-option anon=false"
    assert "env_vars" not in job["runtime_env"]
    assert mode == 0o600 and data == {
        "storage_options": {"secret": SECRET, "client_kwargs.endpoint_url": "http://u:PW-9@minio:9000",
                            "key": "AKIA-FROM-ENV"},
        "env": {"HF_TOKEN": SECRET, "PLAIN": "1"}}
    recorded = json.dumps(job) + "".join(capsys.readouterr())
    assert not [secret for secret in (SECRET, "PW-9", "AKIA-FROM-ENV") if secret in recorded]
    assert not Path(package).exists()  # removed once Ray has uploaded it
    with pytest.raises(ValueError, match="MISSING_VAR is not set"):
        sub.secrets_from_args(["secret=@env:MISSING_VAR"])


def test_the_job_reads_its_bundle_once_and_hands_the_variables_to_workers(tmp_path, monkeypatch):
    from ray import cloudpickle

    for name in ("KVRAY_TEST_ENV", sec.WORKER_ENV_NAMES):
        monkeypatch.delenv(name, raising=False)
    secrets = sec.JobSecrets({"secret": "12345", "client_kwargs.aws_session_token": "t"}, {"KVRAY_TEST_ENV": SECRET})
    driver_copy = sec.write_bundle(tmp_path / "driver", secrets)
    monkeypatch.syspath_prepend(str(tmp_path / "driver"))
    render = _load_render_script()
    args = render.job_args(["m", "--out", "o"])
    assert args[:5] == ["m", "--out", "o", "--address", "auto"]
    parsed = _parses_as_render(args)
    assert parse_storage_options(parsed.storage_option) == {"secret": "12345", "client_kwargs": {"aws_session_token": "t"}}
    assert not (driver_copy / sec.BUNDLE_FILE).exists()  # read once, then gone
    assert os.environ["KVRAY_TEST_ENV"] == SECRET and os.environ[sec.WORKER_ENV_NAMES] == "KVRAY_TEST_ENV"
    assert render.job_args(["m", "--out", "o"]) == ["m", "--out", "o", "--address", "auto"]
    # A worker on another node: Ray unpacked the bundle there too; the hook sets the variables and deletes it.
    hook = cloudpickle.loads(cloudpickle.dumps(sec.worker_setup_hook()))
    node_copy = sec.write_bundle(tmp_path / "node", secrets)
    monkeypatch.syspath_prepend(str(tmp_path / "node"))
    monkeypatch.delenv("KVRAY_TEST_ENV")
    hook()
    assert os.environ["KVRAY_TEST_ENV"] == SECRET and not (node_copy / sec.BUNDLE_FILE).exists()
    assert hook.__name__ == "kvray_worker_secrets"  # all that Ray's runtime_env shows of it


# ---------------------------------------------------------------------------------------------- examples/


def test_example_manifest_has_the_documented_columns_and_its_image_exists():
    from kvray.toyworld import parse_caption

    table = pq.read_table(REPO / "examples" / "prompts.parquet")
    assert table.schema.names == ["id", "prompt", "seed", "fps", "motion", "image", "mode", "camera", "scenes"]
    rows = table.to_pylist()
    assert len(rows) == 6 and len({r["id"] for r in rows}) == len(rows)
    # Every prompt is in the toy world the default model was trained on; every fps and every mode is shown.
    prompts = [p for r in rows for p in ([r["prompt"]] if r["prompt"] else r["scenes"])]
    assert all(parse_caption(p) for p in prompts)
    assert {r["fps"] for r in rows} >= {"low", "medium", "high"}
    assert {r["mode"] for r in rows} >= {"animation"} and any(r["scenes"] and len(r["scenes"]) == 3 for r in rows)
    images = [r["image"] for r in rows if r["image"] is not None]
    assert len(images) == 1
    image = REPO / images[0]
    assert not Path(images[0]).is_absolute() and image.is_file()
    assert image.stat().st_size < 50_000
    from PIL import Image

    with Image.open(image) as img:
        assert img.size == (128, 128) and img.mode == "RGB"


def test_example_manifest_rows_become_valid_requests():
    from kvray.config.job import RequestDefaults
    from kvray.requests.manifest import plan_row

    for row in pq.read_table(REPO / "examples" / "prompts.parquet").to_pylist():
        planned = plan_row(row, RequestDefaults(), "test", (128, 128))
        assert planned.request is not None, planned.error


# ---------------------------------------------------------------------------------- a real head (slow)


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head of this module's own (1 CPU, no GPU): temp dir, ports, no token auth; its processes are
    ended afterwards."""
    cluster = start_head(cpus=1)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_a_failing_job_on_a_real_head_is_exit_code_1(ray_head):
    assert sub.submit("m", "s3://bucket/o", address=ray_head.url, working_dir="", entrypoint="exit 3", stream=io.StringIO()) == 1


# The job's driver, as jobs/render.py runs it: in the shipped repository (no environment shipped with
# it), joined to the head's cluster (RAY_ADDRESS set by Ray), the bundle read, the variables handed to a worker.
SECRETS_PROBE = """
import hashlib, os, sys
assert os.path.isfile("jobs/render.py") and not os.path.exists(".venv"), "the shipped repository"
sys.path.insert(0, "jobs")
import ray
import render as job
from kvray.distributed.secrets import BUNDLE_FILE, BUNDLE_PACKAGE, worker_setup_hook
from kvray.io.storage_options import parse_storage_options

digest = lambda value: hashlib.sha256(value.encode()).hexdigest()
args = job.job_args(["m", "--out", "o"])
options = parse_storage_options([args[i + 1] for i, a in enumerate(args) if a == "--storage-option"])
assert digest(options["secret"]) == sys.argv[1], "the storage option"
assert digest(os.environ["KVRAY_TEST_SECRET"]) == sys.argv[2], "the driver's variable"
ray.init(address="auto", runtime_env={"worker_process_setup_hook": worker_setup_hook()})
assert ray.cluster_resources()["CPU"] == 1, "the head's cluster"

@ray.remote
def in_a_worker():
    bundles = [p for p in sys.path if os.path.isfile(os.path.join(p, BUNDLE_PACKAGE, BUNDLE_FILE))]
    return digest(os.environ.get("KVRAY_TEST_SECRET", "")), bundles

assert ray.get(in_a_worker.remote()) == (sys.argv[2], []), "the worker's variable"
print("secrets ok")
"""

# A driver joining the cluster with a secret on its command line (`kvray render --address ...`).
DRIVER_PROBE = """
import sys
from kvray.distributed.secrets import redact_command_line
assert redact_command_line()
import ray
ray.init(address=sys.argv[1])
ray.shutdown()
"""


def _files_holding(root: Path, needles: list[bytes]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and any(n in path.read_bytes() for n in needles):
                found.append(str(path))
        except OSError:
            pass  # sockets, files a process is removing
    return found


@pytest.mark.slow
def test_a_job_runs_in_the_shipped_repo_and_secrets_stay_out_of_rays_records_logs_and_stderr(ray_head, capfd):
    storage_secret, env_secret, argv_secret = (f"PLANTED-{kind}-{os.urandom(4).hex()}" for kind in ("OPTION", "ENV", "ARGV"))
    public, secrets = sub.secrets_from_args([f"secret={storage_secret}", "anon=false"], [f"KVRAY_TEST_SECRET={env_secret}"])
    assert public == ["anon=false"]
    digests = [hashlib.sha256(v.encode()).hexdigest() for v in (storage_secret, env_secret)]
    logs = io.StringIO()
    status = sub.submit("m", "s3://bucket/o", address=ray_head.url, render_args=sub.render_args_from(storage_options=public),
                        entrypoint=shlex.join(["python", "-c", SECRETS_PROBE, *digests]), secrets=secrets, stream=logs)
    assert status == 0 and "secrets ok" in logs.getvalue(), logs.getvalue()[-3000:]
    # A driver that joins the cluster, with a secret on its command line.
    joined = subprocess.run([sys.executable, "-c", DRIVER_PROBE, ray_head.address, "--storage-option", f"secret={argv_secret}"],
                            env={**ray_head.env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=180,
                            check=False)
    assert joined.returncode == 0, joined.stderr[-3000:]
    with urllib.request.urlopen(f"{ray_head.url}/api/jobs/", timeout=30) as response:
        jobs = response.read().decode()
    drivers = [j["entrypoint"] for j in json.loads(jobs) if j["type"] == "DRIVER"]
    assert any("secret=***" in e for e in drivers), drivers  # recorded, redacted
    planted = [storage_secret, env_secret, argv_secret]
    assert not [s for s in planted if s in jobs], "a secret in /api/jobs/"
    out, err = capfd.readouterr()
    assert not [s for s in planted if s in logs.getvalue() + out + err + joined.stdout + joined.stderr]
    assert _files_holding(ray_head.temp_dir, [s.encode() for s in planted]) == []  # session logs, unpacked packages


def test_submit_refuses_a_relative_out():
    with pytest.raises(sub.SubmitError, match="relative path"):
        sub.submit("m", "./out", address="http://h:8265", follow=False, client_factory=lambda a, h: None)


def test_workers_of_a_ray_kvray_starts_run_at_normal_priority(ray_cluster):
    """Ray's default niceness of 15 let any busy process on the machine starve the stage actors."""
    from kvray.distributed.priority import WORKER_NICENESS, keep_workers_at_normal_priority

    assert keep_workers_at_normal_priority({}) == {WORKER_NICENESS: "0"}
    assert keep_workers_at_normal_priority({WORKER_NICENESS: "5"}) == {WORKER_NICENESS: "5"}  # the user's kept

    @ray_cluster.remote(num_cpus=0)
    def niceness() -> int:
        return os.nice(0)

    assert ray_cluster.get(niceness.remote()) == int(os.environ[WORKER_NICENESS])
