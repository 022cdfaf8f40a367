"""The ShapesWorld experiment's statistics: paired bootstrap confidence intervals and pre-registered hypotheses.

Every model is judged on the same held-out scenes, so differences are paired by scene; trained arms also share
their seed's training scenes, so they are paired by seed too. One bootstrap replicate draws scenes and seeds with
replacement and recomputes each difference on that draw (a ratio metric such as the hallucination rate is
recomputed from its sums, not averaged per scene). The base model is deterministic (greedy), so its one run
stands for every seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# The hypotheses, fixed before the experiment runs (also written into results.json and the README).
HYPOTHESES = {
    "H1": "STIC stage 1 lowers the hallucination rate by at least 30% relative to the base (point estimate), "
          "with recall no more than 2 points lower (point estimate)",
    "H2": "STIC stage 1's hallucination rate is below both controls' (SFT on chosen, continued pretraining) by "
          "more than 2 bootstrap standard errors of the paired difference",
    "H3": "QA accuracy with DaR after STIC (stage 2 + DaR) is at least that of DaR on the base (point estimate "
          "of the paired difference >= 0), the direction of the paper's Table 2",
    "H4": "STIC round 2 lowers the hallucination rate below round 1 (the 95% CI of the paired difference lies "
          "below 0)",
}


def load_describe(eval_dir: Path, run: str) -> dict[str, np.ndarray]:
    """Per held-out scene (in file order): hallucinated claims, claims, mentioned objects, objects."""
    per = json.loads((eval_dir / run / "shapes_describe" / "scores.json").read_text())["per_item"]
    keys = sorted(per)
    cols = ("hallucinated", "claims", "mentioned", "objects")
    out = {c: np.array([per[k][c] for k in keys], dtype=float) for c in cols}
    out["ids"] = keys
    return out


def load_qa(eval_dir: Path, run: str) -> dict[str, np.ndarray]:
    per = json.loads((eval_dir / run / "shapes_qa" / "scores.json").read_text())["per_item"]
    keys = sorted(per)
    return {"correct": np.array([float(per[k]) for k in keys]), "ids": keys}


def _metric(data: dict, metric: str, idx: np.ndarray) -> float:
    if metric == "hallucination_rate":
        claims = data["claims"][idx].sum()
        return float(data["hallucinated"][idx].sum() / claims) if claims else 0.0
    if metric == "chair_s":
        return float((data["hallucinated"][idx] > 0).mean())
    if metric == "recall":
        return float(data["mentioned"][idx].sum() / max(1.0, data["objects"][idx].sum()))
    if metric == "qa_accuracy":
        return float(data["correct"][idx].mean())
    if metric in PRESENCE_METRICS:
        return _presence_metric(data, metric, idx)
    raise ValueError(f"unknown metric {metric}")


def paired_difference(a_runs: list[dict], b_runs: list[dict], metric: str, replicates: int = 1000,
                      seed: int = 0) -> dict:
    """a - b of `metric` (mean over seeds), with a 95% percentile CI and the bootstrap SE. A list of one run
    (the base) is used for every seed of the other side."""
    k = max(len(a_runs), len(b_runs))
    a_runs = a_runs * k if len(a_runs) == 1 else a_runs
    b_runs = b_runs * k if len(b_runs) == 1 else b_runs
    if len(a_runs) != len(b_runs):
        raise ValueError("the two arms have different numbers of seeds")
    n = len(a_runs[0]["ids"])
    if any(r["ids"] != a_runs[0]["ids"] for r in a_runs + b_runs):
        raise ValueError("the runs were not judged on the same held-out items")
    everything = np.arange(n)

    def diff(idx, seeds):
        return (np.mean([_metric(a_runs[s], metric, idx) for s in seeds])
                - np.mean([_metric(b_runs[s], metric, idx) for s in seeds]))

    point = diff(everything, range(k))
    b_point = np.mean([_metric(r, metric, everything) for r in b_runs])
    rng = np.random.default_rng(seed)
    draws = np.array([diff(rng.integers(0, n, n), rng.integers(0, k, k)) for _ in range(replicates)])
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return {"metric": metric, "difference": float(point), "ci95": [float(lo), float(hi)], "se": float(draws.std()),
            "relative": float(point / b_point) if b_point else None, "reference_value": float(b_point)}


# (name, arm a, arm b, metric): the differences the table reports; the hypotheses read some of them
COMPARISONS = [
    ("STIC stage 1 - base", "STIC stage 1", "base", "hallucination_rate"),
    ("STIC stage 1 - base (recall)", "STIC stage 1", "base", "recall"),
    ("STIC stage 1 - base (CHAIR_s)", "STIC stage 1", "base", "chair_s"),
    ("STIC stage 1 - control: SFT on chosen", "STIC stage 1", "control: SFT on chosen", "hallucination_rate"),
    ("STIC stage 1 - control: continued pretraining", "STIC stage 1", "control: continued pretraining",
     "hallucination_rate"),
    ("STIC round 2 - STIC stage 1", "STIC round 2", "STIC stage 1", "hallucination_rate"),
    ("STIC round 2 - base", "STIC round 2", "base", "hallucination_rate"),
    ("STIC stage 2 + DaR - base + DaR (QA)", "STIC stage 2 + DaR", "base + DaR", "qa_accuracy"),
    ("STIC stage 2 - base (QA)", "STIC stage 2", "base", "qa_accuracy"),
    ("base + DaR - base (QA)", "base + DaR", "base", "qa_accuracy"),
]


# `make demo-full`'s ablations, as the demo names them; not pre-registered, so their differences are reported but
# no hypothesis reads them
ABLATION_ARMS = ["ablation: hallucination negatives only", "ablation: corruption negatives only",
                 "ablation: alpha = 0", "ablation: self-consistency k=4", "ablation: 2x images"]


def comparisons_with(arms: list[str], with_recall: str, other: str) -> list[tuple[str, str, str, str]]:
    """Each arm against `with_recall` (hallucination rate and recall) and against `other` (hallucination rate)."""
    out = []
    for arm in arms:
        out += [(f"{arm} - {with_recall}", arm, with_recall, "hallucination_rate"),
                (f"{arm} - {with_recall} (recall)", arm, with_recall, "recall"),
                (f"{arm} - {other}", arm, other, "hallucination_rate")]
    return out


def ablation_comparisons() -> list[tuple[str, str, str, str]]:
    """Each ablation against full STIC stage 1 (hallucination rate and recall) and against the control to beat."""
    return comparisons_with(ABLATION_ARMS, "STIC stage 1", "control: SFT on chosen")


def confidence_intervals(eval_dir: Path, arm_runs: dict[str, list[str]], replicates: int = 1000,
                         comparisons=COMPARISONS, qa_file: Path | None = None) -> dict:
    """Each comparison whose two arms were run: {name: paired_difference}. The presence metrics read the truth
    from `qa_file` (the held-out split's qa.jsonl)."""
    out = {}
    for name, a, b, metric in comparisons:
        if a not in arm_runs or b not in arm_runs:
            continue
        load = load_qa if metric == "qa_accuracy" else load_describe
        if metric in PRESENCE_METRICS:
            load = lambda d, r: load_presence(d, r, qa_file)  # noqa: E731
        out[name] = paired_difference([load(eval_dir, r) for r in arm_runs[a]],
                                      [load(eval_dir, r) for r in arm_runs[b]], metric, replicates)
    return out


def judge_hypotheses(ci: dict) -> dict:
    """Each hypothesis: held or not, with the figures it was read from (None: its arms were not run)."""
    def get(name):
        return ci.get(name)

    out = {}
    h, r = get("STIC stage 1 - base"), get("STIC stage 1 - base (recall)")
    out["H1"] = None if not (h and r) else {
        "held": bool(h["relative"] is not None and -h["relative"] >= 0.30 and r["difference"] >= -0.02),
        "relative_reduction": -h["relative"] if h["relative"] is not None else None,
        "recall_difference": r["difference"]}
    c1, c2 = get("STIC stage 1 - control: SFT on chosen"), get("STIC stage 1 - control: continued pretraining")
    out["H2"] = None if not (c1 and c2) else {
        "held": bool(all(c["difference"] < -2 * c["se"] for c in (c1, c2))),
        "margins_in_se": [c["difference"] / c["se"] if c["se"] else None for c in (c1, c2)]}
    d = get("STIC stage 2 + DaR - base + DaR (QA)")
    out["H3"] = None if not d else {"held": bool(d["difference"] >= 0), "difference": d["difference"],
                                    "ci95": d["ci95"]}
    r2 = get("STIC round 2 - STIC stage 1")
    out["H4"] = None if not r2 else {"held": bool(r2["ci95"][1] < 0), "difference": r2["difference"],
                                     "ci95": r2["ci95"]}
    return {k: ({"statement": HYPOTHESES[k], **v} if v else {"statement": HYPOTHESES[k], "held": None})
            for k, v in out.items()}


def ci_table(ci: dict) -> str:
    lines = ["| difference | metric | value (points) | 95% CI | relative to the reference |", "|---|---|---|---|---|"]
    for name, d in ci.items():
        rel = f"{100 * d['relative']:+.1f}%" if d["relative"] is not None else "–"
        lines.append(f"| {name} | {d['metric']} | {100 * d['difference']:+.2f} | "
                     f"[{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}] | {rel} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# `make demo-methods` (issue 23): pre-registered in recipes/shapesworld/hypotheses-methods.md

METHOD_HYPOTHESES = {
    "H5": "at least one label-free construction (STIC + conditional, on-policy grounding, on-policy self-feedback, "
          "or the round 2 of the best) has a hallucination rate below SFT on chosen by more than 2 bootstrap "
          "standard errors of the paired difference, with recall no more than 2 points below it (point estimate)",
    "H6": "conditional preference raises the image-use margin (log p(y | image) - log p(y | corrupted image), y the "
          "true description) more than plain DPO: the 95% CI of STIC + conditional - STIC stage 1 lies above 0",
    "H7": "the grounding arm's pairs have a smaller step-0 log-prob gap (chosen - rejected) than STIC's pairs in "
          "every seed",
}
LABEL_FREE_ARMS = ["STIC + conditional", "on-policy: grounding", "on-policy: self-feedback"]
METHOD_ARMS = LABEL_FREE_ARMS + ["round 2 of the best"]


def method_comparisons(arms: list[str]) -> list[tuple[str, str, str, str]]:
    """Each new arm against the control to beat (hallucination rate and recall) and against STIC stage 1."""
    return comparisons_with(arms, "control: SFT on chosen", "STIC stage 1")


def paired_bootstrap_arrays(a: list[np.ndarray], b: list[np.ndarray], replicates: int = 1000, seed: int = 0) -> dict:
    """mean(a) - mean(b) of per-item values, one array per seed on the same items: a 95% percentile CI and SE from
    resampling items and seeds, as paired_difference does for the judge's metrics."""
    k, n = len(a), len(a[0])
    if len(b) != k or any(len(x) != n for x in a + b):
        raise ValueError("the two arms differ in seeds or items")
    A, B = np.stack(a), np.stack(b)
    point = float(A.mean() - B.mean())
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(replicates):
        idx, seeds = rng.integers(0, n, n), rng.integers(0, k, k)
        draws.append(A[seeds][:, idx].mean() - B[seeds][:, idx].mean())
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return {"difference": point, "ci95": [float(lo), float(hi)], "se": float(np.std(draws))}


def judge_method_hypotheses(ci: dict, margins: dict | None, step0: dict) -> dict:
    """H5-H7 from the comparisons, the image-use margins ({arm: [per-scene array per seed]}) and the step-0 gaps
    ({"seed<s>/<tag>": {"gap": ...}})."""
    out: dict = {}
    holds = {}
    for arm in METHOD_ARMS:
        h, r = ci.get(f"{arm} - control: SFT on chosen"), ci.get(f"{arm} - control: SFT on chosen (recall)")
        if h and r:
            holds[arm] = {"held": bool(h["difference"] < -2 * h["se"] and r["difference"] >= -0.02),
                          "margin_in_se": h["difference"] / h["se"] if h["se"] else None,
                          "recall_difference": r["difference"]}
    out["H5"] = {"held": any(v["held"] for v in holds.values()), "arms": holds} if holds else None
    if margins and "STIC + conditional" in margins and "STIC stage 1" in margins:
        d = paired_bootstrap_arrays(margins["STIC + conditional"], margins["STIC stage 1"])
        out["H6"] = {"held": bool(d["ci95"][0] > 0), **d}
    else:
        out["H6"] = None
    seeds = sorted({k.split("/")[0] for k in step0})
    pairs = [(step0.get(f"{s}/ground"), step0.get(f"{s}/stic")) for s in seeds]
    pairs = [(g["gap"], st["gap"]) for g, st in pairs if g and st]
    out["H7"] = {"held": all(g < st for g, st in pairs), "gaps": pairs} if pairs else None
    return {k: ({"statement": METHOD_HYPOTHESES[k], **v} if v else {"statement": METHOD_HYPOTHESES[k], "held": None})
            for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------
# `make demo-beyond` (issue 24): pre-registered in recipes/shapesworld/hypotheses-beyond.md

BEYOND_HYPOTHESES = {
    "H8": "adding self-questioning pairs to STIC's pairs (one stage-1 dataset) raises shapes_qa's presence F1 and "
          "adversarial (absent-companion) accuracy over STIC stage 1 alone and over the base: the 95% CI of each of "
          "the four paired differences lies above 0",
    "H9": "a yes:no-balanced stage-2 subset (infuse_sft.subset.yes_no_ratio: 1.0) moves the presence yes-ratio "
          "toward 0.5 compared with the demo's stage 2 (95% CI of the difference in |yes-ratio - 0.5| below 0) "
          "without losing QA accuracy (95% CI lower bound of the accuracy difference above -1 point)",
    "H10": "three rounds of the best stage-1 recipe lower the hallucination rate: round 3 - round 1 on seed 0 has "
           "its 95% CI below 0",
}
SQ_ARM = "STIC + self-questions"
BALANCED_ARM = "STIC stage 2, yes:no 1:1"
QA_METRICS = ("presence_f1", "absent_companion_accuracy")


def beyond_comparisons() -> list[tuple[str, str, str, str]]:
    out = []
    for ref in ("STIC stage 1", "base"):
        out += [(f"{SQ_ARM} - {ref} ({m})", SQ_ARM, ref, m) for m in QA_METRICS]
    out += [(f"STIC stage 1 - base ({m})", "STIC stage 1", "base", m) for m in QA_METRICS]
    out += [(f"{SQ_ARM} - STIC stage 1", SQ_ARM, "STIC stage 1", "hallucination_rate"),
            (f"{SQ_ARM} - STIC stage 1 (QA)", SQ_ARM, "STIC stage 1", "qa_accuracy"),
            (f"{BALANCED_ARM} - STIC stage 2 (yes_ratio_distance)", BALANCED_ARM, "STIC stage 2",
             "yes_ratio_distance"),
            (f"{BALANCED_ARM} - STIC stage 2 (yes_ratio)", BALANCED_ARM, "STIC stage 2", "yes_ratio"),
            (f"{BALANCED_ARM} - STIC stage 2 (QA)", BALANCED_ARM, "STIC stage 2", "qa_accuracy"),
            (f"{BALANCED_ARM} - STIC stage 2 (absent_companion_accuracy)", BALANCED_ARM, "STIC stage 2",
             "absent_companion_accuracy"),
            ("rounds: round 2 - round 1", "rounds: round 2", "rounds: round 1", "hallucination_rate"),
            ("rounds: round 3 - round 1", "rounds: round 3", "rounds: round 1", "hallucination_rate"),
            ("rounds: round 3 - round 1 (recall)", "rounds: round 3", "rounds: round 1", "recall")]
    return out


def load_presence(eval_dir: Path, run: str, qa_file: Path) -> dict:
    """Per presence question of shapes_qa (in id order): the model said yes (POPE's parsing, as the reported F1
    and yes-ratio), the truth is yes, the answer was right (exact match, as the reported accuracies), and whether
    it asks about an absent companion (the adversarial kind)."""
    from stic.metrics import pope_parse

    truth = {q["id"]: q for q in map(json.loads, qa_file.read_text().splitlines()) if q.get("kind") == "presence"}
    per = json.loads((eval_dir / run / "shapes_qa" / "scores.json").read_text())["per_item"]
    said = {p["question_id"]: p["text"] for p in
            map(json.loads, (eval_dir / run / "shapes_qa" / "predictions.jsonl").read_text().splitlines())}
    keys = sorted(truth)
    return {"said_yes": np.array([pope_parse(said[k]) == "yes" for k in keys], dtype=float),
            "is_yes": np.array([truth[k]["answer"] != "no" for k in keys], dtype=float),
            "correct": np.array([float(per[k]) for k in keys]),
            "companion": np.array([truth[k].get("presence_kind") == "absent_companion" for k in keys]),
            "ids": keys}


def _presence_metric(data: dict, metric: str, idx: np.ndarray) -> float:
    said, truth = data["said_yes"][idx], data["is_yes"][idx]
    if metric == "presence_f1":
        tp, fp, fn = (said * truth).sum(), (said * (1 - truth)).sum(), ((1 - said) * truth).sum()
        return float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0
    if metric == "absent_companion_accuracy":
        mask = data["companion"][idx]
        return float(data["correct"][idx][mask].mean()) if mask.any() else 0.0
    if metric == "yes_ratio":
        return float(said.mean())
    if metric == "yes_ratio_distance":
        return float(abs(said.mean() - 0.5))
    raise ValueError(f"unknown metric {metric}")


PRESENCE_METRICS = ("presence_f1", "absent_companion_accuracy", "yes_ratio", "yes_ratio_distance")


def judge_beyond_hypotheses(ci: dict) -> dict:
    """H8-H10 from the comparisons of beyond_comparisons()."""
    out: dict = {}
    h8 = {name: ci.get(name) for name in (f"{SQ_ARM} - {ref} ({m})" for ref in ("STIC stage 1", "base")
                                           for m in QA_METRICS)}
    out["H8"] = None if not all(h8.values()) else {
        "held": all(d["ci95"][0] > 0 for d in h8.values()),
        "differences": {name: {"difference": d["difference"], "ci95": d["ci95"]} for name, d in h8.items()}}
    dist = ci.get(f"{BALANCED_ARM} - STIC stage 2 (yes_ratio_distance)")
    acc = ci.get(f"{BALANCED_ARM} - STIC stage 2 (QA)")
    out["H9"] = None if not (dist and acc) else {
        "held": bool(dist["ci95"][1] < 0 and acc["ci95"][0] > -0.01),
        "yes_ratio_distance": {"difference": dist["difference"], "ci95": dist["ci95"]},
        "qa_accuracy": {"difference": acc["difference"], "ci95": acc["ci95"]}}
    r3 = ci.get("rounds: round 3 - round 1")
    out["H10"] = None if not r3 else {"held": bool(r3["ci95"][1] < 0), "difference": r3["difference"],
                                      "ci95": r3["ci95"]}
    return {k: ({"statement": BEYOND_HYPOTHESES[k], **v} if v else {"statement": BEYOND_HYPOTHESES[k], "held": None})
            for k, v in out.items()}
