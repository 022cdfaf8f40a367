"""On-policy preference pairs ranked without labels (`selfgen.pair_source: grounding | self_feedback`).

For each image the model samples `selfgen.candidates` answers to the prompt it is really asked, each answer is
scored without any label, and the best-scored answer becomes the chosen one, the worst the rejected one. An image
whose best and worst scores tie (or differ by less than `min_score_gap`) gives no pair.

- grounding, the label-free core of CSR's image-relevance reward (Zhou et al. 2024, "Calibrated Self-Rewarding
  Vision Language Models") without a CLIP model: log p(y | image) - log p(y | reference image), the reference a
  corrupted copy (one of `selfgen.corruptions`, drawn per image) or a blank one. An answer the image makes likelier
  than the reference does is grounded in it; one the model would say anyway is not. Scored per token (mean), summed,
  or as the answer's least grounded claim (min_claim). Needs the model's log-probs, so the local backend.
- self_feedback, RLAIF-V's divide-and-conquer (Yu et al. 2024, "RLAIF-V: Aligning MLLMs through Open-Source AI
  Feedback for Super GPT-4V Trustworthiness") with the policy as its own judge: the answer is split into claims,
  each claim becomes a yes/no question the same model answers on the clean image (greedy, short, read as POPE
  reads answers), and the answer scores the share (or count) of its claims the model affirms.

Each candidate's text, score and the parts of its score are kept in the row (`candidates`), for the pair viewer.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from typing import Any, Callable, Sequence

from PIL import Image

from stic.config import RecipeError
from stic.generation import Output, Request, SamplingConfig, stable_seed
from stic.metrics import pope_parse

ONPOLICY_SOURCES = ("grounding", "self_feedback")

# the recipe keys each source reads besides candidate sampling; a run's identity holds only its own source's
SOURCE_KEYS = {
    "grounding": ("grounding_reference", "grounding_score"),
    "self_feedback": ("feedback_question", "feedback_score", "feedback_max_claims"),
}
SHARED_KEYS = ("candidates", "candidate_prompt", "min_score_gap")


def unused_keys(pair_source: str) -> set[str]:
    """The on-policy recipe keys that `pair_source` does not read (left out of the run's identity)."""
    every = {*SHARED_KEYS, *(key for keys in SOURCE_KEYS.values() for key in keys)}
    return every - ({*SHARED_KEYS, *SOURCE_KEYS[pair_source]} if pair_source in SOURCE_KEYS else set())

# the yes/no answers of self_feedback: greedy and short, a word or a sentence is all pope_parse reads
FEEDBACK_SAMPLING = SamplingConfig(max_new_tokens=8)


def check_backend(pair_source: str, backend: str) -> None:
    if pair_source == "grounding" and backend != "local":
        raise RecipeError(f"selfgen.pair_source grounding scores answers by the model's log-probs, which the "
                          f"{backend} generation backend does not return: use generation.backend local, or "
                          "pair_source self_feedback")


# ---------------------------------------------------------------------------------------------------------
# Claims


@dataclasses.dataclass(frozen=True)
class Claim:
    text: str
    start: int  # character span in the answer
    end: int


_BOUNDARY = re.compile(r"(?<=[.!?])\s+|;\s*|\n+")  # sentence ends, semicolons, line breaks
# ", and ...", ", a ...": a conjunction or a new noun phrase after a comma starts another claim
_CLAUSE = re.compile(r",\s+(?=(?:and|but|while|whereas|a|an|the|one|two|three|four|five|six|seven|eight|nine|ten)\s)",
                     re.I)
_LIST_MARK = re.compile(r"^\s*(?:\d+[.)]|[-*\u2022])\s*")  # "1." "2)" "-" "*" before an item
_HEADING = re.compile(r"^[A-Za-z][A-Za-z ]{0,30}:\s+")  # "Main subjects: ..." (the step-by-step prompt's labels)
_CONJUNCTION = re.compile(r"^(?:and|but|while|whereas)\s+", re.I)
_TRAILING = ".!?,;: \t"


def split_claims(text: str) -> list[Claim]:
    """The answer's claims: sentences, split further where a comma is followed by a conjunction (and, but, while)
    or a new noun phrase (a, the, two ...), without list marks, a short 'Heading:' label, a leading conjunction or
    the closing punctuation. Pieces of fewer than two words are no claims."""
    claims = []
    start = 0
    for piece_end, next_start in [*((m.start(), m.end()) for m in _BOUNDARY.finditer(text)),
                                  (len(text), len(text))]:
        sentence_start, sentence = start, text[start:piece_end]
        start = next_start
        clause_start = 0
        for m in [*_CLAUSE.finditer(sentence), None]:
            clause_end = m.start() if m else len(sentence)
            claim = _claim(sentence[clause_start:clause_end], sentence_start + clause_start)
            if claim:
                claims.append(claim)
            clause_start = m.end() if m else clause_start
    return claims


def _claim(piece: str, offset: int) -> Claim | None:
    lead = 0
    for pattern in (_LIST_MARK, _HEADING, _CONJUNCTION):
        m = pattern.match(piece[lead:])
        if m and (pattern is not _HEADING or len(m.group().split()) <= 3):
            lead += m.end()
    lead += len(piece[lead:]) - len(piece[lead:].lstrip())
    body = piece[lead:].rstrip(_TRAILING)
    if len(re.findall(r"[^\W\d_]+", body)) < 2:
        return None
    return Claim(body, offset + lead, offset + lead + len(body))


def claim_question(claim: str, template: str) -> str:
    """The yes/no question of a claim: the template with {claim}, the claim's first letter lowered unless it
    starts a name or an acronym ("The dog ..." -> "the dog ...", "NASA ..." stays)."""
    ordinary = claim[1:2].islower() or (claim[1:2] == " " and claim[:1] != "I")
    lowered = claim[:1].lower() + claim[1:] if ordinary else claim
    return template.format(claim=lowered)


def affirmed(answer: str) -> bool:
    """A yes to a claim's question, read as POPE reads answers; an empty answer affirms nothing."""
    return bool(answer.strip()) and pope_parse(answer) == "yes"


# ---------------------------------------------------------------------------------------------------------
# Scores: (score or None when the answer cannot be scored, parts that explain it) per candidate


def grounding_score(image_logps, reference_logps, claims: list[Claim], mode: str) -> tuple[float | None, dict]:
    """log p(y | image) - log p(y | reference) from two `AnswerLogprobs` of the same answer: per token (mean),
    summed (sum) or the lowest per-token margin of a claim (min_claim; no claims: the mean)."""
    margins = image_logps.token_logprobs - reference_logps.token_logprobs
    if len(margins) == 0:
        return None, {}
    per_claim = []
    if image_logps.spans is not None:
        for c in claims:
            inside = [i for i, (a, b) in enumerate(image_logps.spans) if a < c.end and b > c.start]
            if inside:
                per_claim.append({"claim": c.text, "margin": round(float(margins[inside].mean()), 4)})
    scores = {"mean": float(margins.mean()), "sum": float(margins.sum())}
    scores["min_claim"] = min((c["margin"] for c in per_claim), default=scores["mean"])
    parts = {"logp_image": round(image_logps.total, 4), "logp_reference": round(reference_logps.total, 4),
             "tokens": len(margins), "claims": per_claim}
    return scores[mode], parts


def feedback_score(claims: list[Claim], answers: list[str], mode: str) -> tuple[float | None, dict]:
    """The share (or count) of the claims whose yes/no question the model affirmed."""
    if not claims:
        return None, {"claims": []}
    verdicts = [affirmed(a) for a in answers]
    parts = {"claims": [{"claim": c.text, "answer": a, "affirmed": v} for c, a, v in zip(claims, answers, verdicts)],
             "affirmed": sum(verdicts), "asked": len(claims)}
    return (sum(verdicts) / len(claims) if mode == "share" else float(sum(verdicts))), parts


def pick_pair(scores: Sequence[float | None], min_gap: float) -> tuple[int, int] | str:
    """(best, worst) candidate indices, the earlier one on equal scores, or why the image gives no pair."""
    scored = [i for i, s in enumerate(scores) if s is not None]
    if len(scored) < 2:
        return "too_few_scored"
    best = max(scored, key=lambda i: (scores[i], -i))
    worst = min(scored, key=lambda i: (scores[i], i))
    if scores[best] == scores[worst] or scores[best] - scores[worst] < min_gap:
        return "tied_scores"
    return best, worst


# ---------------------------------------------------------------------------------------------------------
# Per image: sample, score, pick


@dataclasses.dataclass
class Ranking:
    candidates: list[Output]
    scores: list[float | None]
    parts: list[dict]
    pick: tuple[int, int] | str  # (chosen, rejected) or a drop reason
    prompt: str  # what the candidates were sampled and scored under
    reference: dict | None  # grounding on a corrupted copy: its corruption record

    def candidate_records(self) -> list[dict]:
        roles = {} if isinstance(self.pick, str) else {self.pick[0]: "chosen", self.pick[1]: "rejected"}
        return [{"text": c.text, "score": s, "role": roles.get(i, ""), "finish_reason": c.finish_reason,
                 "num_tokens": c.num_tokens, "parts": json.dumps(p, sort_keys=True)}
                for i, (c, s, p) in enumerate(zip(self.candidates, self.scores, self.parts))]


def reference_corruption(image_id: str, seed: int, specs: list[dict]) -> tuple[dict, int]:
    """The corruption (and its seed) of an image's grounding reference: drawn from (seed, image id) alone."""
    rng = random.Random(f"{seed}\x1f{image_id}\x1fgrounding reference")
    return dict(rng.choice(specs)), rng.getrandbits(31)


class OnPolicyRanker:
    """Samples k answers per image, scores them without labels and picks the pair. `engine` is a BatchGenerator
    (grounding needs its `answer_logprobs`) or anything with its `generate` (self_feedback)."""

    def __init__(self, engine, cfg, good_prompt: str, corruption_specs: list[dict]):
        self.engine, self.cfg, self.good_prompt, self.specs = engine, cfg, good_prompt, corruption_specs

    def reference(self, image_id: str, image: Image.Image) -> tuple[Image.Image, dict | None]:
        if self.cfg.grounding_reference == "blank":
            return Image.new("RGB", image.size, (128, 128, 128)), None
        from corruptions import make_corruption

        spec, seed = reference_corruption(image_id, self.cfg.seed, self.specs)
        settings = {k: v for k, v in spec.items() if k != "kind"}
        return make_corruption(spec["kind"], **settings)(image, seed)

    def __call__(self, items: list[tuple[str, Any]], caption_prompts: list[str],
                 on_batch: Callable | None = None) -> list[Ranking]:
        cfg, k = self.cfg, self.cfg.candidates
        prompts = [self.good_prompt if cfg.candidate_prompt == "good" else p for p in caption_prompts]
        # each candidate samples from its own stream, seeded by (seed, image id, j): batching changes no answer
        requests = [Request(image, prompt, stable_seed(cfg.seed, image_id, "candidate", j))
                    for (image_id, image), prompt in zip(items, prompts) for j in range(k)]
        outputs = self.engine.generate(requests, cfg.consistency_sampling, on_batch=on_batch)
        candidates = [outputs[i * k:(i + 1) * k] for i in range(len(items))]
        # each distinct non-empty answer is scored once (a peaked model repeats itself); an empty one is no candidate
        texts = [[t for t in dict.fromkeys(o.text for o in outs) if t] for outs in candidates]
        references = [None] * len(items)
        if cfg.pair_source == "grounding":
            scored, references = self._grounding(items, prompts, texts)
        else:
            scored = self._self_feedback(items, texts, on_batch)
        rankings = []
        for outs, per_text, prompt, ref in zip(candidates, scored, prompts, references):
            results = [per_text.get(o.text, (None, {})) for o in outs]
            scores = [score for score, _ in results]
            rankings.append(Ranking(outs, scores, [parts for _, parts in results],
                                    pick_pair(scores, cfg.min_score_gap), prompt, ref))
        return rankings

    def _grounding(self, items, prompts, texts) -> tuple[list[dict], list[dict | None]]:
        refs = [self.reference(image_id, image) for image_id, image in items]
        clean, reference, answers = [], [], []
        for (_, image), prompt, (ref_image, _), per_image in zip(items, prompts, refs, texts):
            for text in per_image:
                clean.append(Request(image, prompt))
                reference.append(Request(ref_image, prompt))
                answers.append(text)
        scores = iter(zip(self.engine.answer_logprobs(clean, answers), self.engine.answer_logprobs(reference, answers)))
        scored = [{t: grounding_score(*next(scores), split_claims(t), self.cfg.grounding_score) for t in per_image}
                  for per_image in texts]
        return scored, [record for _, record in refs]

    def _self_feedback(self, items, texts, on_batch) -> list[dict]:
        cfg = self.cfg
        claims = [[split_claims(t)[:cfg.feedback_max_claims] for t in per_image] for per_image in texts]
        questions = [Request(image, claim_question(c.text, cfg.feedback_question))
                     for (_, image), per_image in zip(items, claims) for per_text in per_image for c in per_text]
        answers = iter(o.text for o in self.engine.generate(questions, FEEDBACK_SAMPLING, on_batch=on_batch))
        return [{t: feedback_score(cs, [next(answers) for _ in cs], cfg.feedback_score)
                 for t, cs in zip(per_image_texts, per_image)} for per_image_texts, per_image in zip(texts, claims)]
