"""stic/report.py on hand-made inputs: no model, no training run."""

import html
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace as NS

import pytest

from stic import report
from stic.config import ModelSpec
from stic.generation import Output
from stic.images import ImageRef
from stic.instructions import SubsetConfig
from stic.prompts import CAPTION_PROMPTS, HALLUCINATION_PROMPTS, PromptSets
from stic.selfgen import ID_COLUMN, SelfGenConfig, features, make_row, plan_image
from stic.store import ShardedOutput
from tests.conftest import photo

PROMPTS = PromptSets("good prompt", tuple(CAPTION_PROMPTS), tuple(HALLUCINATION_PROMPTS))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# a Trainer's log_history: per-step records, then the end-of-training record (no "loss" key)
HISTORY = [{"loss": 0.7 - 0.05 * s, "rewards/margins": 0.1 * s, "rewards/accuracies": 0.5, "logps/chosen": -30.0 - s,
            "logps/rejected": -31.0 - 2 * s, "step": s} for s in range(1, 6)]
HISTORY.append({"train_runtime": 1.5, "train_loss": 0.6, "step": 5})


# ---------------------------------------------------------------------------------------------------------
# selfgen


def selfgen_store(root: Path, n_rows: int = 6):
    """A selfgen output folder written without a model: rows in two parts, one unreadable image and one dropped
    pair in the ledger. Returns (store, recipe, refs, rows)."""
    from corruptions import make_corruption

    cfg = SelfGenConfig(output_dir=str(root), seed=5, preview_pairs=4)
    specs = [{"kind": "color_jitter"}, {"kind": "lower_resolution"}]
    store = ShardedOutput(root)
    store.prepare({"stage": "selfgen"})
    rows = []
    for i in range(n_rows):
        plan = plan_image(f"img{i}.png", cfg, PROMPTS, specs)
        record = None
        if plan.branch == "corruption":
            settings = {k: v for k, v in plan.corruption.items() if k != "kind"}
            _, record = make_corruption(plan.corruption["kind"], **settings)(photo(i), plan.corruption_seed)
        rows.append(make_row(plan, photo(i), Output(f"chosen <b>{i}</b> & more", "eos", 4),
                             Output(f"rejected {i}", "length", 6), record, PROMPTS, cfg, "tiny", "{}"))
    store.write_rows(rows[:n_rows // 2], features())
    store.write_rows(rows[n_rows // 2:], features())
    store.log([{"id": "broken.png", "status": "rejected", "reason": "truncated file", "path": "/p/broken.png",
                "row": None},
               {"id": "same.png", "status": "dropped", "reason": "identical"}])
    refs = [ImageRef(id=f"img{i}.png") for i in range(n_rows + 2)] + [ImageRef(id="broken.png"),
                                                                       ImageRef(id="same.png")]
    recipe = NS(model=ModelSpec(name_or_path="tiny:llava"), selfgen=cfg)
    return store, recipe, refs, rows


def test_selfgen_manifest_counts_and_round_trips(tmp_path, capsys):
    store, recipe, refs, rows = selfgen_store(tmp_path / "out")
    stats = [{"images": 5, "rows": 3, "tokens": 40, "seconds": 2.0}, {"images": 3, "rows": 3, "tokens": 20,
                                                                        "seconds": 4.0}]
    manifest = report.write_selfgen_manifest(store, recipe, refs, stats, resumed_from=1, id_column=ID_COLUMN)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    counts = manifest["counts"]
    branches = dict(Counter(row["rejected_branch"] for row in rows))
    assert counts == {"images_in_source": 10, "rows": 6, "duplicate_rows": 0, "rejected_images": 1,
                      "dropped_pairs": {"identical": 1}, "rejected_branch": branches,
                      "chosen_finish_reason": {"eos": 6}, "images_remaining": 2}
    assert manifest["last_run"] == {"processes": 2, "already_done_at_start": 1, "images_processed": 8,
                                    "seconds": 4.0, "images_per_second": 2.0, "generated_tokens": 60,
                                    "tokens_per_second": 15.0}
    assert manifest["config"]["selfgen"]["seed"] == 5 and manifest["config"]["model"]["name_or_path"] == "tiny:llava"
    assert manifest["data_files"] == [p.relative_to(store.root).as_posix() for p in store.part_files()]
    assert len(manifest["data_files"]) == 2
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert rejects == [{"id": "broken.png", "path": "/p/broken.png", "row": None, "reason": "truncated file"}]
    assert "selfgen: 6 pairs" in capsys.readouterr().out


def test_preview_shows_the_pair_texts_and_the_corrupted_input(tmp_path):
    store, _, _, rows = selfgen_store(tmp_path / "out")
    assert {r["rejected_branch"] for r in rows} == {"hallucination", "corruption"}  # both kinds of card
    report.write_preview(store, 4, ID_COLUMN)  # more than the first part's three rows: it reads on
    page = (tmp_path / "out" / "preview.html").read_text()
    assert "(4 shown)" in page and page.count("<section>") == 4
    shown, hidden = rows[:4], rows[4:]
    for row in shown:
        assert f"<h2>{row[ID_COLUMN]} " in page
        assert html.escape(row["chosen"][0]["content"]) in page and row["rejected"][0]["content"] in page
        assert html.escape(row["caption_prompt"]) in page
    assert "<b>0</b>" not in page  # answer text is escaped, never markup
    for row in hidden:
        assert f"<h2>{row[ID_COLUMN]} " not in page
    corrupted = [r for r in shown if r["corruption"]]
    assert page.count("(rejected&#x27;s input)") == len(corrupted)
    assert page.count("<img src='data:image/jpeg;base64,") == len(shown) + len(corrupted)


# ---------------------------------------------------------------------------------------------------------
# Training stages


def test_training_report_writes_log_plot_and_summary(tmp_path):
    summary = report.write_training_report(tmp_path, {"stage": "x"}, HISTORY, report.PREFERENCE_PANELS)
    assert json.loads((tmp_path / "log_history.json").read_text()) == HISTORY
    assert json.loads((tmp_path / "run_summary.json").read_text()) == summary == {
        "stage": "x", "plot": str(tmp_path / "training_curves.png")}
    png = (tmp_path / "training_curves.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000

    quiet = tmp_path / "no_plot"
    quiet.mkdir()
    assert "plot" not in report.write_training_report(quiet, {"stage": "x"}, HISTORY, panels=None)
    assert not (quiet / "training_curves.png").exists()


def test_loss_plot_is_written_even_without_train_logs(tmp_path):
    path = report.plot_training_curves([{"train_runtime": 1.0, "step": 0}], tmp_path / "c.png",
                                       report.SFT_LOSS_PANELS, figsize=(5, 3.4))
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert report.train_logs(HISTORY) == HISTORY[:-1]


def dpo_cfg(out, **kw):
    return NS(**{"output_dir": str(out), "mode": "dpo", "dataset": "outputs/selfgen", "loss_type": ["sigmoid", "sft"],
                 "loss_weights": [1.0, 0.5], "beta": 0.1, "sft_weight": 0.5, "paper_alpha": None, "use_peft": True,
                 "plot": True, **kw})


def fake_trainer(history, steps=5, processes=1):
    return NS(state=NS(log_history=history, global_step=steps),
              accelerator=NS(num_processes=processes, distributed_type="NO"))


def test_dpo_report(tmp_path):
    recipe = NS(model=ModelSpec(name_or_path="tiny:llava"), dpo=dpo_cfg(tmp_path))
    setup = {"batch": {"processes": 1}, "projector": {"trained": False}}
    summary = report.write_dpo_report(recipe, fake_trainer(HISTORY), NS(metrics={"train_loss": 0.6}), rows=12,
                                      mean_chosen_tokens=64.0, seconds=3.26, resumed_from=None, setup=setup)
    assert json.loads((tmp_path / "run_summary.json").read_text()) == summary
    assert list(summary)[:7] == ["stage", "mode", "model", "dataset", "loss", "batch", "projector"]
    assert summary["dataset"] == {"source": "outputs/selfgen", "rows": 12, "mean_chosen_tokens": 64.0}
    assert summary["loss"]["paper_alpha_equivalent"] == 8.0  # 0.5 * 1024 / 64
    assert summary["first_log"] == HISTORY[0] and summary["last_log"] == HISTORY[-2]
    assert summary["seconds"] == 3.3 and summary["train_metrics"] == {"train_loss": 0.6}
    assert (tmp_path / "training_curves.png").exists() and summary["plot"].endswith("training_curves.png")

    # no per-step logs (or plot: false): no plot
    out = tmp_path / "empty"
    out.mkdir()
    recipe.dpo = dpo_cfg(out)
    summary = report.write_dpo_report(recipe, fake_trainer(HISTORY[-1:]), NS(metrics={}), 12, 64.0, 1.0, None)
    assert summary["first_log"] is None and "plot" not in summary and not (out / "training_curves.png").exists()


def test_projector_record():
    assert report.projector_record(NS(train_projector=False)) == {"trained": False}
    on = NS(train_projector=True, mm_projector_lr=None, learning_rate=1e-5)
    assert report.projector_record(on) == {"trained": True, "lr": 1e-5}
    on.mm_projector_lr = 2e-4
    assert report.projector_record(on) == {"trained": True, "lr": 2e-4}


SKIPPED = [{"id": "a", "reason": "missing image file /x/a.jpg"}, {"id": "b", "reason": "no assistant turn"},
           {"id": "c", "reason": "missing image file /x/c.jpg"}]


def test_skip_reasons_group_missing_images():
    assert report.skip_reasons(SKIPPED) == {"missing image file": 2, "no assistant turn": 1}


def test_infused_data_report(tmp_path):
    import datasets

    train_set = datasets.Dataset.from_list([{"id": f"r{i}", "messages": [{"role": "user", "content": f"q{i}"}],
                                             "extra": i} for i in range(25)])
    report.write_infused_data_report(tmp_path / "new", SKIPPED, train_set)
    lines = (tmp_path / "new" / "skipped_records.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == SKIPPED
    samples = [json.loads(line) for line in (tmp_path / "new" / "infused_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 20 and samples[3] == {"id": "r3", "messages": [{"role": "user", "content": "q3"}]}


def test_infuse_report(tmp_path):
    cfg = NS(output_dir=str(tmp_path), stage1_adapter="outputs/dpo", adapter_mode="continue",
             data=NS(path="mix.json"), subset=SubsetConfig(size=2, seed=0), template="T {description} {instruction}",
             train_projector=False, plot=True)
    subset = [{"source": "coco", "image": "a.jpg", "messages": [{"role": "user", "content": "what"}] * 2},
              {"source": "text", "image": None, "messages": [{"role": "user", "content": "hi"}] * 2}]
    summary = report.write_infuse_report(
        cfg, ModelSpec(name_or_path="tiny:llava"), fake_trainer(HISTORY, steps=4), NS(metrics={"m": 1}),
        usable_records=9, skipped=SKIPPED, subset=subset, undescribed=["r7"], trained_records=2,
        batch={"processes": 1}, length_check=None, seconds=10.04)
    assert json.loads((tmp_path / "run_summary.json").read_text()) == summary
    assert summary["data"] == {"source": "mix.json", "usable_records": 9, "skipped_records": 3,
                               "skipped_by_reason": {"missing image file": 2, "no assistant turn": 1}}
    assert summary["subset"]["size"] == 2 and summary["subset"]["composition"]["by_source"] == {"coco": 1, "text": 1}
    assert summary["descriptions"] == {"images": 1, "records_without_description": ["r7"]}
    assert summary["projector"] == {"trained": False} and summary["global_step"] == 4 and summary["seconds"] == 10.0
    assert json.loads((tmp_path / "log_history.json").read_text()) == HISTORY
    assert (tmp_path / "training_curves.png").read_bytes().startswith(PNG_MAGIC)


# ---------------------------------------------------------------------------------------------------------
# eval


def eval_summary(run: str, **values) -> dict:
    return {"run": run, "benchmarks": {
        name: ({"skipped": "no judge"} if value is None else {"headline": headline, "value": value, "metrics": {}})
        for name, (headline, value) in values.items()}}


def test_benchmark_summary_keeps_scalar_metrics():
    scores = {"metrics": {"f1": 0.8, "accuracy": 0.75, "per_category": {"a": 1.0}}}
    assert report.benchmark_summary("f1", scores) == {"headline": "f1", "value": 0.8,
                                                      "metrics": {"f1": 0.8, "accuracy": 0.75}}


def test_results_table_orders_converts_and_averages():
    a = eval_summary("base", pope=("f1", 0.8), mmvet=("score", None), chartqa=("accuracy", 0.3),
                     my_plugin=("score", 40.0))
    b = eval_summary("stage1", chartqa=("accuracy", 0.4), pope=("f1", 0.9))
    table = report.results_table([a, b])
    # registry order (chartqa before pope), unregistered names last; % for rates, raw values for scores;
    # the average covers only the benchmarks every run has
    assert table == ("| run | chartqa | pope | mmvet | my_plugin | average |\n|---|---|---|---|---|---|\n"
                     "| base | 30.0 | 80.0 | skipped | 40.0 | 55.0 |\n"
                     "| stage1 | 40.0 | 90.0 | not run | not run | 65.0 |\n")


def test_eval_summary_and_compare_round_trip(tmp_path, capsys):
    runs = [eval_summary("base", pope=("f1", 0.8)), eval_summary("base+dar", pope=("f1", 0.85))]
    for summary in runs:
        report.write_eval_summary(tmp_path / summary["run"], summary)
        assert json.loads((tmp_path / summary["run"] / "summary.json").read_text()) == summary
        assert (tmp_path / summary["run"] / "results.md").read_text() == report.results_table([summary])
    assert "| base | 80.0 | 80.0 |" in capsys.readouterr().out
    table = report.compare_runs([str(tmp_path / "base"), str(tmp_path / "base+dar")], str(tmp_path / "cmp.png"))
    assert table == report.results_table(runs)
    assert (tmp_path / "cmp.png").read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(FileNotFoundError, match="summary.json does not exist"):
        report.compare_runs([str(tmp_path / "nowhere")])


def test_compare_warns_when_runs_were_evaluated_in_different_precisions(tmp_path):
    runs = [{**eval_summary("base", pope=("f1", 0.8)), "precision": {"dtype": "bfloat16"}},
            {**eval_summary("stage1", pope=("f1", 0.85)), "precision": {"dtype": "float32"}},
            {**eval_summary("stage2", pope=("f1", 0.86)), "precision": {"dtype": "float32"}}]
    for summary in runs:
        report.write_eval_summary(tmp_path / summary["run"], summary)
    dirs = [str(tmp_path / s["run"]) for s in runs]
    text = report.compare_runs(dirs)
    assert text.splitlines()[0].startswith("warning: these runs were evaluated in different precisions "
                                           "(base: bfloat16, stage1: float32, stage2: float32)")
    assert text.endswith(report.results_table(runs))
    assert report.compare_runs(dirs[1:]) == report.results_table(runs[1:])  # one precision: no warning


def scored(value: float, adapters=(), dtype="float32", digest="d1", headline="f1", time="t0", **extra) -> dict:
    """A benchmark's entry as an eval writes it."""
    return {"headline": headline, "value": value, "metrics": {headline: value}, "higher_is_better": True,
            "settings": {"model": "tiny:llava", "adapters": list(adapters), "precision": dtype, "dar": False,
                         "recipe_digest": digest}, "time": time, "unreadable_images": {"count": 0, "ids": []},
            **extra}


def one_eval(**entries) -> dict:
    return {"run": "base", "model": {"name_or_path": "tiny:llava"}, "adapters": [], "dar": False,
            "precision": {"dtype": "float32"}, "benchmarks": entries}


def test_evals_of_one_run_in_separate_calls_accumulate_and_a_rerun_replaces_only_its_entry(tmp_path, capsys):
    run = tmp_path / "base"
    same = lambda name: scored(0, digest="d1")["settings"]  # noqa: E731  (this eval's settings for any benchmark)
    report.record_eval_summary(run, one_eval(pope=scored(0.8, time="t1")), same)
    report.record_eval_summary(run, one_eval(chartqa=scored(0.3, headline="accuracy", time="t2")), same)
    kept = json.loads((run / "summary.json").read_text())
    assert kept["benchmarks"] == {"pope": scored(0.8, time="t1"), "chartqa": scored(0.3, headline="accuracy",
                                                                                     time="t2")}
    assert "| base | 30.0 | 80.0 | 55.0 |" in (run / "results.md").read_text()
    # a rerun of pope replaces pope's entry only; a benchmark skipped this time keeps its earlier entry
    report.record_eval_summary(run, one_eval(pope=scored(0.9, time="t3"), chartqa={"skipped": "no judge"}), same)
    kept = json.loads((run / "summary.json").read_text())
    assert kept["benchmarks"] == {"pope": scored(0.9, time="t3"), "chartqa": scored(0.3, headline="accuracy",
                                                                                     time="t2")}
    assert "warning" not in capsys.readouterr().out
    assert not list(run.glob(".*.tmp"))  # written through a temporary file, renamed into place


def test_an_entry_made_with_other_settings_is_flagged_not_mixed_silently(tmp_path, capsys):
    run = tmp_path / "base"
    report.record_eval_summary(run, one_eval(pope=scored(0.8)), lambda n: scored(0)["settings"])
    now = scored(0, adapters=["out/dpo"], dtype="float32", digest="d2")["settings"]
    report.record_eval_summary(run, one_eval(chartqa=scored(0.3, adapters=["out/dpo"], digest="d2",
                                                            headline="accuracy")), lambda n: now)
    kept = json.loads((run / "summary.json").read_text())
    assert kept["benchmarks"]["pope"]["conflicts"] == {"adapters": [[], ["out/dpo"]], "recipe_digest": ["d1", "d2"]}
    assert "conflicts" not in kept["benchmarks"]["chartqa"]
    out = capsys.readouterr().out
    assert ("warning: base: pope's result was made with other settings than this eval (adapters: [] (now "
            "['out/dpo']), recipe_digest: d1 (now d2))") in out
    table = (run / "results.md").read_text()
    assert "| base | 30.0 | 80.0 † |" in table
    assert "† base/pope was made with other settings than the run's latest eval: adapters: [] (now" in table
    assert report.compare_runs([str(run)]) == table
    # evaluated again with this eval's settings: the flag goes
    report.record_eval_summary(run, one_eval(pope=scored(0.7, adapters=["out/dpo"], digest="d2")), lambda n: now)
    assert "†" not in (run / "results.md").read_text()
    # an entry written before settings were recorded cannot be vouched for either
    merged = report.merge_eval_summary({"run": "base", "benchmarks": {"pope": {"headline": "f1", "value": 0.5}}},
                                       one_eval(chartqa=scored(0.3)), lambda n: now)
    assert merged["benchmarks"]["pope"]["conflicts"] == {"settings": ["not recorded", "recorded"]}


def test_compare_tells_not_run_from_zero_and_from_a_status(tmp_path):
    a = one_eval(pope=scored(0.0), chartqa=scored(0.25, headline="accuracy"), mmvet={"skipped": "no judge"})
    b = {**one_eval(pope=scored(0.5), llava_bench={"status": "awaiting judge", "headline": "relative"}),
         "run": "stage1"}
    assert report.results_table([a, b]) == (
        "| run | chartqa | pope | llava_bench | mmvet | average |\n|---|---|---|---|---|---|\n"
        "| base | 25.0 | 0.0 | not run | skipped | 0.0 |\n"
        "| stage1 | not run | 50.0 | awaiting judge | not run | 50.0 |\n")


def test_the_chart_keeps_every_scored_bar_zero_included(tmp_path):
    a = one_eval(pope=scored(0.0), chartqa=scored(0.25, headline="accuracy"))
    b = {**one_eval(pope=scored(0.5), mmvet={"status": "awaiting judge"}), "run": "stage1"}
    drawn = report.plot_comparison([a, b], str(tmp_path / "cmp.png"))
    # every score is a bar, a 0 one too; a benchmark one run lacks keeps the other run's bar
    assert sorted(drawn) == sorted([("chartqa", "base", 25.0), ("pope", "base", 0.0), ("pope", "stage1", 50.0)])
    assert (tmp_path / "cmp.png").read_bytes().startswith(PNG_MAGIC)


def test_the_average_covers_metrics_of_one_direction_only():
    from stic.benchmarks import BENCHMARKS, load_plugins

    load_plugins(["stic.shapes.benchmarks"])  # registers shapes_describe (by module name: a test may have reset it)

    rate = dict(scored(0.2, headline="hallucination_rate"), higher_is_better=False)  # as its entry records it
    mixed = one_eval(shapes_describe=rate, shapes_qa=scored(0.6, headline="accuracy"))
    table = report.results_table([mixed])
    assert table.splitlines()[0] == "| run | shapes_describe ↓ | shapes_qa | average |"
    assert "| base | 20.0 | 60.0 | – |" in table  # not (20 + 60) / 2
    assert "no average: lower is better for shapes_describe, higher for the others" in table
    lower = one_eval(shapes_describe=rate, other_rate=rate)
    assert report.results_table([lower]).splitlines()[0].endswith("| average ↓ |")
    assert "| base | 20.0 | 20.0 | 20.0 |" in report.results_table([lower])
    # a plugin benchmark neither recorded nor registered: its direction is unknown, so no average either
    unknown = one_eval(pope=scored(0.8), my_plugin={"headline": "score", "value": 40.0})
    assert "| base | 80.0 | 40.0 | – |" in report.results_table([unknown])
    assert "no recorded direction for my_plugin" in report.results_table([unknown])
    # the direction is registered with each benchmark (eval records it in the entries from there)
    assert BENCHMARKS["pope"].higher_is_better and not BENCHMARKS["shapes_describe"].higher_is_better
