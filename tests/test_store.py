"""stic/store.py: the resumable, sharded output folder, on its own and through selfgen's job loop."""

import json

import pytest

from stic.selfgen import ID_COLUMN
from stic.store import OutputConflict, ShardedOutput
from tests.conftest import die_on_call, selfgen_recipe, selfgen_rows, selfgen_run

FEATURES = {"id": "string", "n": "int64"}


def rows(*ids):
    return [{"id": i, "n": k} for k, i in enumerate(ids)]


def features():
    import datasets

    return datasets.Features({k: datasets.Value(v) for k, v in FEATURES.items()})


def test_prepare_resumes_the_same_config_and_names_what_differs(tmp_path):
    out = ShardedOutput(tmp_path / "out")
    config = {"selfgen": {"seed": 1, "sampling": {"temperature": 0.7}}, "model": "m"}
    assert out.prepare(config) is False  # a new folder
    assert json.loads((tmp_path / "out" / "run_config.json").read_text()) == config
    assert ShardedOutput(tmp_path / "out").prepare(config) is True
    ShardedOutput(tmp_path / "out").log([{"id": "a", "status": "dropped"}])  # without work it is re-configurable
    changed = {"selfgen": {"seed": 1, "sampling": {"temperature": 1.0}}, "model": "m", "extra": 3}
    with pytest.raises(OutputConflict, match=r"differs in: extra \(not in the stored run\), selfgen\.sampling\.temperature\)"):
        ShardedOutput(tmp_path / "out").prepare(changed)


def test_rows_and_ledger_make_the_done_set(tmp_path):
    out = ShardedOutput(tmp_path / "out", rank=1)
    out.prepare({})
    assert out.write_rows([], features()) is None and out.part_files() == []
    part = out.write_rows(rows("a", "b"), features())
    assert part.parent == out.data_dir and part.name.startswith(f"train-{out.run_id}-r001-00000")
    assert list(out.tmp_dir.iterdir()) == []  # the part was renamed into place whole
    out.log([{"id": "c", "status": "dropped"}])
    ledger = out.ledger_dir / f"{out.run_id}-r001.jsonl"
    with open(ledger, "a") as fh:
        fh.write('{"id": "d", "sta')  # a line cut short by a kill: "d" is simply redone
    assert out.row_ids("id") == ["a", "b"]
    assert out.ledger() == [{"id": "c", "status": "dropped"}]
    assert out.done_ids("id") == {"a", "b", "c"}
    assert list(selfgen_rows(out.root)["id"]) == ["a", "b"]  # the loader reads data/, not the ledger


def test_overwrite_clears_earlier_work_and_prepare_drops_half_written_parts(tmp_path):
    out = ShardedOutput(tmp_path / "out")
    out.prepare({"v": 1})
    out.write_rows(rows("a"), features())
    out.log([{"id": "b"}])
    (out.tmp_dir / "half.parquet").write_bytes(b"PAR1")  # a part whose rename a kill prevented
    again = ShardedOutput(tmp_path / "out")
    assert again.prepare({"v": 1}) is True
    assert list(again.tmp_dir.iterdir()) == [] and again.done_ids("id") == {"a", "b"}
    fresh = ShardedOutput(tmp_path / "out")
    assert fresh.prepare({"v": 2}, overwrite=True) is False
    assert fresh.done_ids("id") == set()
    assert json.loads((tmp_path / "out" / "run_config.json").read_text()) == {"v": 2}


def test_reusing_output_with_another_config_is_refused(tmp_path, photo_dir):
    out = tmp_path / "out"
    images = {"type": "folder", "path": str(photo_dir), "limit": 2}
    selfgen_run(selfgen_recipe(out, images))
    with pytest.raises(OutputConflict, match="hallucination_prob"):
        selfgen_run(selfgen_recipe(out, images, hallucination_prob=0.9))
    # a larger image limit or another batch size is a resume, not a conflict
    images["limit"] = 3
    manifest = selfgen_run(selfgen_recipe(out, images, batch_size=1))
    assert manifest["last_run"]["already_done_at_start"] == 2 and manifest["last_run"]["images_processed"] == 1
    manifest = selfgen_run(selfgen_recipe(out, images, hallucination_prob=0.9), overwrite=True)
    assert manifest["last_run"]["already_done_at_start"] == 0 and manifest["counts"]["rows"] <= 3


def test_crash_between_rows_and_ledger_does_not_duplicate(tmp_path, photo_dir, monkeypatch):
    """A kill after a part is written but before its ledger lines: the rerun must not repeat any row."""
    out = tmp_path / "out"
    recipe = selfgen_recipe(out, {"type": "folder", "path": str(photo_dir)}, images_per_part=2)
    real_log = die_on_call(monkeypatch, ShardedOutput, "log", 2)
    with pytest.raises(KeyboardInterrupt):
        selfgen_run(recipe)
    monkeypatch.setattr(ShardedOutput, "log", real_log)
    manifest = selfgen_run(recipe)
    ids = list(selfgen_rows(out)[ID_COLUMN])
    assert len(ids) == len(set(ids))
    assert manifest["counts"]["images_remaining"] == 0 and manifest["counts"]["duplicate_rows"] == 0
    assert manifest["last_run"]["already_done_at_start"] == 4
