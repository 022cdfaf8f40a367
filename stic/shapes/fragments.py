"""Why stage 1 collapses some descriptions to fragments ("a right"): one stage-1 variant, end to end.

Runs selfgen and stage 1 of `recipes/shapesworld.yaml` (plus overrides) on a finished demo's seed-0 training
scenes, judges the adapter on the demo's held-out scenes, and prints where each preference pair first diverges
(size, position or colour/type word, by negative branch), the mean object mentions of chosen and rejected answers,
and the fragments: descriptions naming fewer than 2 objects in scenes with at least 2.

    python -m stic.shapes.fragments --demo outputs/demo --out /tmp/frag [dpo.beta=0.5 ...]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
from pathlib import Path

WORDS = {"small": "size", "large": "size", "left": "position", "right": "position", "top": "position",
         "bottom": "position", "center": "position"}


def first_divergence(chosen: str, rejected: str) -> str:
    """The kind of word at which two descriptions first differ."""
    a, b = (t.replace(",", " ,").replace(".", " .").split() for t in (chosen, rejected))
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    if a == b:
        return "same"
    if i >= min(len(a), len(b)) or {a[i], b[i]} & {",", "."}:
        return "end"  # one answer stops where the other goes on
    return WORDS.get(a[i], "colour/type")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default="outputs/demo", help="a finished demo's output folder (its scenes are reused)")
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*", help="recipe overrides for this variant, e.g. dpo.beta=0.5")
    args = ap.parse_args(argv)

    import datasets

    from stic import dpo, evaluate, selfgen
    from stic.shapes import judge as J
    from stic.shapes import world as W
    from stic.shapes.calibrate import base_for_world
    from stic.shapes.demo import base_recipe, variant, world_settings

    demo, out = Path(args.demo), Path(args.out)
    world = W.load_world(demo / "data" / "eval" / "shapesworld" / "world.yaml")
    base = base_for_world(world).resolve()
    # the overrides change the stage settings; the world's model and prompts, seed 0 and its scenes are the demo's
    recipe = variant(variant(base_recipe(args.overrides), **world_settings(world, out, base)),
                     eval={"data_root": str(demo / "data" / "eval"), "output_dir": str(out / "eval")},
                     selfgen={"images": {"path": str(demo / "seed0" / "data" / "train" / "images")}, "seed": 0},
                     dpo={"seed": 0, "report_to": [], "logging_steps": 1})
    gen, run = out / "selfgen", out / "dpo"
    selfgen.run_selfgen(variant(recipe, selfgen={"output_dir": str(gen)}))
    pairs = datasets.load_dataset("parquet", data_files=sorted(map(str, gen.glob("data/*.parquet"))),
                                  columns=["chosen", "rejected", "rejected_branch"])["train"]
    kinds, mentions = collections.Counter(), collections.defaultdict(list)
    for r in pairs:
        chosen, rejected = r["chosen"][-1]["content"], r["rejected"][-1]["content"]
        kinds[f"{r['rejected_branch']}/{first_divergence(chosen, rejected)}"] += 1
        mentions[r["rejected_branch"]].append((len(J.parse_claims(chosen, world)),
                                               len(J.parse_claims(rejected, world))))
    dpo.run_dpo(variant(recipe, dpo={"dataset": str(gen), "output_dir": str(run)}))
    summary = evaluate.run_eval(recipe, str(run), False, ["shapes_describe"])
    metrics = json.loads((out / "eval" / summary["run"] / "shapes_describe" / "scores.json").read_text())["metrics"]
    report = {"overrides": args.overrides, "first_divergence": dict(kinds),
              "object_mentions": {b: {"chosen": statistics.mean(c for c, _ in v),
                                      "rejected": statistics.mean(r for _, r in v)} for b, v in mentions.items()},
              "metrics": {k: metrics[k] for k in ("hallucination_rate", "chair_s", "recall", "fragments")}}
    (out / "fragments.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
