import pytest
import torch
import torch.nn.functional as F

from distmem import LocalMemory, MemoryConfig


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.fixture
def small_config() -> MemoryConfig:
    return MemoryConfig(size=32, key_dim=8, k=4, age_noise=0.0)


@pytest.fixture
def small_memory(small_config) -> LocalMemory:
    return LocalMemory(small_config, device="cpu")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (loopback only) for the whole session."""
    import os

    import ray
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback addresses only
    ray.init(_node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False, namespace="distmem",
             configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()
