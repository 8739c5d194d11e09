"""Tiny end-to-end runs of the benchmark entry points."""

import json

import pytest

from jobs import bench_memory, bench_sharded


def test_bench_memory_runs_and_reports_ratios(tmp_path):
    out = bench_memory.main(["--size", "3000", "--dim", "16", "--batch", "64", "--k", "8", "--repeats", "1",
                             "--out", str(tmp_path / "m.json"), "--storage", f"file://{tmp_path}/runs"])
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("bench-memory-") and json.loads((run / "results.json").read_text()) == out
    assert set(out["runs"]) == {"bare faiss IndexFlatIP.search", "bare faiss.knn (its kernel)",
                                "LocalMemory.step backend=torch", "LocalMemory.step backend=faiss"}
    assert all(row["ratio"] > 0 for row in out["runs"].values()) and (tmp_path / "m.json").is_file()


@pytest.mark.slow  # a job smoke run: about 20 s with its Ray start
def test_bench_sharded_runs_and_counts_bytes(ray_local):
    out = bench_sharded.main(["--size", "3000", "--dim", "16", "--batch", "64", "--k", "8", "--rounds", "1",
                              "--shards", "1,2"])
    two = out["runs"]["ShardedMemory x2"]
    # per shard: 64 x 8 candidates (ids, values int64; sims float32) plus 4 keys per query, at least
    assert two["read_bytes"] >= 2 * (64 * 8 * 20 + 4 * 64 * 16 * 4)
