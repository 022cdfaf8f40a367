"""Base-model statistics of a ShapesWorld world: what a world must show before STIC is run on it.

Only the base model is measured here (no STIC run), on held-out scenes of the world, with greedy decoding:

- descriptions under the normal, careful and imaginative prompts: hallucination rate (CHAIR_i), CHAIR_s,
  recall, and the share of hallucinations that are missing companions;
- presence QA: F1, yes-ratio, and accuracy on absent companions (adversarial) against absent random objects.

    stic shapes calibrate --world recipes/shapesworld/world.yaml [--base DIR] [--scenes 1000] -o calib.json
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

# The targets a world must meet before STIC runs on it (see calibration.md)
TARGETS = {
    "normal_hallucination_rate": (0.05, 0.20),
    "normal_chair_s": (0.20, 0.60),
    "normal_recall_min": 0.80,
    "careful_over_normal_max": 0.5,
    "careful_recall_within": 0.05,
    "imaginative_over_normal_min": 3.0,
    "presence_f1": (0.60, 0.90),
    "presence_yes_ratio": (0.35, 0.65),
}


def measure(base_dir: str | Path, world, n_scenes: int = 1000, seed: int = 7_000_001, batch_size: int = 128,
            device: str = "cpu") -> dict:
    """The base's statistics on `n_scenes` fresh held-out scenes of `world`."""
    from stic.config import ModelSpec
    from stic.generation import BatchGenerator, Request, SamplingConfig
    from stic.models import load_model, load_processor
    from stic.shapes import judge as J
    from stic.shapes import world as W

    cfg = ModelSpec(name_or_path=str(base_dir), dtype="float32")
    engine = BatchGenerator(load_model(cfg, device), load_processor(cfg), batch_size=batch_size)
    rng = random.Random(seed)
    scenes = [W.sample_scene(rng, f"cal{i:05d}", world=world) for i in range(n_scenes)]
    images = [W.render(s, world) for s in scenes]
    started = time.time()
    out: dict = {"world": world.name, "world_digest": world.digest(), "scenes": n_scenes, "base": str(base_dir)}
    for key, prompt in (("normal", world.prompts.describe), ("careful", world.prompts.careful),
                        ("imaginative", world.prompts.imagine)):
        texts = [o.text for o in engine.generate([Request(im, prompt) for im in images],
                                                 SamplingConfig(max_new_tokens=48))]
        per = [J.score_description(t, s, world) for t, s in zip(texts, scenes)]
        agg = J.aggregate(per)
        out[key] = {k: round(agg[k], 4) for k in ("hallucination_rate", "chair_s", "recall", "companion_share",
                                                  "claims_per_description")}
        out[key]["fragments"] = agg["fragments"]
    qa, other = [], []  # (scene index, question): presence questions, and the other kinds (count, color, where)
    for k, s in enumerate(scenes):
        for item in W.qa_items(s, rng, world.qa.per_scene, world):
            (qa if item["kind"] in ("present", "absent_companion", "absent_random") else other).append((k, item))
    answers = [o.text for o in engine.generate([Request(images[k], it["question"]) for k, it in qa + other],
                                               SamplingConfig(max_new_tokens=8))]
    # accuracy by kind: counting needs only the image and colour only the question (one shape per colour), while
    # "where" and presence must find the named object in the image
    by_kind: dict[str, list[bool]] = {}
    for (_, it), a in zip(qa + other, answers):
        by_kind.setdefault(it["kind"], []).append(J.normalize_answer(a) == J.normalize_answer(it["answer"]))
    answers = answers[:len(qa)]
    items = [{"id": str(i), "answer": it["answer"], "kind": "presence", "presence_kind": it["kind"]}
             for i, (_, it) in enumerate(qa)]
    metrics, _ = J.score_qa(items, {str(i): a for i, a in enumerate(answers)})
    out["presence"] = {k: round(v, 4) for k, v in metrics["presence"].items()}
    out["presence"]["questions"] = len(qa)
    out["qa_accuracy_by_kind"] = {k: round(sum(v) / len(v), 4) for k, v in sorted(by_kind.items())}
    out["seconds"] = round(time.time() - started, 1)
    out["checks"] = check(out)
    return out


def check(stats: dict) -> dict:
    """Each calibration target: held or not."""
    t, n, c, i, p = TARGETS, stats["normal"], stats["careful"], stats["imaginative"], stats["presence"]
    rate = n["hallucination_rate"]
    checks = {
        "normal hallucination 5-20%": t["normal_hallucination_rate"][0] <= rate <= t["normal_hallucination_rate"][1],
        "normal CHAIR_s 20-60%": t["normal_chair_s"][0] <= n["chair_s"] <= t["normal_chair_s"][1],
        "normal recall >= 80%": n["recall"] >= t["normal_recall_min"],
        "careful hallucination <= 1/2 normal": c["hallucination_rate"] <= t["careful_over_normal_max"] * rate,
        "careful recall within 5 points": abs(c["recall"] - n["recall"]) <= t["careful_recall_within"],
        "imaginative >= 3x normal": i["hallucination_rate"] >= t["imaginative_over_normal_min"] * rate,
        "presence F1 60-90%": t["presence_f1"][0] <= p["f1"] <= t["presence_f1"][1],
        "presence yes-ratio 0.35-0.65": t["presence_yes_ratio"][0] <= p["yes_ratio"] <= t["presence_yes_ratio"][1],
        "adversarial accuracy < random-absent accuracy":
            p.get("absent_companion_accuracy", 1.0) < p.get("absent_random_accuracy", 0.0),
    }
    return checks


def base_for_world(world, cache: Path | None = None, committed: Path | None = None) -> Path:
    """The world's pretrained base: the committed checkpoint when it was pretrained in this world, else a copy
    cached by the world's digest, pretrained on first use."""
    import os

    from stic.shapes import model as M
    from stic.shapes import world as W

    committed = committed or Path(__file__).resolve().parents[2] / "models" / "shapesworld-base"
    recorded = committed / "world.yaml"
    if recorded.exists() and W.load_world(recorded).digest() == world.digest():
        return committed
    cache = cache or Path(os.environ.get("STIC_CACHE", Path.home() / ".cache" / "stic")) / "shapesworld"
    target = cache / world.digest()
    if not (target / "config.json").exists():
        tmp = cache / f".{world.digest()}-partial"
        M.pretrain(tmp, world=world)
        tmp.rename(target)
    return target


def base_calibration(base_dir: Path, world, n_scenes: int = 1000) -> dict:
    """The base's statistics, as recorded beside it (`calibration.json`, written by the first measurement) when
    they were measured in this world on at least `n_scenes` scenes; else measured now."""
    recorded = base_dir / "calibration.json"
    if recorded.exists():
        stats = json.loads(recorded.read_text())
        if stats.get("world_digest") == world.digest() and stats.get("scenes", 0) >= n_scenes:
            return stats
    stats = measure(base_dir, world, n_scenes)
    try:
        recorded.write_text(json.dumps(stats, indent=1) + "\n")
    except OSError:  # a read-only base: measured again next time
        pass
    return stats


def main(world_file: str | None, base: str | None, n_scenes: int, out: str | None) -> dict:
    from stic.shapes import world as W

    world = W.load_world(world_file)
    base_dir = Path(base) if base else base_for_world(world)
    stats = measure(base_dir, world, n_scenes)
    pre = base_dir / "pretrain.json"
    if pre.exists():
        stats["pretrain"] = json.loads(pre.read_text())
    text = json.dumps(stats, indent=1)
    if out:
        Path(out).write_text(text + "\n")
    print(text)
    return stats
