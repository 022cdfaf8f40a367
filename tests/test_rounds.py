"""`stic rounds`: the state and resume logic with the stages replaced by recorders (fast), the early stop on a
hand-fed metric sequence, the refusals, two real rounds of the tiny LLaVA killed in round 2's stage 1, and two real
rounds of self-question pairs on each other family (slow: about 2-4 s each, `make test-all`)."""

import fcntl
import json
from pathlib import Path

import pytest
import yaml

from stic import dpo, evaluate, models, selfgen
from stic.config import RecipeError
from stic.locks import OutputLocked, lock_path
from stic.rounds import STATE_FILE, RoundsStateError, run_rounds


def round_of(folder) -> int:
    """k of a stage folder round-<k>/<stage>."""
    return int(Path(folder).parent.name.removeprefix("round-"))


class FakeStages:
    """The four stage functions replaced by recorders that write what the rounds read of their outputs.
    `values[(k, spec)]` is the metric an eval of round k returns; `die_in_dpo_of` a round whose stage 1 is
    killed once, after writing a checkpoint."""

    def __init__(self, monkeypatch, values: dict, die_in_dpo_of: int | None = None):
        self.calls, self.values, self.die = [], values, die_in_dpo_of
        monkeypatch.setattr(selfgen, "run_selfgen", self.selfgen)
        monkeypatch.setattr(dpo, "run_dpo", self.dpo)
        monkeypatch.setattr(evaluate, "run_eval", self.eval)
        monkeypatch.setattr(models, "merge_adapter", self.merge)

    def selfgen(self, recipe, overwrite=False):
        out = Path(recipe.selfgen.output_dir)
        self.calls.append(("selfgen", round_of(out), recipe.model.name_or_path))
        out.mkdir(parents=True, exist_ok=True)
        return {"counts": {"rows": 3}}

    def dpo(self, recipe):
        out = Path(recipe.dpo.output_dir)
        k = round_of(out)
        self.calls.append(("dpo", k, recipe.model.name_or_path, recipe.model.dtype, recipe.dpo.dataset,
                           recipe.dpo.resume))
        if k == self.die:
            self.die = None
            (out / "checkpoint-2").mkdir(parents=True)
            raise KeyboardInterrupt("simulated kill in stage 1")
        out.mkdir(parents=True, exist_ok=True)
        (out / "adapter_config.json").write_text(json.dumps({"round": k}))
        (out / "adapter_model.safetensors").write_bytes(f"adapter {k}".encode())
        (out / "run_summary.json").write_text(json.dumps({"global_step": 4}))

    def eval(self, recipe, spec, dar, benchmarks):
        k = round_of(recipe.eval.output_dir)
        self.calls.append(("eval", k, spec))
        return {"benchmarks": {b: {"value": self.values[(k, spec)]} for b in benchmarks}}

    def merge(self, model_cfg, adapter, out, dtype=None, force=False, overwrite=False, fallback_dtype=None):
        out = Path(out)
        self.calls.append(("merge", round_of(out), model_cfg.name_or_path, adapter, fallback_dtype))
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(f"merged {round_of(out)}".encode())
        report = {"adapter": adapter, "dtype": "float32", "requested_dtype": "bfloat16", "error": 0.0}
        (out / models.MERGE_REPORT).write_text(json.dumps(report))
        return out, report


def recipe_data(tmp_path, **rounds) -> dict:
    base = tmp_path / "base"  # a model folder that nothing loads
    base.mkdir(exist_ok=True)
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"base weights")
    return {"model": {"name_or_path": str(base), "dtype": "bfloat16"},
            "rounds": {"output_dir": str(tmp_path / "rounds"), "benchmarks": ["pope"], **rounds}}


def test_a_run_killed_in_round_2s_stage_1_resumes_there(monkeypatch, tmp_path):
    out = tmp_path / "rounds"
    values = {(1, "base"): 0.5, (1, "stage1"): 0.6, (2, "stage1"): 0.7}
    fake = FakeStages(monkeypatch, values, die_in_dpo_of=2)
    data = recipe_data(tmp_path)
    base, merged1 = data["model"]["name_or_path"], str(out / "round-1" / "merged")
    with pytest.raises(KeyboardInterrupt):
        run_rounds(data, 2)
    assert fake.calls == [
        ("selfgen", 1, base), ("dpo", 1, base, "bfloat16", str(out / "round-1/selfgen"), False),
        ("eval", 1, "base"), ("eval", 1, "stage1"), ("merge", 1, base, str(out / "round-1/dpo"), "float32"),
        # round 2 generates and trains with round 1's merged model, in the dtype it was stored in
        ("selfgen", 2, merged1), ("dpo", 2, merged1, "float32", str(out / "round-2/selfgen"), False)]
    state = json.loads((out / STATE_FILE).read_text())
    assert list(state["rounds"]["1"]) == ["selfgen", "dpo", "eval", "merge"] and list(state["rounds"]["2"]) == ["selfgen"]

    fake.calls.clear()
    report = run_rounds(data, 2)
    # neither round 1 nor round 2's pairs again; stage 1 resumes through its own resume (its checkpoint)
    assert fake.calls == [("dpo", 2, merged1, "float32", str(out / "round-2/selfgen"), True),
                          ("eval", 2, "stage1"), ("merge", 2, merged1, str(out / "round-2/dpo"), "float32")]
    rows = report["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2] and [r["values"]["pope"] for r in rows] == [0.5, 0.6, 0.7]
    # which model made which data: round 1's merged folder (its digest) generated round 2's pairs
    assert rows[1]["generator"]["model"] == base and rows[1]["generator"]["digest"].startswith("sha256:")
    assert rows[2]["generator"]["model"] == merged1 == rows[1]["merged"]
    assert rows[2]["generator"]["digest"] == rows[1]["merged_digest"] != rows[2]["merged_digest"]
    assert rows[2]["pairs"] == str(out / "round-2/selfgen") and rows[2]["adapter"] == str(out / "round-2/dpo")
    assert report["best_round"] == 2 and report["stopped_early"] is None
    assert json.loads((out / "rounds.json").read_text()) == report
    table = (out / "rounds.md").read_text()
    assert "| 0 (base) |" in table and f"| 2 | {merged1} (" in table
    assert (out / "rounds.png").stat().st_size > 0
    assert not list(out.glob(".*.tmp"))  # the state and reports are written through a rename

    fake.calls.clear()
    run_rounds(data, 2)  # all finished: nothing runs again
    assert fake.calls == []


@pytest.mark.parametrize("metric, values, margin, stops_after, best, merged", [
    # higher is better: round 3 gains 0.005, not more than the margin; still the best, so it is merged
    ("pope", [0.5, 0.6, 0.65, 0.655, 0.9], 0.01, 3, 3, [1, 2, 3]),
    # CHAIR: lower is better; round 2 is worse than round 1, and not merged
    ("chair", [0.5, 0.4, 0.41, 0.3, 0.2], 0.0, 2, 1, [1]),
])
def test_the_rounds_stop_when_the_metric_stops_improving(monkeypatch, tmp_path, metric, values, margin, stops_after,
                                                         best, merged):
    values_by_eval = {(1, "base"): values[0], **{(k, "stage1"): v for k, v in enumerate(values) if k}}
    fake = FakeStages(monkeypatch, values_by_eval)
    data = recipe_data(tmp_path, benchmarks=[metric], metric=metric, min_improvement=margin)
    report = run_rounds(data, 4)
    assert max(c[1] for c in fake.calls) == stops_after
    assert [c[1] for c in fake.calls if c[0] == "merge"] == merged
    assert f"round {stops_after}'s {metric}" in report["stopped_early"] and report["best_round"] == best
    assert "Stopped early" in (tmp_path / "rounds" / "rounds.md").read_text()

    fake.calls.clear()
    assert run_rounds(data, 4)["stopped_early"] == report["stopped_early"] and fake.calls == []  # decided again
    # without a margin the stopped round is merged and the next one runs
    data["rounds"]["min_improvement"] = None
    run_rounds(data, stops_after + 1)
    k = stops_after
    next_round = [("selfgen", k + 1), ("dpo", k + 1), ("eval", k + 1), ("merge", k + 1)]
    assert [c[:2] for c in fake.calls] == ([] if k in merged else [("merge", k)]) + next_round
    assert [c[2] for c in fake.calls if c[0] == "selfgen"] == [str(tmp_path / "rounds" / f"round-{k}" / "merged")]


def test_refusals_before_any_work(monkeypatch, tmp_path, capsys):
    fake = FakeStages(monkeypatch, {(1, "base"): 0.5, (1, "stage1"): 0.6})
    data = recipe_data(tmp_path)
    with pytest.raises(RecipeError, match="rounds.metric mmvet is scored by an LLM judge"):
        run_rounds({**data, "rounds": {**data["rounds"], "benchmarks": ["mmvet"]}}, 1)
    with pytest.raises(RecipeError, match="rounds: metric chair is not one of benchmarks"):
        run_rounds({**data, "rounds": {**data["rounds"], "metric": "chair"}}, 1)
    with open(lock_path(tmp_path / "rounds"), "a+") as held:  # another run holds the folder's lock
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(OutputLocked):
            run_rounds(data, 1)
    run_rounds(data, 1)
    other = {**data, "model": {**data["model"], "dtype": "float32"}}
    with pytest.raises(RoundsStateError, match=r"rounds of a recipe whose model settings differ"):
        run_rounds(other, 2)
    assert [c[0] for c in fake.calls] == ["selfgen", "dpo", "eval", "eval", "merge"]  # the one run that ran

    from stic.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SystemExit) as exit_:
        main(["rounds", "--recipe", str(path), "--rounds", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err == ["stic: recipe error: --rounds must be at least 1, got 0"]


def test_extra_pair_constructions_run_each_round_with_its_model_and_train_together(monkeypatch, tmp_path):
    """rounds.extra_selfgen: each round makes the recipe's pairs and each further construction's (its keys changed,
    nested ones merged) with the round's model into round-<k>/selfgen-<i>; stage 1 trains on all the folders; a
    kill inside the further construction resumes there; other constructions are another recipe."""
    values = {(1, "base"): 0.5, (1, "stage1"): 0.6, (2, "stage1"): 0.7}
    fake = FakeStages(monkeypatch, values)
    made, fail_in = [], {"folder": None}

    def recording(recipe, overwrite=False):
        cfg = recipe.selfgen
        made.append((round_of(cfg.output_dir), Path(cfg.output_dir).name, cfg.pair_source, cfg.images.path,
                     cfg.images.limit, recipe.model.name_or_path))
        if cfg.output_dir == fail_in["folder"]:
            fail_in["folder"] = None
            raise KeyboardInterrupt("simulated kill in a further construction")
        return fake.selfgen(recipe, overwrite)

    monkeypatch.setattr(selfgen, "run_selfgen", recording)
    data = recipe_data(tmp_path, min_improvement=None,
                       extra_selfgen=[{"pair_source": "self_questions", "images": {"limit": 2}}])
    data["selfgen"] = {"images": {"type": "folder", "path": str(tmp_path / "photos")}}
    out = tmp_path / "rounds"
    fail_in["folder"] = str(out / "round-2" / "selfgen-2")
    with pytest.raises(KeyboardInterrupt):
        run_rounds(data, 2)
    report = run_rounds(data, 2)
    base, merged1, photos = str(tmp_path / "base"), str(out / "round-1" / "merged"), str(tmp_path / "photos")
    assert made == [(1, "selfgen", "stic", photos, None, base), (1, "selfgen-2", "self_questions", photos, 2, base),
                    (2, "selfgen", "stic", photos, None, merged1),
                    (2, "selfgen-2", "self_questions", photos, 2, merged1),  # killed
                    (2, "selfgen", "stic", photos, None, merged1),  # the resume: selfgen's own resume skips done work
                    (2, "selfgen-2", "self_questions", photos, 2, merged1)]
    trained_on = [c[4] for c in fake.calls if c[0] == "dpo"]
    assert trained_on == [[str(out / f"round-{k}" / "selfgen"), str(out / f"round-{k}" / "selfgen-2")] for k in (1, 2)]
    row = report["rounds"][2]
    assert row["pairs"] == f"{out / 'round-2' / 'selfgen'} + {out / 'round-2' / 'selfgen-2'}" and row["rows"] == 6
    # the table gives each folder's pairs
    assert f"{out / 'round-2' / 'selfgen'} (3) + {out / 'round-2' / 'selfgen-2'} (3) (6 rows)" in (
        out / "rounds.md").read_text()

    other = {**data, "rounds": {**data["rounds"], "extra_selfgen": [{"pair_source": "grounding"}]}}
    with pytest.raises(RoundsStateError, match="selfgen settings differ"):
        run_rounds(other, 3)
    for bad, message in (([{"pair_sourse": "grounding"}], r"rounds.extra_selfgen\[0\]: .*pair_sourse"),
                         ([{"output_dir": "x"}], "output_dir is set by the rounds"),
                         ([{}], r"extra_selfgen\[0\] makes the same pairs as the recipe's selfgen"),
                         ([{"seed": 1}, {"seed": 1, "images": {}}],
                          r"extra_selfgen\[1\] makes the same pairs as rounds.extra_selfgen\[0\]")):
        with pytest.raises(RecipeError, match=message):
            run_rounds({**data, "rounds": {**data["rounds"], "output_dir": str(tmp_path / "new"),
                                           "extra_selfgen": bad}}, 1)
    assert not (tmp_path / "new").exists()


def spy_on_stages(monkeypatch) -> list:
    """Record (stage function, round) of each call of the real selfgen, dpo and eval."""
    calls = []
    for module, name, section in ((selfgen, "run_selfgen", "selfgen"), (dpo, "run_dpo", "dpo"),
                                  (evaluate, "run_eval", "eval")):
        def spy(recipe, *args, _real=getattr(module, name), _name=name, _section=section, **kwargs):
            calls.append((_name, round_of(getattr(recipe, _section).output_dir)))
            return _real(recipe, *args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.slow  # two real rounds and a resume: 3.5 s alone, but make test is at its 5-minute budget
def test_two_real_rounds_killed_in_round_2s_stage_1_and_resumed(monkeypatch, tmp_path, photo_dir, eval_root):
    import pyarrow.parquet as pq
    from trl import DPOTrainer

    from tests.conftest import die_on_call

    out = tmp_path / "rounds"
    data = {"model": {"name_or_path": "tiny:llava", "dtype": "float32"},
            "selfgen": {"images": {"type": "folder", "path": str(photo_dir), "limit": 3},
                        "chosen_sampling": {"max_new_tokens": 6},
                        "rejected_sampling": {"max_new_tokens": 6, "do_sample": True}, "batch_size": 4},
            "dpo": {"lora_r": 4, "lora_alpha": 8, "learning_rate": 1e-3, "max_steps": 2, "save_steps": 1,
                    "per_device_train_batch_size": 2, "report_to": [], "plot": False, "image_margin_probe": 0,
                    "activation_checkpointing": False},
            "eval": {"data_root": str(eval_root), "limit": 2},
            "rounds": {"output_dir": str(out), "benchmarks": ["pope"], "min_improvement": None}}
    calls = spy_on_stages(monkeypatch)
    die_on_call(monkeypatch, DPOTrainer, "training_step", 4)  # round 2's second step, after its checkpoint-1
    with pytest.raises(KeyboardInterrupt):
        run_rounds(data, 2)
    assert calls[-2:] == [("run_selfgen", 2), ("run_dpo", 2)]
    assert (out / "round-2" / "dpo" / "checkpoint-1").is_dir()

    monkeypatch.undo()  # the kill, and the spies
    calls = spy_on_stages(monkeypatch)
    report = run_rounds(data, 2)
    assert calls == [("run_dpo", 2), ("run_eval", 2)]  # round 1 and round 2's pairs are not made again
    summary = json.loads((out / "round-2" / "dpo" / "run_summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-1") and summary["global_step"] == 2
    rows = report["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["values"]["pope"] is not None for r in rows)
    merged1 = str(out / "round-1" / "merged")
    assert rows[2]["generator"]["model"] == merged1 and rows[2]["generator"]["digest"] == rows[1]["merged_digest"]
    # the pairs themselves name their generator
    made_by = {m for part in (out / "round-2" / "selfgen" / "data").glob("*.parquet")
               for m in pq.read_table(part, columns=["model"]).column("model").to_pylist()}
    assert made_by == {merged1}
    assert json.loads((out / "round-2" / "merged" / "merge_report.json").read_text())["base"] == merged1


@pytest.mark.slow  # 2-3 s a family alone (184 s under a concurrent demo), kept out of make test's budget
@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl", "idefics3"])
def test_two_rounds_of_self_question_pairs_on_each_family(tmp_path, photo_dir, eval_root, family):
    """The other three families through `stic rounds` with self-question pairs: round 1's merged model (the
    family's own architecture, merged through the precision-safe path) asks, answers and is trained on in round 2,
    and the rows of both rounds go through stage 1 unchanged."""
    import pyarrow.parquet as pq

    from stic.config import ModelSpec
    from stic.models import load_model

    out = tmp_path / "rounds"
    data = {"model": {"name_or_path": f"tiny:{family}", "dtype": "float32"},
            "selfgen": {"images": {"type": "folder", "path": str(photo_dir), "limit": 3},
                        "pair_source": "self_questions", "questions_per_image": 2,
                        "question_sampling": {"max_new_tokens": 6, "do_sample": True},
                        "chosen_sampling": {"max_new_tokens": 6},
                        "rejected_sampling": {"max_new_tokens": 6, "do_sample": True}, "batch_size": 4},
            "dpo": {"lora_r": 4, "lora_alpha": 8, "learning_rate": 1e-3, "max_steps": 1,
                    "per_device_train_batch_size": 2, "report_to": [], "plot": False, "image_margin_probe": 0,
                    "activation_checkpointing": False},
            "eval": {"data_root": str(eval_root), "limit": 2},
            "rounds": {"output_dir": str(out), "benchmarks": ["pope"], "min_improvement": None}}
    report = run_rounds(data, 2)
    rows = report["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["values"]["pope"] is not None for r in rows)
    merged1 = str(out / "round-1" / "merged")
    assert rows[2]["generator"]["model"] == merged1 and rows[2]["generator"]["digest"] == rows[1]["merged_digest"]
    for k, generator in ((1, f"tiny:{family}"), (2, merged1)):
        made = [row for part in sorted((out / f"round-{k}" / "selfgen" / "data").glob("*.parquet"))
                for row in pq.read_table(part).to_pylist()]
        assert made and {row["model"] for row in made} == {generator}
        for row in made:  # each row is a question the round's model asked of an image
            assert row["prompt"] == [{"role": "user", "content": row["question"]}] and row["question"]
            assert row["image_id"] == f"{row['source_image_id']}#q{row['question_index']}"
        summary = json.loads((out / f"round-{k}" / "dpo" / "run_summary.json").read_text())
        assert summary["global_step"] == 1
    merged2 = out / "round-2" / "merged"
    assert json.loads((merged2 / models.MERGE_REPORT).read_text())["base"] == merged1
    model = load_model(ModelSpec(name_or_path=str(merged2), dtype="float32"))  # the family's class loads it
    assert type(model).__name__ == type(load_model(ModelSpec(name_or_path=f"tiny:{family}"))).__name__


@pytest.mark.slow  # one real round of two constructions: about 2 s alone
def test_a_real_round_trains_stage_1_on_both_constructions(tmp_path, photo_dir, eval_root):
    """STIC's pairs and self-question pairs from the same model in one round, stage 1 on all of their rows."""
    import pyarrow.parquet as pq

    out = tmp_path / "rounds"
    data = {"model": {"name_or_path": "tiny:llava", "dtype": "float32"},
            "selfgen": {"images": {"type": "folder", "path": str(photo_dir), "limit": 3},
                        "chosen_sampling": {"max_new_tokens": 6},
                        "rejected_sampling": {"max_new_tokens": 6, "do_sample": True}, "batch_size": 4},
            "dpo": {"lora_r": 4, "lora_alpha": 8, "max_steps": 1, "per_device_train_batch_size": 2, "report_to": [],
                    "plot": False, "image_margin_probe": 0, "activation_checkpointing": False},
            "eval": {"data_root": str(eval_root), "limit": 2},
            "rounds": {"output_dir": str(out), "benchmarks": ["pope"], "min_improvement": None, "eval_base": False,
                       "extra_selfgen": [{"pair_source": "self_questions", "questions_per_image": 2,
                                          "question_sampling": {"max_new_tokens": 6, "do_sample": True}}]}}
    report = run_rounds(data, 1)
    folders = [out / "round-1" / "selfgen", out / "round-1" / "selfgen-2"]
    rows = [sum(pq.read_metadata(p).num_rows for p in (f / "data").glob("*.parquet")) for f in folders]
    assert rows[0] == 3 and rows[1] >= 1 and report["rounds"][0]["rows"] == sum(rows)
    summary = json.loads((out / "round-1" / "dpo" / "run_summary.json").read_text())
    assert summary["dataset"] == {**summary["dataset"], "source": [str(f) for f in folders], "rows": sum(rows)}
