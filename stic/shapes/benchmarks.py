"""ShapesWorld's eval benchmarks, registered with the core's registry when this module is imported.

A recipe lists this module under `eval.plugins` (recipes/shapesworld.yaml does); `stic score` takes it as
`--plugin stic.shapes.benchmarks`. Both read `<data_root>/shapesworld/` as written by `stic shapes make-data`:
  shapes_describe  descriptions scored by the exact judge (headline: hallucination rate)
  shapes_qa        questions scored by exact match, presence questions POPE-style
"""

from __future__ import annotations

from pathlib import Path

from stic.benchmarks import Item, read_jsonl, register
from stic.shapes.judge import aggregate, score_description, score_qa
from stic.shapes.world import DEFAULT, Scene, World, load_world


def _shapes_world(d: Path) -> World:
    """The world the scenes were made in (world.yaml beside them; older splits: the default world)."""
    return load_world(d / "world.yaml") if (d / "world.yaml").exists() else DEFAULT


def load_shapes_describe(root: Path) -> list[Item]:
    d = root / "shapesworld"
    world = _shapes_world(d)
    return [Item(s["id"], str(d / "images" / f"{s['id']}.png"), world.prompts.describe, {"scene": s, "world": world})
            for s in read_jsonl(d / "scenes.jsonl")]


def score_shapes_describe(items: list[Item], answers: dict[str, str]) -> tuple[dict, dict]:
    per = {it.id: score_description(answers[it.id], Scene.from_json(it.meta["scene"]), it.meta.get("world"))
           for it in items}
    return aggregate(list(per.values())), per


def load_shapes_qa(root: Path) -> list[Item]:
    d = root / "shapesworld"
    return [Item(q["id"], str(d / "images" / q["image"]), q["question"], q) for q in read_jsonl(d / "qa.jsonl")]


def score_shapes_qa(items: list[Item], answers: dict[str, str]) -> tuple[dict, dict]:
    return score_qa([it.meta for it in items], answers)


register("shapes_describe", load_shapes_describe, score_shapes_describe, "hallucination_rate", 48,
         higher_is_better=False)
register("shapes_qa", load_shapes_qa, score_shapes_qa, "accuracy", 8)
