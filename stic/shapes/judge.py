"""The exact judge of ShapesWorld: descriptions parsed into claimed objects and scored against ground truth.

Per description, each claim "a <size> <color> <shape> at the <position>" is matched by object type
(color + shape) to the scene:
  object precision   claims of a present type / claims            (1 - CHAIR_i, the hallucination rate)
  CHAIR_s            descriptions with at least one hallucinated claim / descriptions
  recall             present types mentioned / present objects
  size accuracy      claims of a present type with the right size / claims of a present type
  position-aware precision   claims of a present type at its true position / claims
A claim without a size or position counts as wrong on that attribute.
"""

from __future__ import annotations

import functools
import re

from stic.metrics import pope_scores
from stic.shapes.world import DEFAULT, POSITIONS, Scene, World

_POS = "|".join(sorted(POSITIONS, key=len, reverse=True))


@functools.lru_cache(maxsize=8)
def _claim_pattern(colors: tuple[str, ...], shapes: tuple[str, ...]) -> re.Pattern:
    # size and position are optional: "a red circle" is still a claim that a red circle is there
    return re.compile(rf"\b(?:(small|large)\s+)?({'|'.join(colors)})\s+({'|'.join(shapes)})\b"
                      rf"(?:\s+at\s+the\s+({_POS})\b)?")


def claim_pattern(world: World | None = None) -> re.Pattern:
    w = world or DEFAULT
    return _claim_pattern(tuple(w.colors), tuple(sorted(set(w.types.values()))))


CLAIM = claim_pattern()


def parse_claims(text: str, world: World | None = None) -> list[tuple[str, str | None, str | None]]:
    """[(name, size or None, position or None)] in order of mention."""
    text = " ".join(text.lower().replace(",", " , ").replace(".", " . ").split())
    return [(f"{c} {s}", size or None, pos or None) for size, c, s, pos in claim_pattern(world).findall(text)]


def score_description(text: str, scene: Scene, world: World | None = None) -> dict:
    claims = parse_claims(text, world)
    truth = {o.name: o for o in scene.objects}
    partner = (world or DEFAULT).partner
    hallucinated = [c for c in claims if c[0] not in truth]
    matched = [c for c in claims if c[0] in truth]
    return {
        "claims": len(claims),
        "hallucinated": len(hallucinated),
        "hallucinated_names": [c[0] for c in hallucinated],
        # hallucinations that are a missing companion of an object in the scene: the co-occurrence prior
        "hallucinated_companions": sum(any(partner.get(c[0]) == o.name for o in scene.objects) for c in hallucinated),
        "mentioned": len({c[0] for c in matched}),
        "objects": len(scene.objects),
        "size_right": sum(truth[c[0]].size == c[1] for c in matched),
        "matched": len(matched),
        "position_right": sum(truth[c[0]].position == c[2] for c in matched),
    }


def aggregate(per_item: list[dict]) -> dict:
    claims = sum(p["claims"] for p in per_item)
    matched = sum(p["matched"] for p in per_item)
    n = len(per_item)
    return {
        "hallucination_rate": sum(p["hallucinated"] for p in per_item) / claims if claims else 0.0,  # CHAIR_i
        "companion_share": (sum(p.get("hallucinated_companions", 0) for p in per_item)
                            / max(1, sum(p["hallucinated"] for p in per_item))),
        "object_precision": 1 - sum(p["hallucinated"] for p in per_item) / claims if claims else 0.0,
        "chair_s": sum(p["hallucinated"] > 0 for p in per_item) / n if n else 0.0,
        "recall": sum(p["mentioned"] for p in per_item) / max(1, sum(p["objects"] for p in per_item)),
        "size_accuracy": sum(p["size_right"] for p in per_item) / matched if matched else 0.0,
        "position_precision": sum(p["position_right"] for p in per_item) / claims if claims else 0.0,
        "claims_per_description": claims / n if n else 0.0,
        # collapsed descriptions: fewer than 2 objects named in a scene that has at least 2
        "fragments": sum(p["claims"] < 2 <= p["objects"] for p in per_item),
        "descriptions": n,
    }


def normalize_answer(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def score_qa(items: list[dict], answers: dict[str, str]) -> tuple[dict, dict]:
    """Exact match after normalisation; presence questions also POPE-style (yes/no parsing as LLaVA's)."""
    per = {it["id"]: normalize_answer(answers[it["id"]]) == normalize_answer(it["answer"]) for it in items}
    presence = [it for it in items if it["kind"] == "presence"]
    out = {"accuracy": sum(per.values()) / len(per) if per else 0.0, "count": len(per)}
    if presence:
        pope = pope_scores([answers[it["id"]] for it in presence], [it["answer"] for it in presence])
        out["presence"] = {k: pope[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
        for kind in ("absent_companion", "absent_random"):  # adversarial vs random absent objects (POPE's splits)
            some = [it for it in presence if it.get("presence_kind") == kind]
            if some:
                out["presence"][f"{kind}_accuracy"] = sum(per[it["id"]] for it in some) / len(some)
    return out, per
