"""Fault suite, class 1: data lost or duplicated.

Each row of REFUSALS sets up a folder state, runs one `stic` command line, and asserts that it is refused in one line
of the expected kind (exit 2, no traceback) and that nothing in the folders changed. The concurrency and kill cases
run real `stic selfgen` processes; the checkpoint cases train the tiny model for a step or two.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stic.cli import main
from tests.conftest import photo, selfgen_recipe, selfgen_rows

REPO = Path(__file__).resolve().parent.parent


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(capsys, argv: list[str]) -> str:
    """Run `stic argv`; assert exit 2 and one stderr line without a traceback; return that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]  # not a progress bar
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("stic: error: "), lines[0]
    return lines[0]


def write_recipe(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def images(tmp_path: Path, n: int) -> Path:
    root = tmp_path / "photos"
    root.mkdir(exist_ok=True)
    for i in range(n):
        photo(i).save(root / f"img{i:03d}.png")
    return root


HOLD = """
import sys, time
from stic.store import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def held(tmp_path):
    """hold(folder): another process holds the folder's lock until the test ends."""
    procs = []

    def hold(folder: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "held"
        procs.append(proc)
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def selfgen_folder(tmp_path: Path, stage: str = "selfgen") -> Path:
    """An output folder the toolkit wrote (its run_config.json names the stage)."""
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "run_config.json").write_text(json.dumps({"stage": stage}))
    return out


def user_folder(tmp_path: Path) -> Path:
    """A user's own project folder: images under data/ and a manifest.json, no run_config.json."""
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    for i in range(3):
        photo(i).save(out / "data" / f"mine{i}.png")
    (out / "manifest.json").write_text('{"mine": true}')
    return out


def duplicated_selfgen_data(tmp_path: Path) -> Path:
    """A selfgen folder two runs wrote: two parts, image b in both."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = selfgen_folder(tmp_path)
    for run, ids in (("aaaa", ["a", "b"]), ("bbbb", ["b", "c"])):
        rows = [{"image_id": i, "prompt": [{"role": "user", "content": f"Describe {i}."}],
                 "chosen": [{"role": "assistant", "content": "A red block."}],
                 "rejected": [{"role": "assistant", "content": "A blue dog."}]} for i in ids]
        pq.write_table(pa.Table.from_pylist(rows), out / "data" / f"train-{run}-r000-00000.parquet")
    return out


def complete_merge(tmp_path: Path) -> Path:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "merge_report.json").write_text(json.dumps({"dtype": "float32"}))
    return out


def half_merge(tmp_path: Path) -> Path:
    """What an older `stic merge` killed before its report left: weights, no merge_report.json."""
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text("{}")
    return out


def model_folder(tmp_path: Path) -> Path:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "weights.bin").write_bytes(b"the user's own")
    return out


def selfgen_argv(tmp_path, out, *extra):
    recipe = write_recipe(tmp_path, selfgen_recipe(out, {"type": "folder", "path": str(images(tmp_path, 2))}))
    return ["selfgen", "--recipe", recipe, *extra]


def dpo_argv(tmp_path, out, dataset=None):
    data = dataset or duplicated_selfgen_data(tmp_path)
    recipe = write_recipe(tmp_path, {"model": {"name_or_path": "tiny:llava", "dtype": "float32"},
                                     "dpo": {"output_dir": str(out), "dataset": str(data), "report_to": []}})
    return ["dpo", "--recipe", recipe]


def infuse_argv(tmp_path, out):
    recipe = write_recipe(tmp_path, {"model": {"name_or_path": "tiny:llava", "dtype": "float32"},
                                     "infuse_sft": {"output_dir": str(out), "report_to": [],
                                                    "data": {"path": str(tmp_path / "none.json")}}})
    return ["infuse-sft", "--recipe", recipe]


def merge_argv(tmp_path, out, *extra):
    recipe = write_recipe(tmp_path, {"model": {"name_or_path": "tiny:llava", "dtype": "float32"}})
    return ["merge", "--recipe", recipe, "--adapter", str(tmp_path / "adapter"), "-o", str(out), *extra]


def locked(folder: str, make_argv):
    """A row whose output folder another process is writing."""
    def setup(t, hold):
        hold(t / folder)
        return make_argv(t), t
    return setup


def cut_config(t: Path) -> Path:
    out = selfgen_folder(t)
    (out / "run_config.json").write_text("{cut")
    return out


# (row name, set-up(tmp_path, held) -> (argv, folder that must stay unchanged), words the line must hold)
REFUSALS = [
    ("selfgen_folder_locked_by_another_run",
     locked("out", lambda t: selfgen_argv(t, t / "out")),
     ["is being written by another run", "pid", "started", "-c"]),
    ("dpo_output_locked_by_another_run",
     locked("run", lambda t: dpo_argv(t, t / "run", dataset=t / "nodata")),
     ["run is being written by another run", "pid"]),
    ("infuse_sft_output_locked_by_another_run",
     locked("run", lambda t: infuse_argv(t, t / "run")),
     ["run is being written by another run", "pid"]),
    ("overwrite_refuses_a_users_folder",
     lambda t, h: (selfgen_argv(t, user_folder(t), "--overwrite"), t / "out"),
     ["did not write", "data/", "manifest.json", "nothing there is deleted"]),
    ("selfgen_refuses_writing_into_a_users_folder",
     lambda t, h: (selfgen_argv(t, user_folder(t)), t / "out"),
     ["did not write", "data/", "manifest.json", "nothing there is touched"]),
    ("overwrite_refuses_another_stages_output",
     lambda t, h: (selfgen_argv(t, selfgen_folder(t, stage="describe"), "--overwrite"), t / "out"),
     ["another stage (describe, not selfgen)", "--overwrite deletes only a selfgen output"]),
    ("overwrite_refuses_an_unreadable_run_config",
     lambda t, h: (selfgen_argv(t, cut_config(t), "--overwrite"), t / "out"),
     ["run_config.json is not valid JSON"]),
    ("dpo_refuses_duplicate_image_ids",
     lambda t, h: (dpo_argv(t, t / "run"), t / "out"),
     ["1 duplicate rows over 1 image_id", "'b' 2 times", "two runs wrote one folder"]),
    ("merge_refuses_a_half_written_merge",
     lambda t, h: (merge_argv(t, half_merge(t), "--overwrite"), t / "merged"),
     ["is not a complete merge (no merge_report.json)"]),
    ("merge_refuses_a_folder_it_did_not_write",
     lambda t, h: (merge_argv(t, model_folder(t), "--overwrite"), t / "merged"),
     ["is not a complete merge"]),
    ("merge_keeps_an_earlier_merge_without_overwrite",
     lambda t, h: (merge_argv(t, complete_merge(t)), t / "merged"),
     ["already holds a merged model", "--overwrite"]),
    ("merge_output_locked_by_another_merge",
     locked("merged", lambda t: merge_argv(t, t / "merged")),
     ["merged is being written by another run"]),
]


@pytest.mark.parametrize("setup,words", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refused_in_one_line_and_nothing_changes(tmp_path, capsys, held, setup, words):
    argv, kept = setup(tmp_path, held)
    before = snapshot(kept)
    line = refused(capsys, argv)
    for word in words:
        assert word in line, line
    assert snapshot(kept) == before  # nothing deleted, nothing half-written


# -------------------------------------------------------------------------------------------------------------
# Real processes: two runs on one folder, and a kill -9 of the lock holder

WARM = """
import sys
import stic.cli, stic.selfgen, stic.store, stic.models, datasets, transformers  # imported before the start signal
print("ready", flush=True)
sys.stdin.readline()
stic.cli.main(sys.argv[1:])
"""


# WARM, and the run then stops after its first part, holding the lock, until it is killed: a kill mid-run at a
# known point, however fast the machine writes the other parts
WARM_STOP_AFTER_FIRST_PART = WARM.replace("stic.cli.main(", """
import time
_write = stic.store.ShardedOutput.write_rows
def _write_once(self, *args, **kwargs):
    path = _write(self, *args, **kwargs)
    print("part written", flush=True)
    time.sleep(600)
    return path
stic.store.ShardedOutput.write_rows = _write_once
stic.cli.main(""")


def test_a_killed_lock_holder_leaves_no_stale_lock(tmp_path, capsys, held):
    holder = held(tmp_path / "out")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with pytest.raises(SystemExit) as exit_info:
        main(selfgen_argv(tmp_path, tmp_path / "out"))
    assert exit_info.value.code == 0, capsys.readouterr().err
    assert sorted(selfgen_rows(tmp_path / "out")["image_id"]) == ["img000.png", "img001.png"]


@pytest.mark.slow  # two warm `stic selfgen` processes: about 16 s, more than the fast suite allows
def test_two_selfgen_runs_on_one_folder_then_kill_and_resume(tmp_path, capsys):
    from stic.models import load_processor
    from stic.config import ModelSpec

    load_processor(ModelSpec(name_or_path="tiny:llava"))  # the tiny model is built once, before the processes race
    photos = images(tmp_path, 8)
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, selfgen_recipe(out, {"type": "folder", "path": str(photos)}, batch_size=1,
                                                   images_per_part=1))
    argv = ["selfgen", "--recipe", recipe]
    procs = [subprocess.Popen([sys.executable, "-c", WARM_STOP_AFTER_FIRST_PART, *argv], cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:  # started together
        p.stdin.write("go\n")
        p.stdin.flush()
    # the refused one exits at once; the other holds the lock and is killed once it has written a part
    deadline = time.time() + 60
    while all(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.05)
    loser = next(p for p in procs if p.poll() is not None)
    winner = next(p for p in procs if p is not loser)
    err = loser.stderr.read()
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]
    assert loser.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "is being written by another run" in lines[0] and f"pid {winner.pid}" in lines[0], lines[0]
    printed = iter(winner.stdout.readline, "")  # what the run prints before it, then the marker
    assert any(line.strip() == "part written" for line in printed)
    os.kill(winner.pid, signal.SIGKILL)
    assert winner.wait() == -signal.SIGKILL  # killed mid-run, holding the lock
    assert len(list((out / "data").glob("*.parquet"))) == 1

    main_rc = None
    try:
        main(argv)  # the rerun is not refused: the kernel dropped the dead holder's lock
    except SystemExit as exit_info:
        main_rc = exit_info.code
    assert main_rc in (None, 0), capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"selfgen: resuming in {out}: " in printed and " of 8 items already done" in printed, printed
    ids = list(selfgen_rows(out)["image_id"])
    assert len(ids) == len(set(ids))  # each image once
    manifest = json.loads((out / "manifest.json").read_text())
    c = manifest["counts"]
    assert len(ids) + sum(c["dropped_pairs"].values()) + c["rejected_images"] == 8, manifest


# -------------------------------------------------------------------------------------------------------------
# Merges are whole or absent


def test_a_merge_killed_while_writing_leaves_no_folder_and_a_rerun_replaces_on_request(tmp_path, monkeypatch):
    import stic.models as models
    from stic.config import ModelSpec
    from tests.test_models import make_adapter

    adapter = make_adapter(tmp_path / "adapter")
    tiny = ModelSpec(name_or_path="tiny:llava", dtype="float32")
    out = tmp_path / "merged"
    real = models.load_processor

    def killed(*a, **k):  # the weights are on disk, the processor and report not yet
        raise KeyboardInterrupt("killed while writing the merge")

    monkeypatch.setattr(models, "load_processor", killed)
    with pytest.raises(KeyboardInterrupt):
        models.merge_adapter(tiny, str(adapter), str(out))
    assert not out.exists()  # eval cannot load a half-written folder as complete
    monkeypatch.setattr(models, "load_processor", real)
    models.merge_adapter(tiny, str(adapter), str(out))
    report = json.loads((out / "merge_report.json").read_text())
    assert report["dtype"] == "float32" and (out / "config.json").exists()
    assert not (tmp_path / ".merged.partial").exists()
    stamp = (out / "merge_report.json").stat().st_mtime_ns
    models.merge_adapter(tiny, str(adapter), str(out), overwrite=True)  # an earlier complete merge, replaced
    assert (out / "merge_report.json").stat().st_mtime_ns != stamp
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")) == [".merged.stic-lock"]


# -------------------------------------------------------------------------------------------------------------
# Resume from the last complete checkpoint


def test_last_complete_checkpoint_skips_partial_ones(tmp_path, capsys):
    from stic.training import last_complete_checkpoint

    def checkpoint(step, *files):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        for f in files:
            (d / f).write_text(json.dumps({"global_step": step}) if f == "trainer_state.json" else "x")

    checkpoint(2, "trainer_state.json", "adapter_model.safetensors", "optimizer.pt")
    checkpoint(4, "adapter_model.safetensors", "optimizer.pt")  # killed before its state was written
    checkpoint(6)  # killed right after the folder was made
    checkpoint(10, "trainer_state.json", "optimizer.pt")
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text('{"glob')  # cut short
    assert last_complete_checkpoint(str(tmp_path), "dpo") == str(tmp_path / "checkpoint-2")
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"dpo: resuming from {tmp_path / 'checkpoint-2'}; skipped checkpoint-10 (partial, no "
                           "trainer_state.json or model weights)"), line
    assert "checkpoint-6 (partial, no trainer_state.json or model weights or optimizer state)" in line
    assert "checkpoint-4 (partial, no trainer_state.json)" in line
    (tmp_path / "checkpoint-2" / "optimizer.pt").unlink()
    assert last_complete_checkpoint(str(tmp_path), "infuse_sft") is None
    assert "infuse_sft: resume requested but" in capsys.readouterr().out
    assert last_complete_checkpoint(str(tmp_path / "absent"), "dpo") is None


def test_dpo_resumes_from_the_last_complete_checkpoint_after_a_kill_during_a_save(tmp_path, capsys):
    from tests.test_dpo import dpo_cfg, make_dataset, recipe
    from stic.dpo import run_dpo

    data = make_dataset(tmp_path / "data", n=2)
    kw = dict(max_steps=1, save_strategy="steps", save_steps=1, learning_rate=1e-3, lora_dropout=0.0)
    run_dpo(recipe("llava", dpo_cfg(tmp_path, data, **kw)))
    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir()  # a save killed right after making its folder
    (run / "checkpoint-2" / "adapter_model.safetensors").write_bytes(b"")
    capsys.readouterr()
    summary = run_dpo(recipe("llava", dpo_cfg(tmp_path, data, resume=True, **kw)))
    assert summary["resumed_from"] == str(run / "checkpoint-1") and summary["global_step"] == 1
    assert (f"dpo: resuming from {run / 'checkpoint-1'}; skipped checkpoint-2 (partial, no trainer_state.json or "
            "model weights or optimizer state)") in capsys.readouterr().out
