"""Evaluation: greedy answers to the paper's benchmarks, sharded over processes, resumable, scored.

    accelerate launch eval/run.py --recipe recipes/X.yaml --model base|stage1|stage2|PATH [--dar]
                                  [--benchmarks pope scienceqa ...]

For each benchmark the run writes, under `<eval.output_dir>/<run name>/<benchmark>/`:
  predictions.jsonl  one line per item: {"question_id", "prompt", "text"[, "description"]} — the format
                     `stic score` reads, so a run can be rescored without a model
  scores.json        the metrics and each item's result
and `summary.json` + `results.md` for the run, into which each eval merges its benchmarks' entries (score,
settings, time, unreadable images), so that a run evaluated in several calls keeps them all. Answers are
generated through the shared sharded engine (`store.run_sharded`), so a killed run resumes from the items it
already answered. The judged benchmarks are answered without a judge too: their entries wait for `stic score`
(`fill_awaiting_entry`).
"""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path

from stic.benchmarks import (MISSING_PREDICTION_FAILS, BenchmarkFileError, Item,
                             get_benchmark)
from stic.config import ModelSpec, to_dict
from stic.generation import BatchGenerator, Request, SamplingConfig
from stic.hf_benchmarks import load_benchmark
from stic.judge import (Judge, JudgeRules, judge_record, load_judge_rules, make_judge, score_llava_bench,
                        score_mmvet)
from stic.recipe import EvalConfig, Recipe  # noqa: F401  (re-exported)
from stic.recipe import parse_recipe as parse_whole_recipe
from stic.report import benchmark_summary, eval_closing_line, read_eval_summary, record_eval_summary

log = logging.getLogger("stic.eval")


def parse_recipe(data: dict, model_spec: str | None = None, dar: bool = True) -> Recipe:
    """The recipe with the sections an evaluation of `model_spec` uses built: stage 1's to find a `stage1`
    adapter, stage 2's for `stage2` and for DaR (its describe prompt and template); the others are only checked.
    Without a model_spec, both training sections are built."""
    build = ("eval",) + (("dpo",) if model_spec in ("stage1", None) else ()) + (
        ("infuse_sft",) if model_spec in ("stage2", None) or dar else ())
    return parse_whole_recipe(data, build=build)


def resolve_model(recipe: Recipe, spec: str) -> tuple[ModelSpec, list[str], str]:
    """(model config, adapters merged in order, run name) for base | stage1 | stage2 | PATH."""
    if spec == "base":
        return recipe.model, [], "base"
    if spec == "stage1":
        return recipe.model, [recipe.setting("dpo", "output_dir")], "stage1"
    if spec == "stage2":  # on the stage-1 model stage 2 trained on: the base, or a merged stage-1 folder
        from stic.infuse import default_dar_adapters, stage1_model_config

        return stage1_model_config(recipe), default_dar_adapters(recipe), "stage2"
    path = Path(spec)
    if (path / "adapter_config.json").exists():
        return recipe.model, [str(path)], path.name
    if (path / "config.json").exists():  # a merged or full model folder (a `stic merge` folder in its own dtype)
        from stic.models import merged_folder_config

        return merged_folder_config(recipe.model, str(path)), [], path.name
    raise FileNotFoundError(f"--model {spec}: not base/stage1/stage2, an adapter folder or a model folder")


def comparison_adapters(recipe: Recipe) -> list[str]:
    """The trained adapters of the recipe's models on its base (stage 1; stage 2 unless it trains on a merged
    stage-1 folder) that exist. The base's eval and every adapted model's eval judge them all, so that each model
    of one comparison runs in the same precision (`load_adapted_model`)."""
    found = [recipe.setting("dpo", "output_dir")]
    if not recipe.setting("infuse_sft", "stage1_model"):
        found += [recipe.setting("infuse_sft", "stage1_adapter"), recipe.setting("infuse_sft", "output_dir")]
    return [a for a in dict.fromkeys(found) if a and (Path(a) / "adapter_config.json").exists()]


def compared_adapters(recipe: Recipe, model_cfg: ModelSpec) -> list[str]:
    """The adapters whose updates decide the precision of a run of `model_cfg`: the recipe's, on its own base."""
    return comparison_adapters(recipe) if model_cfg.name_or_path == recipe.model.name_or_path else []


def load_eval_model(recipe: Recipe, model_cfg: ModelSpec, adapters: list[str], device):
    """(model, processor) as eval runs them: on the recipe's own base, in the one precision of its comparison
    (the model's `stic_precision` says which)."""
    from stic.models import load_for_inference

    return load_for_inference(model_cfg, adapters, device, compared_adapters(recipe, model_cfg))


def _answers_of_another_comparison(folder: Path, run_config: dict) -> bool:
    """Whether `folder` holds answers that differ from `run_config` only in the comparison they were made for (a
    base evaluated before stage 1 existed): they may be in another precision, so they are made again."""
    from stic.store import _canonical

    path = folder / "run_config.json"
    if not path.exists():
        return False
    old = json.loads(path.read_text())
    rest = lambda c: _canonical({k: v for k, v in c.items() if k != "comparison"})  # noqa: E731
    return rest(old) == rest(run_config) and _canonical(old.get("comparison")) != _canonical(run_config["comparison"])


def load_items(cfg: EvalConfig, name: str) -> list[Item]:
    """A benchmark's items: from its Hugging Face dataset (`eval.<name>.hf_dataset`) or its official files."""
    bench = get_benchmark(name)
    section = (getattr(cfg, bench.config_section),) if bench.config_section else ()  # chair: eval.chair
    source = cfg.source(name)
    items = load_benchmark(name, Path(cfg.data_root), source.hf_dataset, source.hf_config, source.split, section)
    ids = [it.id for it in items]
    if len(ids) != len(set(ids)):
        raise BenchmarkFileError(f"{name}: item ids are not unique")
    return items[: cfg.limit] if cfg.limit else items


def prediction_features():
    import datasets

    text = datasets.Value("string")
    return datasets.Features({"question_id": text, "prompt": text, "text": text, "description": text,
                              "finish_reason": text})


def answer_benchmark(recipe: Recipe, model_cfg: ModelSpec, adapters: list[str], name: str, out_dir: Path,
                     dar: bool, items: list[Item], engine_cache: dict) -> list[dict] | None:
    """Generate (or resume) the answers of one benchmark; returns the ordered predictions on the main process."""
    from stic.images import ImageRef, decode_image
    from stic.models import process_state
    from stic.store import ShardedOutput, run_sharded

    cfg = recipe.eval
    bench = get_benchmark(name)
    by_id = {it.id: it for it in items}
    answer_sampling = SamplingConfig(max_new_tokens=bench.max_new_tokens)
    if dar:  # describe and infuse exactly as stage 2 trained: the recipe's infuse_sft.describe and .template
        from stic.infuse import describe_and_respond

        stage2 = recipe.infuse_sft

    def load(item):
        return decode_image(item.image, max_pixels=2048 * 2048, max_decode_pixels=16384 * 16384)

    from stic.serving import make_engine, run_identity, served_model

    model_name = served_model(recipe.generation, model_cfg, adapters, job="eval")

    def make_worker(device):
        def local_engine():
            model, processor = load_eval_model(recipe, model_cfg, adapters, device)
            engine_cache["precision"] = model.stic_precision  # recorded in summary.json
            return BatchGenerator(model, processor, cfg.batch_size, system_prompt=model_cfg.system_prompt)

        if "engine" not in engine_cache:  # one model load per process for all benchmarks
            engine_cache["engine"] = make_engine(recipe.generation, model_name, model_cfg.system_prompt,
                                                 local_engine)
        engine = engine_cache["engine"]

        def worker(batch, on_batch):
            images = [img for _, img in batch]
            prompts = [by_id[i].prompt for i, _ in batch]
            if dar:
                pairs = describe_and_respond(engine, images, prompts, keys=[i for i, _ in batch],
                                             describe=stage2.describe, template=stage2.template, seed=stage2.seed,
                                             answer_sampling=answer_sampling, on_batch=on_batch)
                descriptions, outs = [d for d, _ in pairs], [a for _, a in pairs]
            else:
                outs = engine.generate([Request(im, p) for im, p in zip(images, prompts)], answer_sampling,
                                       on_batch=on_batch)
                descriptions = [None] * len(outs)
            rows = [{"question_id": i, "prompt": by_id[i].prompt, "text": o.text, "description": d,
                     "finish_reason": o.finish_reason} for (i, _), o, d in zip(batch, outs, descriptions)]
            return rows, []

        return worker

    refs = [ImageRef(id=it.id) for it in items]
    run_config = {"stage": "eval", "benchmark": name, "model": to_dict(model_cfg), "adapters": adapters, "dar": dar,
                  "max_new_tokens": bench.max_new_tokens,
                  # the adapters that decide the run's precision: when they change, the answers are made again
                  "comparison": compared_adapters(recipe, model_cfg)}
    if dar:
        run_config["dar"] = {"describe": to_dict(stage2.describe), "template": stage2.template, "seed": stage2.seed}
    backend = run_identity(recipe.generation, model_name)
    if backend:
        run_config["generation"] = backend
    again = _answers_of_another_comparison(out_dir / "generation", run_config)
    if again and process_state().is_main_process:
        print(f"note: {name}: the recipe's trained adapters changed since these answers were made ("
              f"{', '.join(run_config['comparison']) or 'none now'}); answering again in this comparison's precision")
    job = run_sharded(name=name, out_dir=str(out_dir / "generation"), refs=refs, run_config=run_config,
                      load=lambda ref: load(by_id[ref.id]), make_worker=make_worker, features=prediction_features(),
                      id_column="question_id", items_per_part=max(cfg.batch_size * 4, 16), overwrite=again)
    if job is None:
        return None
    import pyarrow.parquet as pq

    rows = {}
    for part in ShardedOutput(out_dir / "generation").part_files():
        for r in pq.read_table(part).to_pylist():
            rows[r["question_id"]] = r
    rejected = {e["id"]: e["reason"] for e in job.store.ledger() if e["status"] == "rejected"}
    ordered = []
    for it in items:  # the benchmark's own order: POPE pairs answers with labels by position
        if it.id in rows:
            r = rows[it.id]
            ordered.append({k: r[k] for k in ("question_id", "prompt", "text", "description") if r[k] is not None})
        else:
            # an unreadable image: scored as an empty answer so positions and counts stay aligned
            ordered.append({"question_id": it.id, "prompt": it.prompt, "text": "",
                            "error": rejected.get(it.id, "missing")})
    return ordered


def unreadable_images(predictions: list[dict], shown: int = 5) -> dict:
    """How many items answer_benchmark scored as empty answers because their image could not be read, and the
    first ids (predictions.jsonl gives each one's reason under `error`)."""
    ids = [p["question_id"] for p in predictions if "error" in p]
    return {"count": len(ids), "ids": ids[:shown]}


def entry_settings(recipe: Recipe, model_cfg: ModelSpec, adapters: list[str], name: str, dar: bool,
                   dtype: str | None) -> dict:
    """What a benchmark's entry in summary.json is made with: the model, its adapters and precision, DaR, and a
    digest of the recipe settings that decide its answers and score (the model section, the benchmark's source
    and item limit, its answer budget, DaR's describe step and template, the generation backend, and a judged
    benchmark's judge model). A benchmark no imported module registered gets no digest."""
    from stic.benchmarks import BENCHMARKS
    from stic.store import digest

    made_with = {"model": model_cfg.name_or_path, "adapters": adapters, "precision": dtype, "dar": dar,
                 "recipe_digest": None}
    if name in BENCHMARKS:
        bench, cfg = BENCHMARKS[name], recipe.eval
        decides = {"model": to_dict(model_cfg), "adapters": adapters, "source": to_dict(cfg.source(name)),
                   "limit": cfg.limit, "max_new_tokens": bench.max_new_tokens,
                   "backend": [recipe.generation.backend, recipe.generation.model],
                   "judge": cfg.judge.model if bench.score is None else None}
        if dar:
            stage2 = recipe.infuse_sft
            decides["dar"] = {"describe": to_dict(stage2.describe), "template": stage2.template, "seed": stage2.seed}
        made_with["recipe_digest"] = digest(decides)
    return made_with


def read_predictions(path: str | Path) -> list[dict]:
    """A predictions JSONL file ({question_id, text, ...} per line); a line that is not such an object, or one that
    repeats an earlier line's question_id (which answer counts would be a guess), raises BenchmarkFileError naming
    the file and lines."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkFileError(f"predictions file {path} does not exist")
    out, line_of = [], {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise BenchmarkFileError(f"{path} line {n}: not valid JSON ({err.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("question_id"), (str, int)):
            raise BenchmarkFileError(f"{path} line {n}: expected an object with a question_id (a string)")
        if not isinstance(rec.get("text", ""), str):
            raise BenchmarkFileError(f"{path} line {n}: text must be a string, got {rec['text']!r}")
        if rec["question_id"] in line_of:
            raise BenchmarkFileError(f"{path} line {n}: question_id {rec['question_id']!r} repeats line "
                                     f"{line_of[rec['question_id']]}; keep one answer per item")
        line_of[rec["question_id"]] = n
        out.append(rec)
    return out


def score_predictions(name: str, items: list[Item], predictions: list[dict], judge: Judge | None,
                      rules: JudgeRules | None = None) -> dict:
    """Metrics for a predictions list (as written to predictions.jsonl). Shared by eval/run.py and `stic score`.
    Items without a prediction make the file invalid, except for benchmarks whose official scorer counts them as
    FAILED (ScienceQA): those are scored so, and the result's `missing_predictions` counts them. A judged benchmark
    without a judge is recorded as awaiting one; its result carries `judge` (judge_record) once judged."""
    answers = {p["question_id"]: p.get("text", "") for p in predictions}
    if len(answers) < len(predictions):  # one answer would silently win over the other
        seen: dict = {}
        for k, p in enumerate(predictions, start=1):
            if p["question_id"] in seen:
                raise BenchmarkFileError(f"{name}: predictions {seen[p['question_id']]} and {k} share question_id "
                                         f"{p['question_id']!r}; keep one answer per item")
            seen[p["question_id"]] = k
    missing = [it.id for it in items if it.id not in answers]
    if missing and name not in MISSING_PREDICTION_FAILS:
        raise BenchmarkFileError(f"{name}: predictions lack {len(missing)} item(s), e.g. {missing[:3]}")
    bench = get_benchmark(name)
    if bench.score is not None:
        metrics, per = bench.score(items, answers)
    elif judge is None or not judge.available:
        why = f"no judge endpoint (${judge.cfg.base_url_env} unset)" if judge else "no judge given"
        return {"benchmark": name, "headline": bench.headline, "awaiting_judge": why}
    elif name == "llava_bench":
        metrics, per = score_llava_bench(items, answers, judge, rules)
    else:
        metrics, per = score_mmvet(items, answers, judge, rules, runs=judge.cfg.mmvet_runs)
    result = {"benchmark": name, "headline": bench.headline, "metrics": metrics, "per_item": per}
    if bench.score is None:
        result["judge"] = judge_record(judge, rules, name)
    if name in MISSING_PREDICTION_FAILS:
        result["missing_predictions"] = len(missing)
    return result


def run_eval(recipe: Recipe, model_spec: str, dar: bool, benchmarks: list[str] | None = None) -> dict | None:
    """Generate every benchmark's answers over all processes, then score them on the main process alone, and merge
    the scores into the run's summary.json (returned): the run's other benchmarks keep their entries.

    Scoring comes last, after the processes' final synchronisation (the last benchmark's `run_sharded`): the
    other ranks return as soon as generation is done, and nothing the main process does afterwards is a
    collective. An LLM judge's hundreds of HTTP calls (MM-Vet: 218) would otherwise hold the other ranks at
    the next barrier past the process group's timeout (NCCL's default: 10 min), killing the run."""
    from stic.models import process_state

    from stic.store import check_output_dir

    state = process_state()
    cfg = recipe.eval
    check_output_dir(cfg.output_dir, "eval.output_dir")
    model_cfg, adapters, run_name = resolve_model(recipe, model_spec)
    run_name += "+dar" if dar else ""
    run_dir = Path(cfg.output_dir) / run_name
    names = benchmarks or cfg.benchmarks
    judge = make_judge(cfg.judge, Path(cfg.output_dir) / "judge_cache.jsonl")
    rules = {name: load_judge_rules(name, cfg.source(name).rule_file) for name in names}  # refused before any work
    engine_cache: dict = {}
    summary = {"run": run_name, "model": to_dict(model_cfg), "adapters": adapters, "dar": dar, "benchmarks": {}}
    answered = []
    for name in names:
        # a judged benchmark is answered without a judge too (judged later by `stic score`)
        items = load_items(cfg, name)
        out = run_dir / name
        predictions = answer_benchmark(recipe, model_cfg, adapters, name, out, dar, items, engine_cache)
        if predictions is not None:  # the main process
            with open(out / "predictions.jsonl", "w") as fh:
                fh.writelines(json.dumps(p) + "\n" for p in predictions)
            answered.append((name, items, predictions))
            summary["benchmarks"][name] = None  # keeps the requested order
    precision = engine_cache.get("precision")  # the dtype the model ran in, when this run loaded one
    engine_cache.clear()  # the model is no longer needed on any process
    if not state.is_main_process:
        return None
    # a run whose answers were all resumed loaded no model this time: its answers were made in the recorded one
    precision = precision or (read_eval_summary(run_dir) or {}).get("precision")
    if precision:
        summary["precision"] = precision
    dtype = (precision or {}).get("dtype")

    def made_with(name: str) -> dict:  # the settings this eval makes (or would make) a benchmark's entry with
        return entry_settings(recipe, model_cfg, adapters, name, dar, dtype)

    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    awaiting = []
    for name, items, predictions in answered:  # no collective from here on
        scores = score_predictions(name, items, predictions, judge, rules[name])
        (run_dir / name / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")
        bench = get_benchmark(name)
        made = {"higher_is_better": bench.higher_is_better, "settings": made_with(name), "time": now,
                "unreadable_images": unreadable_images(predictions)}
        if "awaiting_judge" in scores:  # answered; scored later by `stic score`
            awaiting.append(name)
            summary["benchmarks"][name] = {"headline": scores["headline"], "value": None, "status": "awaiting judge",
                                           "awaiting_judge": scores["awaiting_judge"], **made}
            continue
        summary["benchmarks"][name] = {**benchmark_summary(bench.headline, scores), **made}
    merged = record_eval_summary(run_dir, summary, made_with)  # runs accumulate: merged into the run's summary
    print(eval_closing_line(run_dir, summary))
    if awaiting:
        print(judge_later_line(awaiting, run_dir, cfg.judge.base_url_env))
    return merged


def judge_later_line(names: list[str], run_dir: Path, base_url_env: str) -> str:
    """The closing line of a run whose judged benchmarks were answered without a judge."""
    each = " (then likewise for " + ", ".join(names[1:]) + ")" if len(names) > 1 else ""
    return (f"awaiting a judge: {', '.join(names)} (answers written). Judge later, once ${base_url_env} is set: "
            f"stic score --recipe RECIPE --benchmark {names[0]} --predictions {run_dir / names[0]}/predictions.jsonl"
            f"{each}; --judge mock: an offline stand-in, not a real score")


def fill_awaiting_entry(predictions_path: str | Path, name: str, scores: dict) -> Path | None:
    """After `stic score` judged a benchmark that an eval run left awaiting a judge: its scores.json and its
    summary.json entry (and results.md) in that run folder, updated in place under the run's lock (other entries
    and this entry's settings kept). Returns the summary's path, or None when the predictions file is not such a
    run's."""
    from stic.locks import output_lock
    from stic.report import write_atomically, results_table

    bench_dir = Path(predictions_path).resolve().parent
    run_dir = bench_dir.parent
    if bench_dir.name != name or not (run_dir / "summary.json").is_file():
        return None
    with output_lock(run_dir, wait_s=60):
        summary = read_eval_summary(run_dir)
        entry = (summary or {}).get("benchmarks", {}).get(name)
        if not isinstance(entry, dict) or "awaiting_judge" not in entry:
            return None
        (bench_dir / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")
        for key in ("awaiting_judge", "status"):
            entry.pop(key, None)
        entry.update(benchmark_summary(scores["headline"], scores))
        write_atomically(run_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
        write_atomically(run_dir / "results.md", results_table([summary]))  # `stic score` prints JSON only
    return run_dir / "summary.json"
