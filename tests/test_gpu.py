"""On CUDA (skipped without it): every backend and key format against the CPU brute force, the
faiss GPU build, and a 2-shard memory whose actors take GPUs. jobs/gpu_check.sh runs these."""

import pytest
import torch
import torch.nn.functional as F

from distmem import LocalMemory, MemoryConfig

from conftest import unit

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def with_ties(n: int, d: int, seed: int = 0) -> torch.Tensor:
    keys = unit(n, d, seed=seed)
    keys[n // 2:n // 2 + 20] = keys[3]  # 21 equal keys: the lower slot id wins every tie
    return keys


def brute_force(keys: torch.Tensor, q: torch.Tensor, k: int) -> torch.Tensor:
    """The CPU oracle: ids [B, k] by (score desc, id asc), in float64."""
    s = (q.double() @ keys.double().T)
    order = torch.argsort(torch.arange(keys.shape[0]).expand_as(s), dim=1)  # ids ascending, then a stable sort
    s = s.gather(1, order)
    return order.gather(1, torch.sort(s, dim=1, descending=True, stable=True).indices)[:, :k]


def filled(keys):
    g = torch.Generator().manual_seed(0)
    return {"keys": keys, "values": torch.randint(0, 50, (len(keys),), generator=g),
            "ages": torch.randint(0, 100, (len(keys),), generator=g)}


@pytest.mark.parametrize("backend", ["torch", "faiss", "ivf"])
def test_backends_on_cuda_equal_the_cpu_brute_force_ties_included(backend):
    if backend == "faiss":
        faiss = pytest.importorskip("faiss")
        if not hasattr(faiss, "StandardGpuResources"):
            pytest.skip("faiss without GPU support (install distmem[gpu])")
    keys = with_ties(20_000, 64)
    cfg = MemoryConfig(size=20_000, key_dim=64, k=32, ivf_lists=16, ivf_probe=16)  # ivf: every list probed
    mem = LocalMemory(cfg, backend=backend, device="cuda")
    mem.load_state(filled(keys))
    q = torch.cat([unit(100, 64, seed=1), keys[3:4]])
    got = mem.shard.search(q.cuda())["ids"].cpu()
    want = brute_force(keys, q, 32)
    assert (got == want).float().mean() > 0.999  # float32 sums in another order may swap a near-tie
    assert got[-1, :21].tolist() == [3, *range(10_000, 10_020)]


@pytest.mark.parametrize("key_dtype", ["float16", "bfloat16", "int8", "int8_dim"])
@pytest.mark.parametrize("backend", ["torch", "ivf"])
def test_compressed_keys_on_cuda_match_the_cpu_memory(key_dtype, backend):
    cfg = MemoryConfig(size=8192, key_dim=32, k=16, key_dtype=key_dtype, ivf_lists=16, ivf_probe=16, age_noise=0.0)
    gpu, cpu = LocalMemory(cfg, backend=backend, device="cuda"), LocalMemory(cfg, backend=backend, device="cpu")
    keys = F.normalize(torch.randn(8192, 32, generator=torch.Generator().manual_seed(2)), dim=1)
    for m in (gpu, cpu):
        m.load_state(filled(keys))
    assert gpu.keys.dtype == cpu.keys.dtype and torch.equal(gpu.keys.cpu(), cpu.keys)
    q, y = unit(256, 32, seed=5), torch.randint(0, 50, (256,))
    a, b = gpu.step(q.cuda(), y.cuda()), cpu.step(q, y)
    assert (a.ids.cpu()[:, 0] == b.ids[:, 0]).float().mean() > 0.99
    assert (a.prediction.cpu() == b.prediction).float().mean() > 0.99


def test_faiss_gpu_build_searches_on_the_device():
    faiss = pytest.importorskip("faiss")
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        pytest.skip("faiss without GPU support (install distmem[gpu])")
    keys = with_ties(50_000, 128)
    mem = LocalMemory(MemoryConfig(size=50_000, key_dim=128, k=64), backend="faiss", device="cuda")
    mem.load_state(filled(keys))
    q = unit(512, 128, seed=9)
    assert torch.equal(mem.shard.search(q.cuda())["ids"].cpu(), brute_force(keys, q, 64))


def test_two_gpu_shards_equal_the_local_memory(ray_local):
    if torch.cuda.device_count() < 1:
        pytest.skip("needs a GPU")
    import ray

    from distmem import ShardedMemory

    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the local Ray sees no GPU")
    cfg = MemoryConfig(size=4096, key_dim=16, k=8, seed=1)
    local = LocalMemory(cfg, device="cuda")
    mem = ShardedMemory(cfg, 2)  # one GPU: the two shards take half of it each
    try:
        assert [ray.get(s.info.remote())["device"].split(":")[0] for s in mem.shards] == ["cuda", "cuda"]
        for s in range(5):
            q, y = unit(64, 16, seed=s), torch.randint(0, 40, (64,), generator=torch.Generator().manual_seed(s))
            got, want = mem.step(q, y), local.step(q.cuda(), y.cuda())
            assert torch.equal(got.ids.cpu(), want.ids.cpu())
        got, want = mem.state(), local.state()
        assert got.keys() == want.keys()
        for name in got:  # a hit's new key is normalised by the writer on its CPU here, on the GPU there
            if name == "keys":
                torch.testing.assert_close(got[name], want[name].cpu(), rtol=0, atol=1e-6)
            else:
                assert torch.equal(got[name], want[name].cpu()), name
    finally:
        mem.shutdown()
