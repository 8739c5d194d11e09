"""Run folders (`RunStore`) on a local path and through a pyarrow.fs URI."""

import pytest

from distmem.runs import RunStore


@pytest.mark.parametrize("as_uri", [False, True])
def test_write_read_upload_download_round_trip(tmp_path, as_uri):
    root = tmp_path / "runs" / "one"
    store = RunStore(f"file://{root}" if as_uri else root)
    assert not store.exists("progress.json") and not root.exists()  # opening creates nothing
    store.write_text("progress.json", '{"batch": 1}')
    store.write_text("progress.json", '{"batch": 2}')  # replaced whole
    assert store.read_text("progress.json") == '{"batch": 2}'
    assert (root / "progress.json").read_text() == '{"batch": 2}'
    local = tmp_path / "checkpoint"
    (local / "memory").mkdir(parents=True)
    (local / "model.pt").write_bytes(b"weights")
    (local / "memory" / "part-0.arrow").write_bytes(b"keys")
    store.upload(local, "checkpoints/batch-1")
    back = store.download("checkpoints/batch-1", tmp_path / "back" / "batch-1")
    assert (back / "model.pt").read_bytes() == b"weights" and (back / "memory" / "part-0.arrow").read_bytes() == b"keys"
    assert store.download("checkpoints/batch-1/model.pt", tmp_path / "x" / "m.pt").read_bytes() == b"weights"
    assert store.location("a/b").endswith("one/a/b")
    assert sorted(p.name for p in root.iterdir()) == ["checkpoints", "progress.json"]


def test_missing_files_and_bad_uris_are_named(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        store.read_text("metrics.json")
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        store.download("checkpoints", tmp_path / "out")
    with pytest.raises(ValueError, match="storage: cannot open 'nope://bucket'"):
        RunStore("nope://bucket")
