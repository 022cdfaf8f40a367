"""An LLM judge through any OpenAI-compatible chat endpoint, for LLaVA-Bench and MM-Vet.

The endpoint and key come from environment variables (names configurable); the key is sent only in the
request header (by the `openai` client) and never printed, logged or saved. Failed calls follow the retry rules
of the generation backend (stic/serving.py): 429, 5xx, timeouts and lost connections are retried with backoff,
401/403 never. Every answer is cached on disk by a hash of (model, prompt, temperature), so rescoring costs
nothing and a killed run loses no paid call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
from pathlib import Path

from stic import metrics as M
from stic.config import option
from stic.errors import SticError


@dataclasses.dataclass
class JudgeConfig:
    base_url_env: str = option("STIC_JUDGE_BASE_URL", help="the variable holding the judge's base URL, e.g. "
                                                           "https://api.openai.com/v1")
    api_key_env: str = option("STIC_JUDGE_API_KEY", help="the variable holding the judge's API key")
    model: str = option("gpt-4-0613", help="the judge model (LLaVA-Bench, MM-Vet)")
    timeout_s: float = option(120.0, help="seconds for one judge request, sent to fully answered")
    max_retries: int = option(3, help="tries of a judge request in all, the first included (at least 1)")

    def __post_init__(self):
        if self.max_retries < 1:  # 0 would send no request at all
            raise ValueError(f"max_retries counts every try, the first included: at least 1, got {self.max_retries}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")


class JudgeUnavailable(SticError, RuntimeError):
    """No judge endpoint is configured, or it keeps failing."""


class Judge:
    def __init__(self, cfg: JudgeConfig, cache_path: str | Path):
        self.cfg = cfg
        self.base_url = os.environ.get(cfg.base_url_env, "").rstrip("/")
        self._key_env = cfg.api_key_env
        self.cache_path = Path(cache_path)
        self.cache: dict[str, str] = {}
        if self.cache_path.exists():
            for line in self.cache_path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    self.cache[rec["key"]] = rec["response"]
                except (json.JSONDecodeError, KeyError):
                    continue

    @property
    def available(self) -> bool:
        return bool(self.base_url)

    def __repr__(self) -> str:  # never show the key
        return f"Judge(model={self.cfg.model!r}, endpoint={'set' if self.base_url else 'unset'})"

    def ask(self, prompt: str, temperature: float) -> str:
        key = hashlib.sha256(json.dumps([self.cfg.model, prompt, temperature]).encode()).hexdigest()
        if key in self.cache:
            return self.cache[key]
        if not self.available:
            raise JudgeUnavailable(f"no judge endpoint: set {self.cfg.base_url_env}")
        text = self._call(prompt, temperature)
        self.cache[key] = text
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.cache_path, "a") as fh:
            fh.write(json.dumps({"key": key, "response": text}) + "\n")
        return text

    def _call(self, prompt: str, temperature: float) -> str:
        return asyncio.run(self._call_with_deadline(prompt, temperature))

    async def _call_with_deadline(self, prompt: str, temperature: float) -> str:
        import openai
        from openai import AsyncOpenAI

        from stic.serving import backoff_seconds, describe_error, raise_if_final, retry_kind

        client = AsyncOpenAI(base_url=self.base_url, api_key=os.environ.get(self._key_env) or "EMPTY",
                             timeout=self.cfg.timeout_s, max_retries=0)
        try:
            for attempt in range(self.cfg.max_retries):
                try:
                    # the client's timeout bounds each read (a server trickling bytes never trips it): the whole
                    # request gets the deadline
                    resp = await asyncio.wait_for(client.chat.completions.create(
                        model=self.cfg.model, temperature=temperature,
                        messages=[{"role": "user", "content": prompt}]), self.cfg.timeout_s)
                    return resp.choices[0].message.content or ""
                except asyncio.TimeoutError:
                    last = f"no complete reply within eval.judge.timeout_s ({self.cfg.timeout_s:g} s)"
                except openai.APIError as err:  # the client's errors, sorted by the shared retry rules
                    raise_if_final(err, retry_kind(err), f"judge endpoint ${self.cfg.base_url_env}", self._key_env,
                                   self.cfg.model, JudgeUnavailable, JudgeUnavailable)
                    last = describe_error(err, self._key_env)
                if attempt + 1 < self.cfg.max_retries:
                    await asyncio.sleep(backoff_seconds(attempt + 1))
            raise JudgeUnavailable(f"judge endpoint ${self.cfg.base_url_env} failed {self.cfg.max_retries} tries; "
                                   f"last: {last}")
        finally:
            await client.close()


LLAVA_BENCH_PROMPT = """You are reviewing two AI assistants' answers to a question about an image you cannot see.
Here is what the image shows (a caption written by a person):
{caption}

Question: {question}

[Assistant 1]
{reference}
[End of Assistant 1]

[Assistant 2]
{answer}
[End of Assistant 2]

Rate the helpfulness, relevance, accuracy and level of detail of each answer on a scale of 1 to 10, higher
being better. On the first line write only the two scores, Assistant 1's then Assistant 2's, separated by a
space. Then explain your rating, avoiding any bias from the order in which the answers were shown."""


MMVET_PROMPT = """Grade a model's answer to a question about an image against the ground truth.
In the ground truth, <AND> means every part is required and <OR> means any one alternative suffices.
Give a correctness score between 0.0 and 1.0 in steps of 0.1: 1.0 fully correct, 0.0 wrong, partial
credit for partly correct answers. Reply with the score only.

Question: {question}
Ground truth: {answer}
Model answer: {prediction}
Score:"""


def score_llava_bench(items, answers, judge: Judge) -> tuple[dict, dict]:
    reviews, per = [], {}
    for it in items:
        prompt = LLAVA_BENCH_PROMPT.format(caption=it.meta["caption"], question=it.meta["question"],
                                           reference=it.meta["reference"], answer=answers[it.id])
        content = judge.ask(prompt, temperature=0.2)
        scores = M.llava_bench_parse_scores(content)
        reviews.append({"question_id": it.id, "category": f"llava_bench_{it.meta['category']}",
                        "content": content, "tuple": scores})
        per[it.id] = scores[1]
    parsed = [r for r in reviews if r["tuple"] != [-1.0, -1.0]]
    summary = M.llava_bench_summary(parsed) if parsed else {}
    return {"relative": summary.get("all", {}).get("relative", 0.0), "by_category": summary,
            "unparsed_reviews": len(reviews) - len(parsed), "count": len(reviews)}, per


def score_mmvet(items, answers, judge: Judge) -> tuple[dict, dict]:
    per, by_cap = {}, {}
    for it in items:
        content = judge.ask(MMVET_PROMPT.format(question=it.meta["question"], answer=it.meta["answer"],
                                                prediction=answers[it.id]), temperature=0.0)
        score = M.mmvet_parse_score(content)
        per[it.id] = 0.0 if score is None else score
        for cap in it.meta["capability"] or ["all"]:
            by_cap.setdefault(cap, []).append(per[it.id])
    total = 100 * sum(per.values()) / len(per) if per else 0.0
    return {"total": total, "by_capability": {k: 100 * sum(v) / len(v) for k, v in sorted(by_cap.items())},
            "count": len(per)}, per
