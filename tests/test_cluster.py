"""The local multi-node cluster (`cluster/local.sh`): job submission with token authentication,
refused submissions, a worker node killed mid-run; and the cloud / Kubernetes configs."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
LOCAL_SH = ROOT / "cluster" / "local.sh"
DATA = (ROOT.parent / "shared" / "data" / "omniglot").resolve()
PORT, DASHBOARD_PORT = 6391, 8276  # apart from the script's defaults, so a user's cluster is left alone


def _env(state: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", DISTMEM_CLUSTER_DIR=str(state),
               DISTMEM_CLUSTER_PORT=str(PORT), DISTMEM_DASHBOARD_PORT=str(DASHBOARD_PORT), **extra)
    return env


def _run(cmd: list[str], env: dict[str, str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head + 1 worker node on loopback; yields (state folder, client env with the token)."""
    state = Path(tempfile.mkdtemp(prefix="dmc-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = _env(state)
    up = _run(["bash", str(LOCAL_SH), "up", "1"], env, timeout=240)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"http://127.0.0.1:{DASHBOARD_PORT}" in up.stdout
        token = (state / "auth_token").read_text().strip()
        assert token not in up.stdout + up.stderr and oct((state / "auth_token").stat().st_mode)[-3:] == "600"
        exports = _run(["bash", str(LOCAL_SH), "env"], env).stdout.removeprefix("export ").split()
        yield state, {**env, **dict(e.split("=", 1) for e in exports)}
    finally:
        _run(["bash", str(LOCAL_SH), "down"], env, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def submit(client_env: dict, *job_args: str, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    cmd = ["ray", "job", "submit", "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml",
           "--", "python", "-m", "jobs.omniglot", "--data", str(DATA), *job_args]
    if wait:
        return _run(cmd, client_env)
    return subprocess.Popen(cmd, cwd=ROOT, env=client_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _files_text(folder: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file() and p.stat().st_size < 10**7)


@pytest.mark.slow  # about 4 minutes: the runtime environment is set up on each node
def test_submitted_quick_job_spreads_the_memory_and_writes_metrics(cluster, tmp_path):
    state, client = cluster
    out = submit(client, "--preset", "quick", "--mode", "lifelong", "--workers", "2", "--shards", "2",
                 "--cpus-per-worker", "1", "--storage", f"file://{tmp_path}/runs")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "succeeded" in out.stdout
    (run,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["mode"] == "lifelong" and metrics["batches"] == 4 and (run / "accuracy.png").is_file()
    assert metrics["memory"]["shard_nodes"] == 2  # one shard per node
    assert metrics["memory"]["step"] == 4 * 50 and metrics["memory"]["filled"] > 0
    token = (state / "auth_token").read_text().strip()
    assert token not in out.stdout + out.stderr and token not in _files_text(run)
    assert token not in _files_text(ROOT / "cluster")
    assert token not in _files_text(state / "head" / "session_latest" / "logs")


@pytest.mark.slow  # the local 2-node cluster: about 40 s with its start and stop
def test_a_driver_joins_the_cluster_by_its_loopback_address_and_the_shards_spread(cluster):
    _, client = cluster
    script = (f"from distmem import MemoryConfig, ShardedMemory\n"
              f"m = ShardedMemory(MemoryConfig(size=64, key_dim=8, k=4), 2, address='127.0.0.1:{PORT}')\n"
              f"print('NODES', len({{p['node'] for p in m.placement()}}))\n"
              f"m.shutdown()\n")
    env = {k: v for k, v in client.items() if k != "RAY_ADDRESS"}
    out = _run([sys.executable, "-c", script], env, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "NODES 2" in out.stdout  # one shard on each of the two nodes


@pytest.mark.slow  # the local 2-node cluster: about 40 s with its start and stop
def test_submissions_without_or_with_a_wrong_token_are_refused(cluster, tmp_path):
    _, client = cluster
    no_token = {k: v for k, v in client.items() if not k.startswith("RAY_AUTH")}
    no_token["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    wrong = {**no_token, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}
    for env in (no_token, wrong):
        out = _run(["ray", "job", "submit", "--no-wait", "--", "python", "-c", "print('ran')"], env, timeout=120)
        assert out.returncode != 0, out.stdout + out.stderr
        assert "auth" in (out.stdout + out.stderr).lower() or "401" in out.stdout + out.stderr
    listed = _run(["ray", "job", "list"], client, timeout=120)  # and nothing was started by them
    assert listed.returncode == 0 and "print('ran')" not in listed.stdout


@pytest.mark.slow  # about 2.5 minutes; run with: python -m pytest -m slow tests/test_cluster.py
def test_losing_a_worker_node_mid_run_keeps_the_memory(cluster, tmp_path):
    state, client = cluster
    runs = tmp_path / "runs"
    job = submit(client, "--preset", "quick", "--mode", "lifelong", "--workers", "2", "--shards", "2",
                 "--cpus-per-worker", "1", "--batches", "8", "--storage", str(runs), wait=False)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # wait for the first checkpoint, then kill the worker node
            progress = list(runs.glob("*/progress.json"))
            if progress and json.loads(progress[0].read_text() or "{}").get("step", 0) >= 3:
                break
            time.sleep(1)
        else:
            pytest.fail("the job made no progress")
        killed = _run(["bash", str(LOCAL_SH), "kill-worker", "1"], client)
        assert killed.returncode == 0, killed.stderr
        output, _ = job.communicate(timeout=600)
    finally:
        job.kill()
    assert job.returncode == 0, output[-6000:]
    (run,) = runs.iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["batches"] == 8
    # life-long memory: never reset, nothing lost. Every step the trainers made went through, the
    # batches redone after the restart included, and the shards agree on one state.
    assert metrics["memory"]["step"] >= 8 * 50 and metrics["memory"]["filled"] > 0
    assert metrics["memory"]["shard_nodes"] == 1  # the worker node is gone: its shard moved to the head


def test_cluster_launcher_configs_pass_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config
    for name in ("aws-gpu.yaml", "gcp-gpu.yaml"):
        config = yaml.safe_load((ROOT / "cluster" / name).read_text())
        validate_config(prepare_config(config))
        starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
        assert starts.count("RAY_AUTH_MODE=token") == 2 and "--dashboard-host=127.0.0.1" in starts
        assert any("[gpu]" in c for c in config["setup_commands"])
        gpu_worker = config["available_node_types"]["gpu_worker"]
        assert gpu_worker["max_workers"] > gpu_worker["min_workers"]
    broken = prepare_config(yaml.safe_load((ROOT / "cluster" / "aws-gpu.yaml").read_text()))
    del broken["available_node_types"]["gpu_worker"]["resources"]
    with pytest.raises(Exception, match="resources"):
        validate_config(broken)


def test_kuberay_manifests_parse_with_token_auth_from_a_secret():
    kinds = {}
    for path in (ROOT / "cluster" / "kuberay").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] == "ray.io/v1"
            kinds[doc["kind"]] = doc
    assert set(kinds) == {"RayCluster", "RayJob"}
    for spec in (kinds["RayCluster"]["spec"], kinds["RayJob"]["spec"]["rayClusterSpec"]):
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
        pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for pod in pods:
            for container in pod["spec"]["containers"]:
                env = {e["name"]: e for e in container["env"]}
                assert env["RAY_AUTH_MODE"]["value"] == "token"
                assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]  # never a literal token
        assert any("nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
                   for g in spec["workerGroupSpecs"])
    assert "jobs.omniglot" in kinds["RayJob"]["spec"]["entrypoint"]
