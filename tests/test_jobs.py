"""Tiny end-to-end runs of the benchmark entry points."""

import json

import pytest
import torch

from jobs import bench_algorithmic, bench_memory, bench_sharded


def test_bench_memory_runs_and_reports_ratios(tmp_path):
    out = bench_memory.main(["--size", "3000", "--dim", "16", "--batch", "64", "--k", "8", "--repeats", "1",
                             "--out", str(tmp_path / "m.json"), "--storage", f"file://{tmp_path}/runs"])
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("bench-memory-") and json.loads((run / "results.json").read_text()) == out
    assert set(out["runs"]) == {"bare faiss IndexFlatIP.search", "bare faiss.knn (its kernel)",
                                "LocalMemory.step backend=torch", "LocalMemory.step backend=faiss"}
    assert all(row["ratio"] > 0 for row in out["runs"].values()) and (tmp_path / "m.json").is_file()


def test_bench_memory_compares_ivf_with_exact_on_random_and_saved_keys(tmp_path):
    from distmem import LocalMemory, MemoryConfig

    from conftest import unit
    args = ["--backend", "ivf", "--sizes", "4k,8k", "--dim", "16", "--batch", "64", "--k", "8", "--repeats", "1",
            "--lists", "16", "--nprobe", "16"]
    out = bench_memory.main(args)
    assert [row["size"] for row in out["sizes"]] == [4096, 8192]
    for row in out["sizes"]:  # every list probed: the approximate search is the exact one
        assert row["recall_at_1"] == 1.0 and row["recall_at_k"] == 1.0 and row["predictions_differ"] == 0.0
        assert row["speedup"] > 0 and row["peak_rss_gib"] > 0 and row["lists"] == 16
    saved = LocalMemory(MemoryConfig(size=500, key_dim=16, k=4), device="cpu")
    saved.step(unit(300, 16, seed=1), torch.arange(300))
    saved.save(tmp_path / "trained.arrow")
    out = bench_memory.main(args[:3] + ["4k"] + args[4:-1] + ["2", "--keys", str(tmp_path / "trained.arrow")])
    (row,) = out["sizes"]
    assert row["nprobe"] == 2 and 0 < row["recall_at_k"] <= 1 and row["recall_at_1"] > 0.5
    out = bench_memory.main(args[:3] + ["4k"] + args[4:] + ["--key-dtype", "float16"])  # keys made in 16 bits
    (row,) = out["sizes"]
    assert row["recall_at_1"] == 1.0 and row["predictions_differ"] == 0.0 and "against_float32" not in row
    with pytest.raises(SystemExit):
        bench_memory.main(["--backend", "ivf", "--sizes", "lots"])


@pytest.mark.slow  # a job smoke run: about 20 s with its Ray start
def test_bench_sharded_runs_and_counts_bytes(ray_local):
    out = bench_sharded.main(["--size", "3000", "--dim", "16", "--batch", "64", "--k", "8", "--rounds", "1",
                              "--shards", "1,2"])
    two = out["runs"]["ShardedMemory x2"]
    # per shard: 64 x 8 candidates (ids, values int64; sims float32) plus 4 keys per query, at least
    assert two["read_bytes"] >= 2 * (64 * 8 * 20 + 4 * 64 * 16 * 4)


@pytest.mark.slow  # two short Ray Train runs
def test_bench_algorithmic_times_the_length_draws_and_bins(ray_local, tmp_path):
    out = bench_algorithmic.main(["--preset", "quick", "--steps", "100", "--rounds", "1", "--bins", "4,8",
                                  "--bins-batch", "2", "--out", str(tmp_path / "bench.json")])
    own, shared = out["steps_per_second"]["own"][0], out["steps_per_second"]["shared"][0]
    assert own > 0 and shared > 0 and out["speedup_shared_length"] == pytest.approx(shared / own)
    assert out["bins_step_cost"] == pytest.approx(own / out["steps_per_second"]["bins"][0])
    assert json.loads((tmp_path / "bench.json").read_text()) == out
