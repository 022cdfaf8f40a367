"""`make demo`: the STIC experiment in miniature on ShapesWorld, through the real stages.

For each seed: fresh unlabeled training scenes → selfgen → dpo (STIC stage 1), the controls (SFT on the
chosen answers only; continued pretraining with the same steps and schedule), then stage 2 (infuse-sft) and
QA with and without DaR. With --ablations also: hallucination-prompt negatives only, corruption negatives
only, alpha = 0, self-consistency, and twice the unlabeled images. Every model is judged on the same held-out scenes. The results are written as a
table (mean ± standard deviation over seeds), a bar chart, and an HTML page of scenes with the base and
STIC descriptions and the judge's marks.

    python -m stic.shapes.demo [--world FILE] [--seeds 0 1 2] [--train 1000] [--heldout 3000] [--out DIR]
                               [--ablations | --methods | --beyond]

`--methods` (`make demo-methods`) runs issue 23's pair constructions instead of the controls; `--beyond` (`make
demo-beyond`) issue 24's: STIC + self-question pairs, a yes:no-balanced stage 2, and 3 rounds of the better
stage-1 recipe, each pre-registered in recipes/shapesworld/hypotheses-<mode>.md.

`--world` (`make demo WORLD=FILE`) runs the experiment in another world: its base is the committed checkpoint
when that was pretrained in the same world, else pretrained once and cached by the world's digest.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import html
import io
import json
import random
import shutil
import statistics
import time
from pathlib import Path

from stic.config import load_recipe_dict

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "shapesworld.yaml"
METRICS = ["hallucination_rate", "chair_s", "recall", "size_accuracy", "position_precision"]


def base_recipe(overrides: list[str] = ()):
    """recipes/shapesworld.yaml, parsed (with any `section.key=value` overrides)."""
    from stic.recipe import parse_recipe

    return parse_recipe(load_recipe_dict(RECIPE, list(overrides)))


def variant(recipe, **sections: dict):
    """The recipe with some fields changed, section by section; a nested section takes a dict of its own:
    `variant(r, dpo={"seed": 1}, selfgen={"images": {"path": p}})`. dataclasses.replace runs each changed
    section's checks again, as parsing does."""
    def replace(obj, changes: dict):
        return dataclasses.replace(obj, **{
            key: replace(getattr(obj, key), value) if isinstance(value, dict) and dataclasses.is_dataclass(
                getattr(obj, key)) else value for key, value in changes.items()})

    return replace(recipe, sections)


def _continued_pretraining_set(train_dir: Path, out_dir: Path, seed: int, world) -> Path:
    """Pretraining-style data on the training scenes (noisy captions under the normal prompt) as prompt/chosen
    rows, for the annealing control: the same trainer, number of steps (max_steps = stage 1's) and schedule as
    stage 1, no preferences."""
    import datasets

    from stic.shapes import world as W

    rng = random.Random(seed)
    rows = []
    for line in (train_dir / "scenes.jsonl").read_text().splitlines():
        scene = W.Scene.from_json(json.loads(line))
        rows.append({"prompt": [{"role": "user", "content": world.prompts.describe}],
                     "chosen": [{"role": "assistant", "content": W.pretraining_caption(scene, rng, world=world)}],
                     "images": [str(train_dir / "images" / f"{scene.id}.png")]})
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    ds = datasets.Dataset.from_list(rows).cast_column("images", datasets.List(datasets.Image()))
    ds.to_parquet(str(out_dir / "data" / "train-0.parquet"))
    return out_dir


def world_settings(world, out: Path, base_dir: Path) -> dict:
    """The recipe changes that put the stages in `world`: its base model and its three prompts."""
    prompts = out / "prompts"
    prompts.mkdir(parents=True, exist_ok=True)
    files = {"careful_prompt.txt": world.prompts.careful, "caption_prompts.txt": world.prompts.describe,
             "hallucination_prompts.txt": world.prompts.imagine}
    for name, text in files.items():
        (prompts / name).write_text(text + "\n")
    return {"model": {"name_or_path": str(base_dir)},
            "selfgen": {"prompts": {"good_prompt_file": str(prompts / "careful_prompt.txt"),
                                    "caption_prompts_file": str(prompts / "caption_prompts.txt"),
                                    "hallucination_prompts_file": str(prompts / "hallucination_prompts.txt")}},
            "infuse_sft": {"describe": {"prompt": world.prompts.describe}}}


def step0_logp_gap(run: Path) -> dict | None:
    """Chosen and rejected log-probabilities at stage 1's first logged step (the base's, before any update)."""
    path = run / "log_history.json"
    logs = [h for h in json.loads(path.read_text()) if "logps/chosen" in h] if path.exists() else []
    if not logs:
        return None
    first = logs[0]
    return {"chosen": first["logps/chosen"], "rejected": first["logps/rejected"],
            "gap": first["logps/chosen"] - first["logps/rejected"]}


# issue 23's arms (`--methods`): tag -> (arm, changes to the seed's recipe, the STIC pairs reused or None)
METHOD_ARMS = {
    "cond": ("STIC + conditional", {"dpo": {"conditional_weight": 1.0, "anchor_weight": 1.0}}, "stic"),
    "ground": ("on-policy: grounding", {"selfgen": {"pair_source": "grounding"}}, None),
    "selffb": ("on-policy: self-feedback", {"selfgen": {"pair_source": "self_feedback"}}, None),
}
# `--ablations`: each run's tag (its folders and eval run s<seed>-<tag>), in the order of stats.ABLATION_ARMS
ABLATION_TAGS = ("hallu", "corrupt", "alpha0", "consistency", "2x")
MARGIN_SCENES = 500  # the held-out scenes H6's image-use margin is measured on (the first, in file order)

# issue 24's arms (`--beyond`, recipes/shapesworld/hypotheses-beyond.md). Self-question pairs are made from the first
# SQ_SCENES of each seed's training scenes, with greedy questions: the option's sampled questions cost ~1 s an image
# on 2 cores (base-only check in the pre-registration), too slow for 3 x 1000 scenes.
SQ_SCENES = 200
SQ_SELFGEN = {"pair_source": "self_questions",
              "question_sampling": {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 48}}
BOTH = ("shapes_describe", "shapes_qa")


def first_scenes(train_dir: Path, out_dir: Path, n: int) -> Path:
    """A folder with copies of the first n training images (file order of scenes.jsonl)."""
    if not out_dir.exists():
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for line in (train_dir / "scenes.jsonl").read_text().splitlines()[:n]:
            name = f"{json.loads(line)['id']}.png"
            shutil.copy(train_dir / "images" / name, tmp / name)
        tmp.rename(out_dir)
    return out_dir


def combine_pairs(folders: list[Path], out_dir: Path) -> Path:
    """One stage-1 dataset from several selfgen folders: the columns they share, rows concatenated (the
    dataset key takes one folder)."""
    import datasets

    if (out_dir / "data" / "train-0.parquet").exists():
        return out_dir
    parts = [datasets.load_dataset("parquet", data_dir=str(f), split="train") for f in folders]
    common = [c for c in parts[0].column_names if all(c in p.column_names for p in parts)]
    features = parts[0].select_columns(common).features
    ds = datasets.concatenate_datasets([p.select_columns(common).cast(features) for p in parts])
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(out_dir / "data" / "train-0.parquet.tmp"))
    (out_dir / "data" / "train-0.parquet.tmp").rename(out_dir / "data" / "train-0.parquet")
    return out_dir


def run_demo(seeds: list[int], n_train: int, n_heldout: int, out: Path, ablations: bool = False,
             world_file: str | None = None, calibration_scenes: int = 1000, methods: bool = False,
             beyond: bool = False) -> dict:
    from stic import dpo, evaluate, infuse, models, selfgen
    from stic.shapes import world as W
    from stic.shapes.calibrate import base_calibration, base_for_world
    from stic.shapes.stats import ABLATION_ARMS, HYPOTHESES, ci_table, confidence_intervals, judge_hypotheses

    started = time.time()
    world = W.load_world(world_file)
    out.mkdir(parents=True, exist_ok=True)
    base_dir = base_for_world(world).resolve()
    heldout_root = out / "data" / "eval"
    if not (heldout_root / "shapesworld" / "scenes.jsonl").exists():
        W.make_split(heldout_root / "shapesworld", n_heldout, seed=1_000_003, prefix="test", world=world)
    in_world = variant(variant(base_recipe(), **world_settings(world, out, base_dir)),
                       eval={"data_root": str(heldout_root), "output_dir": str(out / "eval")})

    def evaluate_model(model: str, name: str, benchmarks=("shapes_describe",), dar=False, recipe=in_world) -> dict:
        """Judge one model on the held-out scenes (a finished evaluation is reused when the demo is rerun)."""
        target = out / "eval" / name
        arm_runs.setdefault(arm_of.get(name, name), []).append(name)
        if not (target / "summary.json").exists():
            summary = evaluate.run_eval(recipe, model, dar, list(benchmarks))
            shutil.rmtree(target, ignore_errors=True)
            (out / "eval" / summary["run"]).rename(target)
        return {b: json.loads((target / b / "scores.json").read_text())["metrics"] for b in benchmarks}

    def train_once(recipe) -> None:
        """A finished training run is kept when the demo is rerun, so a killed demo resumes."""
        if not (Path(recipe.dpo.output_dir) / "run_summary.json").exists():
            dpo.run_dpo(recipe)

    results: dict[str, list[dict]] = {}
    diagnostics: dict = {}
    costs: dict = {}  # arm -> seconds of selfgen and of stage 1, summed over seeds (a resumed step counts ~0)
    stage1_of: dict = {}  # seed -> its stage1 function (round 2 of the best runs after every seed's round 1)
    arm_runs: dict[str, list[str]] = {}  # arm -> its evaluation runs, one per seed (for the paired bootstrap)
    arm_of: dict[str, str] = {}
    calibration = base_calibration(Path(base_dir), world, calibration_scenes)  # the base only, as calibration.md
    from stic.shapes.stats import BEYOND_HYPOTHESES, METHOD_HYPOTHESES

    written = BEYOND_HYPOTHESES if beyond else METHOD_HYPOTHESES if methods else HYPOTHESES
    (out / "hypotheses.md").write_text("Written before the run.\n\n" + "".join(
        f"- **{k}**: {v}\n" for k, v in written.items()))
    base_dir = str(base_dir)
    arm_of.update({"base": "base", "base+dar": "base + DaR"})
    results["base"] = [evaluate_model(base_dir, "base", ("shapes_describe", "shapes_qa"))]
    results["base + DaR"] = [evaluate_model(base_dir, "base+dar", ("shapes_qa",), dar=True)]
    for seed in seeds:
        s = out / f"seed{seed}"
        train = s / "data" / "train"
        if not (train / "scenes.jsonl").exists():
            W.make_split(train, n_train, seed=seed, prefix=f"s{seed}-", world=world)
        seeded = variant(in_world, selfgen={"images": {"path": str(train / "images")}, "seed": seed},
                         dpo={"seed": seed, "report_to": [], "logging_steps": 1},
                         infuse_sft={"report_to": [], "seed": seed})

        arm_of.update({f"s{seed}-stic": "STIC stage 1", f"s{seed}-sftpos": "control: SFT on chosen",
                       f"s{seed}-contpre": "control: continued pretraining", f"s{seed}-round2": "STIC round 2",
                       f"s{seed}-stage2": "STIC stage 2", f"s{seed}-stage2+dar": "STIC stage 2 + DaR"})
        if ablations:  # their runs pooled per arm for the paired bootstrap
            arm_of.update({f"s{seed}-{tag}": arm for tag, arm in zip(ABLATION_TAGS, ABLATION_ARMS)})

        def stage1(tag: str, changes: dict | None = None, dataset_from: str | None = None,
                   benchmarks=("shapes_describe",), s=s, seed=seed, seeded=seeded) -> dict:
            """selfgen (unless the pairs of `dataset_from` are reused), stage 1 and its evaluation, with `changes`
            to the seed's recipe (round 2's includes the model: the merged stage-1 model is the base). The seed's
            folder, number and recipe are bound when it is defined: the rounds call it after the loop has moved on."""
            gen_dir, run = s / f"selfgen-{dataset_from or tag}", s / f"dpo-{tag}"
            changes = changes or {}
            cost = costs.setdefault(arm_of.get(f"s{seed}-{tag}", tag), {"selfgen_s": 0.0, "stage1_s": 0.0})
            started = time.time()
            if dataset_from is None:
                selfgen.run_selfgen(variant(seeded, **{**changes, "selfgen": {**changes.get("selfgen", {}),
                                                                              "output_dir": str(gen_dir)}}))
            cost["selfgen_s"] += time.time() - started
            started = time.time()
            train_once(variant(seeded, model=changes.get("model", {}), dpo={
                **changes.get("dpo", {}), "dataset": str(gen_dir), "output_dir": str(run)}))
            cost["stage1_s"] += time.time() - started
            gap = step0_logp_gap(run)
            if gap is not None:  # how separable the pairs are before training (without looking at the image)
                diagnostics.setdefault("step0_logp_gap", {})[f"seed{seed}/{tag}"] = gap
            return evaluate_model(str(run), f"s{seed}-{tag}", benchmarks,
                                  recipe=variant(in_world, model=changes.get("model", {})))

        results.setdefault("STIC stage 1", []).append(stage1("stic", benchmarks=BOTH if beyond else BOTH[:1]))
        stage1_of[seed] = (s, stage1)
        stage1.seeded = seeded  # the seed's recipe, for the rounds of --beyond
        if beyond:
            run_beyond_seed(seed, s, train, seeded, stage1, evaluate_model, results, costs, arm_of)
            continue
        results.setdefault("control: SFT on chosen", []).append(
            stage1("sftpos", {"dpo": {"mode": "sft_positive"}}, "stic"))
        stage1_of[seed] = (s, stage1)
        if methods:
            for tag, (arm, changes, reuse) in METHOD_ARMS.items():
                arm_of[f"s{seed}-{tag}"] = arm
                results.setdefault(arm, []).append(stage1(tag, changes, reuse))
            continue
        cont = _continued_pretraining_set(train, s / "contpre-data", seed, world)
        run = s / "dpo-contpre"
        steps = json.loads((s / "dpo-stic" / "run_summary.json").read_text())["global_step"]
        train_once(variant(seeded, dpo={"dataset": str(cont), "output_dir": str(run), "mode": "sft_positive",
                                        "max_steps": steps}))
        results.setdefault("control: continued pretraining", []).append(evaluate_model(str(run), f"s{seed}-contpre"))
        # STIC round 2: the stage-1 model (merged) makes new pairs from the same unlabeled scenes, then stage 1 again
        merged = s / "stage1-merged"
        if not (merged / "config.json").exists():
            from stic.config import ModelSpec

            models.merge_adapter(ModelSpec(name_or_path=base_dir, dtype="float32"), str(s / "dpo-stic"), str(merged),
                              dtype="float32")
        results.setdefault("STIC round 2", []).append(stage1("round2", {"model": {"name_or_path": str(merged)}}))
        if ablations:
            arm = dict(zip(ABLATION_TAGS, ABLATION_ARMS))
            results.setdefault(arm["hallu"], []).append(stage1("hallu", {"selfgen": {"hallucination_prob": 1.0}}))
            results.setdefault(arm["corrupt"], []).append(
                stage1("corrupt", {"selfgen": {"hallucination_prob": 0.0}}))
            # alpha = 0: the DPO loss alone (the sft entry the parsed config derived from sft_weight goes too)
            results.setdefault(arm["alpha0"], []).append(stage1("alpha0", {"dpo": {
                "sft_weight": 0.0, "loss_type": ["sigmoid"], "loss_weights": [1.0]}}, "stic"))
            results.setdefault(arm["consistency"], []).append(
                stage1("consistency", {"selfgen": {"consistency_samples": 4}}))
            train2 = s / "data" / "train2x"  # a scaling point: twice the unlabeled images
            if not (train2 / "scenes.jsonl").exists():
                W.make_split(train2, 2 * n_train, seed=seed + 500, prefix=f"s{seed}x-", world=world)
            results.setdefault(arm["2x"], []).append(
                stage1("2x", {"selfgen": {"images": {"path": str(train2 / "images")}}}))
        # stage 2 on the STIC stage-1 adapter, QA with and without DaR
        s2 = s / "infuse"
        if not (s2 / "run_summary.json").exists():
            infuse.run_infuse_sft(variant(seeded, infuse_sft={
                "data": {"path": str(train / "instructions.json"), "image_folder": str(train)},
                "stage1_adapter": str(s / "dpo-stic"), "output_dir": str(s2),
                "subset": {"size": min(500, n_train), "seed": seed}}))
        results.setdefault("STIC stage 2", []).append(evaluate_model(str(s2), f"s{seed}-stage2", ("shapes_qa",)))
        results.setdefault("STIC stage 2 + DaR", []).append(
            evaluate_model(str(s2), f"s{seed}-stage2+dar", ("shapes_qa",), dar=True))

    margins = None
    if beyond:
        from stic.shapes.stats import beyond_comparisons, judge_beyond_hypotheses

        seed = seeds[0]
        s, stage1 = stage1_of[seed]
        rounds = run_beyond_rounds(seed, (s, stage1), base_dir, results, arm_of, arm_runs, diagnostics, costs)
        ci = confidence_intervals(out / "eval", arm_runs, comparisons=beyond_comparisons(),
                                  qa_file=heldout_root / "shapesworld" / "qa.jsonl")
        hypotheses = judge_beyond_hypotheses(ci)
        diagnostics["costs"] = {arm: {k: round(v, 1) if isinstance(v, float) else v for k, v in c.items()}
                                for arm, c in costs.items()}
    elif methods:
        from stic.shapes.stats import METHOD_ARMS as ARMS_JUDGED
        from stic.shapes.stats import judge_method_hypotheses, method_comparisons

        mean_rate = {tag: statistics.mean(r["shapes_describe"]["hallucination_rate"] for r in results[arm])
                     for tag, (arm, _, _) in METHOD_ARMS.items()}
        best = min(METHOD_ARMS, key=lambda tag: mean_rate[tag])  # ties: the earlier arm (min keeps the first)
        diagnostics["round2_of"] = METHOD_ARMS[best][0]
        for seed in seeds:
            s, stage1 = stage1_of[seed]
            merged = s / f"{best}-merged"
            if not (merged / "config.json").exists():
                from stic.config import ModelSpec

                models.merge_adapter(ModelSpec(name_or_path=base_dir, dtype="float32"), str(s / f"dpo-{best}"),
                                     str(merged), dtype="float32")
            _, changes, _ = METHOD_ARMS[best]
            arm_of[f"s{seed}-{best}-r2"] = "round 2 of the best"
            results.setdefault("round 2 of the best", []).append(
                stage1(f"{best}-r2", {**changes, "model": {"name_or_path": str(merged)}}))
        margins = {arm: [image_use_margins(in_world, stage1_of[seed][0] / f"dpo-{tag}", heldout_root, seed)
                         for seed in seeds] for tag, arm in (("stic", "STIC stage 1"), ("cond", "STIC + conditional"))}
        diagnostics["image_use_margin"] = {arm: [float(m.mean()) for m in ms] for arm, ms in margins.items()}
        ci = confidence_intervals(out / "eval", arm_runs, comparisons=method_comparisons(ARMS_JUDGED))
        hypotheses = judge_method_hypotheses(ci, margins, diagnostics.get("step0_logp_gap", {}))
        diagnostics["costs"] = {arm: {k: round(v, 1) for k, v in c.items()} for arm, c in costs.items()}
    else:
        from stic.shapes.stats import COMPARISONS, ablation_comparisons

        ci = confidence_intervals(out / "eval", arm_runs,
                                  comparisons=COMPARISONS + (ablation_comparisons() if ablations else []))
        hypotheses = judge_hypotheses(ci)
    extra = ""
    if beyond:
        extra = beyond_tables(results, diagnostics, rounds)
    if methods:
        extra = ("\n| arm | selfgen s | stage 1 s |\n|---|---|---|\n" + "".join(
            f"| {arm} | {c['selfgen_s']:.0f} | {c['stage1_s']:.0f} |\n" for arm, c in diagnostics["costs"].items())
            + "\nImage-use margin (nats, per seed): " + "; ".join(
                f"{arm}: {', '.join(f'{v:+.3f}' for v in vals)}"
                for arm, vals in diagnostics["image_use_margin"].items())
            + f"\nRound 2 ran on the best label-free arm: {diagnostics['round2_of']}\n")
    table = summarize(results, seeds) + extra + "\n" + ci_table(ci) + "\n" + "".join(
        f"- **{k}** ({'held' if h['held'] else 'not held' if h['held'] is False else 'not run'}): "
        f"{h['statement']}\n" for k, h in hypotheses.items())
    (out / "results.json").write_text(json.dumps({"world": world.name, "world_digest": world.digest(),
                                                  "base": str(base_dir), "seeds": seeds, "train_scenes": n_train,
                                                  "heldout_scenes": n_heldout, "calibration": calibration,
                                                  "results": results, "ci": ci, "hypotheses": hypotheses,
                                                  "diagnostics": diagnostics,
                                                  "seconds": round(time.time() - started, 1)}, indent=1) + "\n")
    (out / "results.md").write_text(table)
    plot(results, out / "results.png")
    write_page(out, seeds[0])
    curves = out / f"seed{seeds[0]}" / "dpo-stic" / "training_curves.png"
    if curves.exists():  # stage 1's loss, margin, accuracy and log-probs over steps
        shutil.copy(curves, out / "training_curves_stage1.png")
    print(table)
    print(f"demo: {time.time() - started:.0f}s; results in {out}/results.md, results.png, scenes.html, "
          "training_curves_stage1.png")
    return results


def run_beyond_seed(seed, s: Path, train: Path, seeded, stage1, evaluate_model, results, costs, arm_of) -> None:
    """One seed's arms of `--beyond`: STIC + self-questions (stage 1 on STIC's pairs and the self-question pairs of
    the first SQ_SCENES scenes), and stage 2 on STIC's stage-1 adapter with the demo's subset and a yes:no-balanced
    one of the same size."""
    from stic import infuse, selfgen
    from stic.shapes.stats import BALANCED_ARM, SQ_ARM

    arm_of.update({f"s{seed}-sticsq": SQ_ARM, f"s{seed}-stage2": "STIC stage 2", f"s{seed}-stage2bal": BALANCED_ARM})
    cost = costs.setdefault(SQ_ARM, {"selfgen_s": 0.0, "stage1_s": 0.0})
    started = time.time()
    images = first_scenes(train, s / "data" / f"train-first{SQ_SCENES}", SQ_SCENES)
    selfgen.run_selfgen(variant(seeded, selfgen={**SQ_SELFGEN, "images": {"path": str(images)},
                                                 "output_dir": str(s / "selfgen-sq")}))
    combine_pairs([s / "selfgen-stic", s / "selfgen-sq"], s / "selfgen-sticsq")
    cost["selfgen_s"] += time.time() - started
    results.setdefault(SQ_ARM, []).append(stage1("sticsq", None, "sticsq", BOTH))
    for tag, arm, balance in (("stage2", "STIC stage 2", {}), ("stage2bal", BALANCED_ARM, {"yes_no_ratio": 1.0})):
        s2 = s / f"infuse-{tag}"
        started = time.time()
        if not (s2 / "run_summary.json").exists():
            infuse.run_infuse_sft(variant(seeded, infuse_sft={
                "data": {"path": str(train / "instructions.json"), "image_folder": str(train)},
                "stage1_adapter": str(s / "dpo-stic"), "output_dir": str(s2),
                "subset": {"size": min(500, len(list((train / "images").iterdir()))), "seed": seed, **balance}}))
        costs.setdefault(arm, {"stage2_s": 0.0})["stage2_s"] += time.time() - started
        costs[arm].setdefault("yes_no", []).append(achieved_yes_no(s2))
        results.setdefault(arm, []).append(evaluate_model(str(s2), f"s{seed}-{tag}", ("shapes_qa",)))


def achieved_yes_no(stage2_dir: Path) -> dict | None:
    """The yes/no record counts of a stage-2 run's subset, before and after subset.yes_no_ratio, as its run summary
    records them (None for a run without them)."""
    summary = json.loads((Path(stage2_dir) / "run_summary.json").read_text())
    return (summary.get("subset") or {}).get("yes_no")


def run_beyond_rounds(seed, seed_run, base_dir: str, results, arm_of, arm_runs, diagnostics, costs) -> list[dict]:
    """Rounds 2 and 3 of the best stage-1 recipe (the lower mean hallucination rate of STIC stage 1 and STIC +
    self-questions; ties: STIC) on one seed, by the demo's round mechanism: round k's pairs are made by round k-1's
    merged model from the same scenes, with the same construction, then stage 1 on that merged model."""
    from stic import models, selfgen
    from stic.config import ModelSpec
    from stic.shapes.stats import SQ_ARM

    s, stage1 = seed_run
    rate = {arm: statistics.mean(r["shapes_describe"]["hallucination_rate"] for r in results[arm])
            for arm in ("STIC stage 1", SQ_ARM)}
    best = "stic" if rate["STIC stage 1"] <= rate[SQ_ARM] else "sticsq"
    diagnostics["rounds_of"] = "STIC stage 1" if best == "stic" else SQ_ARM
    arm_runs["rounds: round 1"] = [f"s{seed}-{best}"]
    table = [{"round": 1, "run": f"s{seed}-{best}", **results["STIC stage 1" if best == "stic" else SQ_ARM][0]}]
    previous_model, previous_adapter = base_dir, s / f"dpo-{best}"
    cost = costs.setdefault("rounds 2 and 3", {"merge_selfgen_s": 0.0})
    for k in (2, 3):
        started = time.time()
        merged = s / f"{best}-r{k - 1}-merged"
        if not (merged / "config.json").exists():
            models.merge_adapter(ModelSpec(name_or_path=str(previous_model), dtype="float32"), str(previous_adapter),
                                 str(merged), dtype="float32")
        tag, changes = f"{best}-r{k}", {"model": {"name_or_path": str(merged)}}
        arm_of[f"s{seed}-{tag}"] = f"rounds: round {k}"
        if best == "sticsq":  # both constructions again with the merged model, then one dataset
            for source, changes_k in (("stic", {}), ("sq", SQ_SELFGEN)):
                images = s / "data" / f"train-first{SQ_SCENES}" if source == "sq" else s / "data" / "train" / "images"
                selfgen.run_selfgen(variant(stage1.seeded, model=changes["model"], selfgen={
                    **changes_k, "images": {"path": str(images)}, "output_dir": str(s / f"selfgen-{source}-r{k}")}))
            combine_pairs([s / f"selfgen-stic-r{k}", s / f"selfgen-sq-r{k}"], s / f"selfgen-{tag}")
            cost["merge_selfgen_s"] += time.time() - started
            result = stage1(tag, changes, tag, BOTH)
        else:
            cost["merge_selfgen_s"] += time.time() - started
            result = stage1(tag, changes, None, BOTH)
        results.setdefault(f"rounds: round {k} (seed {seed})", []).append(result)
        table.append({"round": k, "run": f"s{seed}-{tag}", **result})
        previous_model, previous_adapter = merged, s / f"dpo-{tag}"
    return table


def beyond_tables(results, diagnostics, rounds: list[dict]) -> str:
    """The costs, the presence figures per arm and the per-round table, as markdown."""
    lines = ["\n| arm | seconds (summed over seeds) | achieved yes:no of the stage-2 subset |", "|---|---|---|"]
    for arm, c in diagnostics["costs"].items():
        ratio = ", ".join(f"{y['after']['yes']}:{y['after']['no']}" for y in c.get("yes_no") or [] if y
                          and y.get("after"))
        lines.append(f"| {arm} | " + ", ".join(f"{k} {v:.0f}" for k, v in c.items() if k != "yes_no")
                     + f" | {ratio or '–'} |")
    lines += ["", "| model | presence F1 % | adversarial (absent companion) acc % | yes-ratio % | QA acc % |",
              "|---|---|---|---|---|"]
    for arm, runs in results.items():
        qa = [r["shapes_qa"] for r in runs if "shapes_qa" in r]
        if qa:
            lines.append(f"| {arm} | {_fmt([q['presence']['f1'] for q in qa])} | "
                         f"{_fmt([q['presence'].get('absent_companion_accuracy', 0.0) for q in qa])} | "
                         f"{_fmt([q['presence']['yes_ratio'] for q in qa])} | {_fmt([q['accuracy'] for q in qa])} |")
    lines += ["", f"Rounds of {diagnostics['rounds_of']} (one seed):", "",
              "| round | hallucination rate % | recall % | CHAIR_s % | presence F1 % | adversarial acc % | QA acc % |",
              "|---|---|---|---|---|---|---|"]
    for row in rounds:
        d, q = row["shapes_describe"], row["shapes_qa"]
        lines.append(f"| {row['round']} | {100 * d['hallucination_rate']:.2f} | {100 * d['recall']:.2f} | "
                     f"{100 * d['chair_s']:.2f} | {100 * q['presence']['f1']:.2f} | "
                     f"{100 * q['presence'].get('absent_companion_accuracy', 0.0):.2f} | {100 * q['accuracy']:.2f} |")
    return "\n".join(lines) + "\n"


def image_use_margins(recipe, adapter_dir: Path, heldout_root: Path, seed: int,
                      n: int = MARGIN_SCENES) -> "np.ndarray":
    """Per held-out scene: log p(y | image) - log p(y | corrupted image), y the scene's true description under the
    describe prompt, for the base with the stage-1 adapter; the corruption is the one stage 1's conditional term
    trains against (`dpo.conditional_corruption`, seeded per scene)."""
    import numpy as np
    from PIL import Image

    from corruptions import make_corruption
    from stic.generation import BatchGenerator, Request, stable_seed
    from stic.models import load_for_inference
    from stic.shapes import world as W

    split = heldout_root / "shapesworld"
    world = W.load_world(split / "world.yaml") if (split / "world.yaml").exists() else W.DEFAULT
    scenes = [W.Scene.from_json(json.loads(line)) for line in (split / "scenes.jsonl").read_text().splitlines()][:n]
    spec = recipe.dpo.conditional_corruption_spec()
    corrupt = make_corruption(spec["kind"], **{k: v for k, v in spec.items() if k != "kind"})
    model, processor = load_for_inference(recipe.model, [str(adapter_dir)], "cpu")
    gen = BatchGenerator(model, processor, 32, system_prompt=recipe.model.system_prompt)
    out = []
    for start in range(0, len(scenes), 32):
        chunk = scenes[start:start + 32]
        images = [Image.open(split / "images" / f"{sc.id}.png").convert("RGB") for sc in chunk]
        answers = [W.describe(sc.objects) for sc in chunk]
        clean = [Request(im, world.prompts.describe) for im in images]
        corrupted = [Request(corrupt(im, stable_seed(seed, "margin", sc.id))[0], world.prompts.describe)
                     for im, sc in zip(images, chunk)]
        logp = lambda reqs: np.array([a.total for a in gen.answer_logprobs(reqs, answers)])  # noqa: E731
        out.append(logp(clean) - logp(corrupted))
    return np.concatenate(out)


def _fmt(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.mean(values)
    return f"{100 * mean:.2f} ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else f"{100 * mean:.2f}"


def summarize(results: dict[str, list[dict]], seeds: list[int]) -> str:
    head = ("| model | hallucination rate % | CHAIR_s % | recall % | size acc % | position-aware precision % | "
            "fragments | QA acc % | presence F1 % |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    base_rate = statistics.mean(r["shapes_describe"]["hallucination_rate"] for r in results["base"])
    for name, runs in results.items():
        desc = [r["shapes_describe"] for r in runs if "shapes_describe" in r]
        qa = [r["shapes_qa"] for r in runs if "shapes_qa" in r]
        cells = [_fmt([d[m] for d in desc]) for m in METRICS]
        frags = [d["fragments"] for d in desc if "fragments" in d]  # count per seed, mean over seeds
        cells.append(f"{statistics.mean(frags):.1f}" if frags else "–")
        cells += [_fmt([q["accuracy"] for q in qa]), _fmt([q["presence"]["f1"] for q in qa if "presence" in q])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    rel = [(1 - r["shapes_describe"]["hallucination_rate"] / base_rate) * 100 if base_rate else 0.0
           for r in results.get("STIC stage 1", [])]
    foot = (f"\nSeeds {seeds}; mean ± standard deviation over seeds. STIC stage 1 changes the hallucination rate by "
            f"{-statistics.mean(rel):+.1f}% relative to the base (per seed: {', '.join(f'{-x:+.1f}%' for x in rel)}).\n"
            if rel else "\n")
    return head + "\n".join(lines) + "\n" + foot


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, runs in results.items() if any("shapes_describe" in r for r in runs)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, metric in zip(axes, ["hallucination_rate", "recall", "position_precision"]):
        vals = [[100 * r["shapes_describe"][metric] for r in results[n] if "shapes_describe" in r] for n in names]
        ax.bar(range(len(names)), [statistics.mean(v) for v in vals],
               yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in vals], capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(metric.replace("_", " ") + " (%)")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_page(out: Path, seed: int, n: int = 24) -> None:
    """scenes.html: held-out scenes with the base and STIC descriptions, hallucinated claims marked."""
    from PIL import Image

    from stic.shapes import judge as J
    from stic.shapes import world as W

    def preds(run):
        path = out / "eval" / run / "shapes_describe" / "predictions.jsonl"
        return {p["question_id"]: p["text"] for p in map(json.loads, path.read_text().splitlines())}

    base, stic = preds("base"), preds(f"s{seed}-stic")
    split = out / "data" / "eval" / "shapesworld"
    world = W.load_world(split / "world.yaml") if (split / "world.yaml").exists() else W.DEFAULT
    scenes = [W.Scene.from_json(json.loads(l)) for l in (split / "scenes.jsonl").read_text().splitlines()]
    # scenes where the two differ first, then the rest
    scenes.sort(key=lambda sc: base[sc.id] == stic[sc.id])

    def mark(text, scene):
        truth = {o.name: o for o in scene.objects}
        parts = []
        for chunk in text.split(","):
            claims = J.parse_claims(chunk, world)
            bad = claims and claims[0][0] not in truth
            off = claims and not bad and truth[claims[0][0]].position != claims[0][2]
            style = "bad" if bad else ("off" if off else "ok")
            parts.append(f"<span class={style}>{html.escape(chunk.strip())}</span>")
        return ", ".join(parts)

    cards = []
    for sc in scenes[:n]:
        buf = io.BytesIO()
        Image.open(out / "data" / "eval" / "shapesworld" / "images" / f"{sc.id}.png").resize((144, 144), 0).save(
            buf, format="PNG")
        img = base64.b64encode(buf.getvalue()).decode()
        cards.append(f"<tr><td><img src='data:image/png;base64,{img}'></td><td>{html.escape(W.describe(sc.objects))}"
                     f"</td><td>{mark(base[sc.id], sc)}</td><td>{mark(stic[sc.id], sc)}</td></tr>")
    style = ("body{font-family:sans-serif;margin:20px}td{vertical-align:top;padding:6px;border-bottom:1px solid #ddd}"
             ".bad{background:#fbb}.off{background:#fe9}.ok{background:#dfd}img{image-rendering:pixelated}")
    (out / "scenes.html").write_text(
        f"<!doctype html><meta charset=utf-8><title>ShapesWorld: base vs STIC</title><style>{style}</style>"
        "<h1>ShapesWorld held-out scenes: base vs STIC stage 1</h1><p>Red: hallucinated object; yellow: right "
        "object, wrong position; green: correct.</p><table><tr><th>scene</th><th>ground truth</th><th>base</th>"
        f"<th>STIC (seed {seed})</th></tr>{''.join(cards)}</table>")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--heldout", type=int, default=3000)
    ap.add_argument("--world", help="world file (default: recipes/shapesworld/world.yaml)")
    ap.add_argument("--out", help="default: outputs/demo, or outputs/demo-<world name> for another world")
    ap.add_argument("--methods", action="store_true",
                    help="issue 23's arms instead of the paper's (recipes/shapesworld/hypotheses-methods.md)")
    ap.add_argument("--beyond", action="store_true",
                    help="issue 24's arms: self-question pairs, a yes:no-balanced stage 2, 3 rounds "
                         "(recipes/shapesworld/hypotheses-beyond.md)")
    ap.add_argument("--ablations", action="store_true",
                    help="also the ablations: negatives by kind, alpha = 0, self-consistency, 2x images")
    args = ap.parse_args(argv)
    out = args.out
    if out is None:
        from stic.shapes import world as W

        w = W.load_world(args.world)
        out = "outputs/demo" if w.digest() == W.DEFAULT.digest() else f"outputs/demo-{w.name}-{w.digest()}"
        out += "-methods" if args.methods else "-beyond" if args.beyond else ""
    if args.methods + args.ablations + args.beyond > 1:
        ap.error("--methods, --beyond and --ablations are separate experiments: run one at a time")
    run_demo(args.seeds, args.train, args.heldout, Path(out), ablations=args.ablations, world_file=args.world,
             methods=args.methods, beyond=args.beyond)


if __name__ == "__main__":
    main()
