import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from stic.benchmarks import BENCHMARKS, PAPER_BENCHMARKS, BenchmarkFileError
from stic.config import load_recipe_dict
from stic.evaluate import load_items, parse_recipe, run_eval, score_predictions
from stic.report import compare_runs
from tests.conftest import die_on_call, send_json

REPO = Path(__file__).resolve().parent.parent


def recipe_dict(root, out, **ev):
    e = {"data_root": str(root), "output_dir": str(out), "batch_size": 4}
    e.update(ev)
    return {"model": {"name_or_path": "tiny:llava", "dtype": "float32"}, "eval": e}


class FakeJudge(BaseHTTPRequestHandler):
    calls = []
    delay_s = 0.0  # seconds each answer takes (a slow judge)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(FakeJudge.delay_s)
        FakeJudge.calls.append({"auth": self.headers.get("Authorization"), "body": body})
        prompt = body["messages"][-1]["content"]  # after the system message, when there is one
        # MM-Vet's requests end "Score:" (the toolkit's wording) or with the open table row (the official prompt)
        text = "0.6" if prompt.rstrip().endswith(("Score:", "|")) else "8 6\nAssistant 2 is shorter."
        send_json(self, 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode())

    def log_message(self, *a):
        pass


@pytest.fixture
def judge_server(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeJudge.calls, FakeJudge.delay_s = [], 0.0
    monkeypatch.setenv("STIC_JUDGE_BASE_URL", f"http://127.0.0.1:{server.server_port}/v1")
    monkeypatch.setenv("STIC_JUDGE_API_KEY", "sk-test-secret-123")
    yield server
    server.shutdown()


def test_every_benchmark_runs_end_to_end(tmp_path, eval_root, judge_server):
    out = tmp_path / "runs"
    summary = run_eval(parse_recipe(recipe_dict(eval_root, out)), "base", dar=False)
    assert set(summary["benchmarks"]) == set(PAPER_BENCHMARKS)
    for name, entry in summary["benchmarks"].items():
        assert "skipped" not in entry, name
        scores = json.loads((out / "base" / name / "scores.json").read_text())
        preds = [json.loads(line) for line in (out / "base" / name / "predictions.jsonl").read_text().splitlines()]
        items = load_items(parse_recipe(recipe_dict(eval_root, out)).eval, name)
        assert [p["question_id"] for p in preds] == [it.id for it in items]  # the benchmark's own order
        assert set(scores["per_item"]) == {it.id for it in items}
    assert summary["benchmarks"]["scienceqa"]["metrics"]["count"] == 3  # IMG questions only
    assert summary["benchmarks"]["llava_bench"]["value"] == pytest.approx(75.0)  # fake judge: 8 vs 6
    assert summary["benchmarks"]["mmvet"]["value"] == pytest.approx(60.0)
    assert "| base |" in (out / "base" / "results.md").read_text()
    # the judge got the key in the header only; it is written nowhere
    assert FakeJudge.calls and all(c["auth"] == "Bearer sk-test-secret-123" for c in FakeJudge.calls)
    for f in out.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".jsonl", ".md"):
            assert "sk-test-secret-123" not in f.read_text(errors="ignore"), f
    # judge answers are cached: rescoring asks nothing new
    n = len(FakeJudge.calls)
    run_eval(parse_recipe(recipe_dict(eval_root, out)), "base", dar=False, benchmarks=["llava_bench", "mmvet"])
    assert len(FakeJudge.calls) == n


def test_without_a_judge_judged_benchmarks_are_answered_then_judged_later_by_stic_score(tmp_path, eval_root,
                                                                                         monkeypatch, capsys):
    from stic.cli import main as stic_main
    from stic.judge import JudgeRulesError

    import dataclasses

    monkeypatch.delenv("STIC_JUDGE_BASE_URL", raising=False)
    for name in ("mmvet", "llava_bench"):  # short answers: 512 tokens of the tiny model take a minute here
        monkeypatch.setitem(BENCHMARKS, name, dataclasses.replace(BENCHMARKS[name], max_new_tokens=4))
    out = tmp_path / "r"
    with pytest.raises(JudgeRulesError, match="eval.mmvet.rule_file .* does not exist"):  # before any answer
        run_eval(parse_recipe(recipe_dict(eval_root, out, mmvet={"rule_file": str(tmp_path / "none.txt")})),
                 "base", dar=False, benchmarks=["pope", "mmvet"])
    assert not out.exists()
    summary = run_eval(parse_recipe(recipe_dict(eval_root, out, limit=2)), "base", dar=False,
                       benchmarks=["mmvet", "pope", "llava_bench"])
    for name, n in (("mmvet", 1), ("llava_bench", 2)):
        entry = summary["benchmarks"][name]
        assert entry["value"] is None and "STIC_JUDGE_BASE_URL unset" in entry["awaiting_judge"]
        assert len((out / "base" / name / "predictions.jsonl").read_text().splitlines()) == n
    assert summary["benchmarks"]["pope"]["value"] is not None
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("awaiting a judge: mmvet, llava_bench") and "stic score --recipe" in printed[-1]
    assert "| awaiting judge |" in (out / "base" / "results.md").read_text()

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(eval_root, out, limit=2)))
    argv = ["score", "--recipe", str(recipe), "--benchmark", "mmvet",
            "--predictions", str(out / "base" / "mmvet" / "predictions.jsonl")]

    def score(*more) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exit_:
            stic_main(argv + list(more))
        captured = capsys.readouterr()
        return exit_.value.code, captured.out, captured.err

    code, _, err = score()  # still no judge: one line, exit 2
    assert code == 2 and "set $STIC_JUDGE_BASE_URL, or pass --judge mock" in err and err.count("\n") == 1
    code, _, err = score("--judge", "mock", f"eval.mmvet.rule_file={tmp_path / 'none.txt'}")
    assert code == 2 and "does not exist" in err and err.count("\n") == 1
    code, printed, err = score("--judge", "mock")
    assert code == 0 and json.loads(printed)["judge"]["model"] == "mock"
    saved = json.loads((out / "base" / "summary.json").read_text())
    assert saved["benchmarks"]["mmvet"]["value"] == json.loads(printed)["metrics"]["total"]
    assert "awaiting_judge" not in saved["benchmarks"]["mmvet"]
    assert "awaiting_judge" in saved["benchmarks"]["llava_bench"]  # still unjudged
    results = (out / "base" / "results.md").read_text()
    assert "- mmvet (base): mock judge: not a real score" in results and "| awaiting judge |" in results


def test_official_rules_reach_the_judge_endpoint_as_the_official_scripts_send_them(tmp_path, eval_root, judge_server):
    from stic.evaluate import EvalConfig
    from stic.judge import JudgeConfig, load_judge_rules, make_judge

    (tmp_path / "rule.json").write_text(json.dumps({f"llava_bench_{c}": {"role": "Assistant", "prompt": f"Rate ({c})."}
                                                    for c in ("conv", "detail", "complex")}))
    (tmp_path / "grader.txt").write_text("Grade it.\nQuestion | Ground truth | Prediction | Correctness\n")
    cfg = EvalConfig(data_root=str(eval_root), judge=JudgeConfig(mmvet_runs=2))
    judge = make_judge(cfg.judge, tmp_path / "cache.jsonl")
    totals = {}
    for name, path in (("llava_bench", "rule.json"), ("mmvet", "grader.txt")):
        items = load_items(cfg, name)
        scores = score_predictions(name, items, [{"question_id": it.id, "text": "a red block"} for it in items],
                                   judge, load_judge_rules(name, str(tmp_path / path)))
        totals[name] = scores["metrics"][scores["headline"]]
        assert scores["judge"]["comparable"] and scores["judge"]["model"] == "gpt-4-0613"
    llava, mmvet = FakeJudge.calls[:2], FakeJudge.calls[2:]
    assert all(c["body"]["messages"][0]["role"] == "system" and c["body"]["max_tokens"] == 1024
               and c["body"]["temperature"] == 0.2 for c in llava)
    assert len(mmvet) == 2 and all(len(c["body"]["messages"]) == 1 and c["body"]["max_tokens"] == 3 for c in mmvet)
    assert totals == pytest.approx({"llava_bench": 75.0, "mmvet": 60.0})  # two runs of 0.6 averaged


def test_rescoring_a_predictions_file_gives_the_same_scores(tmp_path, eval_root, capsys):
    from stic.cli import main as stic_main

    out = tmp_path / "runs"
    run_eval(parse_recipe(recipe_dict(eval_root, out)), "base", dar=False,
             benchmarks=["pope", "textvqa", "mmbench", "chartqa", "mathvista", "scienceqa"])
    capsys.readouterr()
    for name in ("pope", "textvqa", "mmbench", "chartqa", "mathvista", "scienceqa"):
        saved = json.loads((out / "base" / name / "scores.json").read_text())
        argv = ["score", "--benchmark", name, "--predictions", str(out / "base" / name / "predictions.jsonl"),
                "--data-root", str(eval_root)]
        if name == "pope":  # the command as a user runs it, once; the rest in-process (each start costs seconds)
            res = subprocess.run([sys.executable, "-m", "stic", *argv], cwd=REPO, capture_output=True, text=True)
            assert res.returncode == 0, res.stderr[-2000:]
            printed = res.stdout
        else:
            try:
                stic_main(argv)
            except SystemExit as exit_:
                assert not exit_.code, capsys.readouterr().err[-2000:]
            printed = capsys.readouterr().out
        assert json.loads(printed)["metrics"] == saved["metrics"], name


def test_predictions_that_lack_items_are_refused(eval_root):
    items = load_items(parse_recipe(recipe_dict(eval_root, "x")).eval, "textvqa")
    with pytest.raises(BenchmarkFileError, match="lack 1 item"):
        score_predictions("textvqa", items, [{"question_id": "1", "text": "x"}, {"question_id": "2", "text": "y"}],
                          None)


def test_two_evals_of_one_run_keep_both_and_unreadable_images_are_counted(tmp_path, eval_root, capsys):
    """`--benchmarks pope`, then `--benchmarks mmbench` in another call: summary.json keeps both. An item whose
    image cannot be decoded is still scored (as an empty answer), and is counted and named in its entry and in the
    eval's last printed line."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(eval_root, root)
    (root / "pope" / "val2014" / "COCO_val2014_000000000121.jpg").write_bytes(b"not a jpeg")  # adversarial/2
    recipe = parse_recipe(recipe_dict(root, tmp_path / "runs", limit=2))
    run_eval(recipe, "base", dar=False, benchmarks=["pope"])
    first_last_line = capsys.readouterr().out.strip().splitlines()[-1]
    summary = run_eval(recipe, "base", dar=False, benchmarks=["mmbench"])
    second_last_line = capsys.readouterr().out.strip().splitlines()[-1]
    kept = json.loads((tmp_path / "runs" / "base" / "summary.json").read_text())
    assert kept == summary and list(kept["benchmarks"]) == ["pope", "mmbench"]
    assert first_last_line.startswith("eval base: scored pope into ") and first_last_line.endswith(
        "; 1 item(s) had an unreadable image and were scored as empty answers: pope 1 (adversarial/2)")
    assert second_last_line.endswith("every image was read")
    pope, mmbench = kept["benchmarks"]["pope"], kept["benchmarks"]["mmbench"]
    assert pope["unreadable_images"] == {"count": 1, "ids": ["adversarial/2"]}
    assert mmbench["unreadable_images"] == {"count": 0, "ids": []}
    assert pope["value"] is not None and mmbench["value"] is not None
    # both made with the same settings, so neither is flagged
    assert pope["settings"] == {**mmbench["settings"], "recipe_digest": pope["settings"]["recipe_digest"]}
    assert pope["settings"]["precision"] == "float32" and "conflicts" not in pope
    assert "| base | " in (tmp_path / "runs" / "base" / "results.md").read_text()


def test_a_repeated_question_id_is_refused_naming_the_lines(tmp_path, eval_root):
    from stic.evaluate import read_predictions

    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps({"question_id": q, "text": t}) + "\n"
                            for q, t in [("adversarial/1", "yes"), ("adversarial/2", "no"), ("adversarial/1", "no")]))
    with pytest.raises(BenchmarkFileError, match=r"line 3: question_id 'adversarial/1' repeats line 1"):
        read_predictions(path)
    items = load_items(parse_recipe(recipe_dict(eval_root, "x")).eval, "pope")
    twice = [{"question_id": it.id, "text": "yes"} for it in items] + [{"question_id": items[0].id, "text": "no"}]
    with pytest.raises(BenchmarkFileError, match=f"predictions 1 and {len(items) + 1} share question_id"):
        score_predictions("pope", items, twice, None)


def test_killed_eval_resumes_from_answered_items(tmp_path, eval_root, monkeypatch):
    from stic import store

    r = parse_recipe(recipe_dict(eval_root, tmp_path / "runs", batch_size=1))
    real = die_on_call(monkeypatch, store.ShardedOutput, "write_rows", 2)  # dies writing POPE's answers
    with pytest.raises(KeyboardInterrupt):
        run_eval(r, "base", dar=False, benchmarks=["scienceqa", "pope"])
    monkeypatch.setattr(store.ShardedOutput, "write_rows", real)
    assert (tmp_path / "runs" / "base" / "scienceqa" / "predictions.jsonl").exists()
    done = store.ShardedOutput(tmp_path / "runs" / "base" / "scienceqa" / "generation").row_ids("question_id")
    summary = run_eval(r, "base", dar=False, benchmarks=["scienceqa", "pope"])
    again = store.ShardedOutput(tmp_path / "runs" / "base" / "scienceqa" / "generation").row_ids("question_id")
    assert sorted(again) == sorted(done)  # nothing regenerated
    pope_ids = store.ShardedOutput(tmp_path / "runs" / "base" / "pope" / "generation").row_ids("question_id")
    assert len(pope_ids) == len(set(pope_ids)) == 9
    assert summary["benchmarks"]["pope"]["value"] is not None


def test_malformed_benchmark_file_stops_eval_in_one_line(tmp_path, eval_root, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(eval_root, root)
    (root / "mathvista" / "testmini.json").write_text('{"1": {"pid": "1"')
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(recipe_dict(root, tmp_path / "o")))
    # in this process (the command's own entry point is run as a subprocess by the tests of `make eval`)
    assert eval_run_module().main(["--recipe", str(r), "--benchmarks", "mathvista"]) == 2
    assert "testmini.json: not valid JSON" in one_error_line(capsys.readouterr().err)


def test_dar_mode_and_compare(tmp_path, eval_root):
    out = tmp_path / "runs"
    plain = run_eval(parse_recipe(recipe_dict(eval_root, out)), "base", dar=False, benchmarks=["pope", "chartqa"])
    dar_recipe = {**recipe_dict(eval_root, out), "infuse_sft": {"describe": {"sampling": {"max_new_tokens": 6}}}}
    dar = run_eval(parse_recipe(dar_recipe), "base", dar=True, benchmarks=["pope", "chartqa"])
    assert dar["run"] == "base+dar"
    preds = [json.loads(line) for line in (out / "base+dar" / "pope" / "predictions.jsonl").read_text().splitlines()]
    assert all("description" in p for p in preds)
    table = compare_runs([str(out / "base"), str(out / "base+dar")], str(tmp_path / "cmp.png"))
    assert "| base |" in table and "| base+dar |" in table and "average" in table
    assert (tmp_path / "cmp.png").stat().st_size > 5_000
    assert plain["benchmarks"]["pope"]["headline"] == "f1"


def test_two_processes_give_the_same_predictions_and_scores(tmp_path, eval_root):
    from tests.test_selfgen import free_port

    names = ["pope", "mmbench", "chartqa"]
    one = run_eval(parse_recipe(recipe_dict(eval_root, tmp_path / "one")), "base", dar=False, benchmarks=names)
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(recipe_dict(eval_root, tmp_path / "two")))
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(REPO / "recipes/accelerate/ddp.yaml"), "--num_processes", "2", "--main_process_port",
                          str(free_port()), "eval/run.py", "--recipe", str(r), "--benchmarks", *names],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in names:
        a = (tmp_path / "one" / "base" / name / "predictions.jsonl").read_text()
        b = (tmp_path / "two" / "base" / name / "predictions.jsonl").read_text()
        assert a == b, name
    two = json.loads((tmp_path / "two" / "base" / "summary.json").read_text())
    untimed = lambda entries: {n: {k: v for k, v in e.items() if k != "time"} for n, e in entries.items()}  # noqa: E731
    assert untimed(two["benchmarks"]) == untimed(json.loads(json.dumps(one["benchmarks"])))
    parts = list((tmp_path / "two" / "base" / "pope" / "generation" / "data").glob("*.parquet"))
    assert {p.name.split("-")[2] for p in parts} == {"r000", "r001"}


def test_slow_judge_scoring_outlasts_the_process_group_timeout(tmp_path, eval_root, judge_server, monkeypatch):
    """Scoring with the judge (hundreds of calls on MM-Vet) takes longer than a collective may wait: every benchmark
    is generated first and only the main process scores, with no collective after, so the other ranks never wait
    on it. Here the process-group timeout is 8 s and the judge's answer to the one MM-Vet item takes 12 s."""
    from tests.test_selfgen import free_port

    FakeJudge.delay_s = 12.0
    monkeypatch.setenv("STIC_DIST_TIMEOUT_S", "8")
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(recipe_dict(eval_root, tmp_path / "o", limit=2)))
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(REPO / "recipes/accelerate/ddp.yaml"), "--num_processes", "2", "--main_process_port",
                          str(free_port()), "eval/run.py", "--recipe", str(r), "--benchmarks", "mmvet", "pope"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "o" / "base" / "summary.json").read_text())
    assert summary["benchmarks"]["mmvet"]["value"] == pytest.approx(60.0)  # the fake judge's 0.6
    assert summary["benchmarks"]["pope"]["value"] is not None
    assert len(FakeJudge.calls) == 1  # asked by the main process only


def test_eval_section_is_strict(tmp_path, eval_root):
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"eval": {"benchmarks": ["pope", "vqav2"]}}))
    from stic.config import RecipeError

    with pytest.raises(RecipeError, match="vqav2"):
        parse_recipe(load_recipe_dict(r))


def test_adapter_and_merged_folder_give_the_same_answers(tmp_path, eval_root):
    from stic.config import ModelSpec
    from stic.models import merge_adapter
    from tests.test_infuse import make_adapter

    make_adapter(tmp_path / "adapter", scale=0.05)
    merge_adapter(ModelSpec(name_or_path="tiny:llava", dtype="float32"), str(tmp_path / "adapter"),
                  str(tmp_path / "merged"))
    r = parse_recipe(recipe_dict(eval_root, tmp_path / "runs"))
    a = run_eval(r, str(tmp_path / "adapter"), dar=False, benchmarks=["pope"])
    m = run_eval(r, str(tmp_path / "merged"), dar=False, benchmarks=["pope"])
    base = run_eval(r, "base", dar=False, benchmarks=["pope"])
    assert a["adapters"] == [str(tmp_path / "adapter")] and m["adapters"] == []
    # summary.json records the precision each ran in
    assert a["precision"]["dtype"] == m["precision"]["dtype"] == base["precision"]["dtype"] == "float32"
    read = lambda run: (tmp_path / "runs" / run / "pope" / "predictions.jsonl").read_text()
    assert read("adapter") == read("merged")
    assert read("adapter") != read("base")  # the adapter was applied
    assert base["run"] == "base"


@pytest.mark.parametrize("stored", ["float16", "bfloat16"])
def test_base_and_stage1_are_evaluated_in_one_precision_that_keeps_the_update(tmp_path, stored):
    """A stage-1-sized update (rms 1e-5) on a base stored as hub checkpoints are (std-0.02 weights in fp16 or bf16),
    with the paper recipes' model.dtype bfloat16. The base->stage-1 logit change that eval sees must be the exact
    one: in bf16 the update rounds away (or, on an fp16 base, drowns in rounding noise ~10x its size), and
    switching precision between the two runs moves the logits by more than the adapter does."""
    from peft import PeftModel

    from stic.config import ModelSpec
    from stic.evaluate import load_eval_model, resolve_model
    from stic.models import load_model
    from tests.conftest import stage1_sized_adapter, stored_like_the_hub
    from tests.test_models import logits

    base_dir = stored_like_the_hub(tmp_path, "llava", stored)
    stage1_sized_adapter(base_dir, tmp_path / "dpo")
    recipe = parse_recipe({"model": {"name_or_path": str(base_dir), "dtype": "bfloat16"},
                           "dpo": {"output_dir": str(tmp_path / "dpo")}, "eval": {"output_dir": str(tmp_path / "e")}},
                          "base", dar=False)
    seen = {}
    for spec in ("base", "stage1"):
        model_cfg, adapters, _ = resolve_model(recipe, spec)
        model, processor = load_eval_model(recipe, model_cfg, adapters, "cpu")
        seen[spec] = (logits(model, processor), model.stic_precision["dtype"])
    exact32 = ModelSpec(name_or_path=str(base_dir), dtype="float32")
    base32 = logits(load_model(exact32), processor)
    exact = logits(PeftModel.from_pretrained(load_model(exact32), str(tmp_path / "dpo")).merge_and_unload(),
                   processor) - base32
    change = seen["stage1"][0] - seen["base"][0]
    assert float((change - exact).norm() / exact.norm()) < 0.05
    assert seen["base"][1] == seen["stage1"][1] == "float32"


def test_a_base_evaluated_before_stage1_existed_is_answered_again_in_the_comparisons_precision(
        tmp_path, eval_root, capsys):
    from tests.conftest import stage1_sized_adapter, stored_like_the_hub

    base_dir = stored_like_the_hub(tmp_path, "llava", "bfloat16")
    data = {"model": {"name_or_path": str(base_dir), "dtype": "bfloat16"},
            "dpo": {"output_dir": str(tmp_path / "dpo")},
            "eval": {"data_root": str(eval_root), "output_dir": str(tmp_path / "runs"), "batch_size": 4, "limit": 2}}
    first = run_eval(parse_recipe(data, "base", dar=False), "base", dar=False, benchmarks=["pope"])
    assert first["precision"]["dtype"] == "bfloat16"  # nothing trained yet: the recipe's dtype
    stage1_sized_adapter(base_dir, tmp_path / "dpo")
    stage1 = run_eval(parse_recipe(data, "stage1", dar=False), "stage1", dar=False, benchmarks=["pope"])
    assert stage1["precision"]["dtype"] == "float32"  # bf16 would erase the update
    capsys.readouterr()
    again = run_eval(parse_recipe(data, "base", dar=False), "base", dar=False, benchmarks=["pope"])
    assert "answering again in this comparison's precision" in capsys.readouterr().out
    assert again["precision"]["dtype"] == "float32"
    assert "warning" not in compare_runs([str(tmp_path / "runs" / r) for r in ("base", "stage1")])


def test_eval_dar_prompts_exactly_as_stage2_trains(tmp_path, eval_root, monkeypatch):
    """For one record, eval's DaR and stage-2 training build the same describe prompt and infused question."""
    from stic.generation import BatchGenerator
    from stic.infuse import infuse_record
    from stic.infuse import parse_recipe as stage2_recipe

    template = "Context from the picture: {description}\n\nQuestion: {instruction}"
    data = {**recipe_dict(eval_root, tmp_path / "runs", limit=2),
            "infuse_sft": {"template": template, "seed": 7, "describe": {"sampling": {"max_new_tokens": 5}}}}
    seen = []
    real = BatchGenerator.generate

    def recording(self, requests, sampling, *args, **kwargs):
        outs = real(self, requests, sampling, *args, **kwargs)
        seen.append(([r.prompt for r in requests], [o.text for o in outs], sampling.max_new_tokens))
        return outs

    monkeypatch.setattr(BatchGenerator, "generate", recording)
    run_eval(parse_recipe(data), "base", dar=True, benchmarks=["pope"])
    (describe_prompts, descriptions, describe_tokens), (answer_prompts, _, _) = seen[:2]
    stage2 = stage2_recipe(data).infuse_sft
    items = load_items(parse_recipe(data).eval, "pope")
    for k, item in enumerate(items[:len(describe_prompts)]):
        # stage 2 draws a caption-pool prompt per image from its seed; DaR draws the same for the same key
        assert describe_prompts[k] == stage2.describe.prompt_for(item.id, stage2.seed)
        record = {"id": item.id, "image": item.id, "image_path": item.image,
                  "messages": [{"role": "user", "content": item.prompt}, {"role": "assistant", "content": "yes"}]}
        trained = infuse_record(record, descriptions[k], stage2.template)["messages"][0]["content"]
        assert answer_prompts[k] == trained and trained.startswith("Context from the picture: ")
    assert describe_tokens == 5


# ---------------------------------------------------------------------------------------------------------
# eval/run.py: its command line, and its errors as one line


def eval_run_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_run_under_test", REPO / "eval" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_error_line(err: str, prog: str = "eval") -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: ")]  # not progress bars etc.
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: ") and "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.mark.parametrize("error", ["OutputConflict", "ImageSourceError", "JudgeUnavailable"])
def test_eval_prints_toolkit_errors_as_one_line(tmp_path, eval_root, monkeypatch, capsys, error):
    from stic.images import ImageSourceError
    from stic.judge import JudgeUnavailable
    from stic.store import OutputConflict

    cls = {"OutputConflict": OutputConflict, "ImageSourceError": ImageSourceError,
           "JudgeUnavailable": JudgeUnavailable}[error]
    run = eval_run_module()

    def failing_run_eval(*args, **kwargs):
        raise cls(f"simulated {error}")

    monkeypatch.setattr(run, "run_eval", failing_run_eval)
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(recipe_dict(eval_root, tmp_path / "o")))
    assert run.main(["--recipe", str(r), "--benchmarks", "pope"]) == 2
    assert one_error_line(capsys.readouterr().err) == f"eval: error: simulated {error}"


def test_eval_refuses_a_run_folder_of_another_configuration_in_one_line(tmp_path, eval_root, capsys):
    out = tmp_path / "o"
    generation = out / "base" / "pope" / "generation"
    generation.mkdir(parents=True)
    (generation / "run_config.json").write_text(json.dumps({"stage": "eval", "benchmark": "pope", "dar": True}))
    from stic.store import ShardedOutput

    (generation / ".ledger").mkdir()
    ShardedOutput(generation).log([{"id": "q0", "status": "rejected"}])  # it holds work (a folder without is reused)
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(recipe_dict(eval_root, out)))
    assert eval_run_module().main(["--recipe", str(r), "--benchmarks", "pope"]) == 2
    assert "already holds a run made with a different configuration" in one_error_line(capsys.readouterr().err)


def test_benchmarks_option_leaves_dotted_overrides_alone(tmp_path, eval_root, monkeypatch, capsys):
    run = eval_run_module()
    calls = []
    monkeypatch.setattr(run, "run_eval", lambda recipe, model, dar, benchmarks: calls.append((recipe, benchmarks)))
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(recipe_dict(eval_root, tmp_path / "o")))
    assert run.main(["--recipe", str(r), "--benchmarks", "pope", "chartqa", "eval.limit=2", "eval.batch_size=3"]) == 0
    assert run.main(["--recipe", str(r), "eval.limit=5", "--benchmarks", "pope,chartqa", "--dar", "eval.limit=2"]) == 0
    for recipe, benchmarks in calls:
        assert benchmarks == ["pope", "chartqa"] and recipe.eval.limit == 2
    assert calls[0][0].eval.batch_size == 3
    assert run.main(["--recipe", str(r), "--benchmarks", "pope", "popee", "vqa2"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "popee" in line and "vqa2" in line and "known: " + ", ".join(BENCHMARKS) in line
    assert len(calls) == 2


def test_make_eval_passes_overrides_after_benchmarks_and_refuses_unknown_ones(tmp_path, eval_root):
    # run as a top-level make even when the suite itself runs under `make test`
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(recipe_dict(tmp_path / "nowhere", tmp_path / "out")))

    def make_eval(eval_args, args=""):
        return subprocess.run(["make", "--no-print-directory", "eval", f"RECIPE={r}", f"EVAL_ARGS={eval_args}",
                               f"ARGS={args}"], cwd=REPO, capture_output=True, text=True, env=env)

    # the override must reach the recipe: the missing file it names is under the overridden data_root
    res = make_eval("--benchmarks pope", f"eval.data_root={tmp_path / 'elsewhere'}")
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("eval: error: ")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert str(tmp_path / "elsewhere" / "pope") in errors[0] and "nowhere" not in errors[0]
    # an unknown benchmark is refused before any work, naming it and the known ones
    res = make_eval("--benchmarks pope popee")
    errors = [line for line in res.stderr.splitlines() if line.startswith("eval: error: ")]
    assert res.returncode != 0 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "popee" in errors[0] and "known: " + ", ".join(PAPER_BENCHMARKS) in errors[0]  # the recipe names no plugin
    assert not (tmp_path / "out").exists()
