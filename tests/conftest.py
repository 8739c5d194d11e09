import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distmem import LocalMemory, MemoryConfig
from distmem.memory import states_equal


def pytest_configure(config) -> None:
    """SIGTERM (a CI time limit, `kill`) ends the run as Ctrl-C does, so the fixtures still tear
    down: the local multi-node cluster and Ray's processes would otherwise outlive pytest."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


state_equal = states_equal  # the tests' name for it


def run_job(module: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python -m module args...` from the repository root, as a user runs a job; fails the test
    with the tail of its output unless it exits 0."""
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=Path(__file__).parents[1], capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture
def small_config() -> MemoryConfig:
    return MemoryConfig(size=32, key_dim=8, k=4, age_noise=0.0)


@pytest.fixture
def small_memory(small_config) -> LocalMemory:
    return LocalMemory(small_config, device="cpu")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (loopback only) for the whole session, started as the jobs start theirs."""
    import os

    import ray

    from distmem.distributed import connect
    tests = str(Path(__file__).parent)  # Ray workers import the tests' own tasks (toy_task)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))
    connect("local")  # not $RAY_ADDRESS: the tests start their own
    yield ray
    ray.shutdown()
