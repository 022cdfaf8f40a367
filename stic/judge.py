"""An LLM judge through any OpenAI-compatible chat endpoint, for LLaVA-Bench and MM-Vet.

The endpoint and key come from environment variables (names configurable); the key is sent only in the
request header (by the `openai` client) and never printed, logged or saved. Failed calls follow the retry rules
of the generation backend (stic/serving.py): 429, 5xx, timeouts and lost connections are retried with backoff,
401/403 never. Every answer is cached on disk by a hash of (model, prompt, temperature), so rescoring costs
nothing and a killed run loses no paid call.

Judge rules: with `eval.<benchmark>.rule_file` the request is assembled from the official rules the user
supplies (LLaVA's `llava/eval/table/rule.json`, MM-Vet's grader prompt) exactly as those projects' scripts
assemble it; the toolkit ships no copy of either. Without one, the toolkit's own wording below is used and every
score it gives is labelled "not comparable to published scores". `eval.judge.mock` is an offline stand-in that
grades by word overlap, for first runs and tests ("mock judge: not a real score").
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import re
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
    mmvet_runs: int = option(
        1, help="MM-Vet: grading runs over every answer, averaged, with the std of the run totals (MM-Vet's "
                "evaluator `--num_run`: 1 by default, 5 in its paper)")
    mock: bool = option(
        False, help="an offline stand-in for the judge: deterministic grades from the answer's word overlap with "
                    "the reference, no network; labelled 'mock judge: not a real score'")

    def __post_init__(self):
        if self.max_retries < 1:  # 0 would send no request at all
            raise ValueError(f"max_retries counts every try, the first included: at least 1, got {self.max_retries}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        if self.mmvet_runs < 1:
            raise ValueError(f"mmvet_runs must be at least 1, got {self.mmvet_runs}")


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

    mock = False

    def ask(self, prompt: str, temperature: float, system: str | None = None, max_tokens: int | None = None,
            run: int = 0) -> str:
        """The judge's reply to `prompt` (after a `system` message, if any); `run` numbers repeated gradings of
        one prompt (MM-Vet's runs), which the cache must keep apart."""
        keyed = [self.cfg.model, prompt, temperature]
        if (system, max_tokens, run) != (None, None, 0):  # the toolkit-wording requests keep their old keys
            keyed += [system, max_tokens, run]
        key = hashlib.sha256(json.dumps(keyed).encode()).hexdigest()
        if key in self.cache:
            return self.cache[key]
        if not self.available:
            raise JudgeUnavailable(f"no judge endpoint: set {self.cfg.base_url_env}")
        text = self._call(prompt, temperature, system, max_tokens)
        self.cache[key] = text
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.cache_path, "a") as fh:
            fh.write(json.dumps({"key": key, "response": text}) + "\n")
        return text

    def _call(self, prompt: str, temperature: float, system: str | None, max_tokens: int | None) -> str:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": prompt}]
        limit = {} if max_tokens is None else {"max_tokens": max_tokens}
        return asyncio.run(self._call_with_deadline(messages, temperature, limit))

    async def _call_with_deadline(self, messages: list[dict], temperature: float, limit: dict) -> str:
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
                        model=self.cfg.model, temperature=temperature, messages=messages, **limit),
                        self.cfg.timeout_s)
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


# -------------------------------------------------------------------------------------------------------------
# The toolkit's own wording: the fallback without a rule file, not comparable to published scores


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


# -------------------------------------------------------------------------------------------------------------
# Official rules, read from the user's files


LLAVA_BENCH_CATEGORIES = ("conv", "detail", "complex")
# The request framing of the official scripts (their rule texts come from the user's file):
# LLaVA `llava/eval/eval_gpt_review_bench.py` sends this system message, at temperature 0.2, max_tokens 1024
LLAVA_BENCH_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
# MM-Vet `mm-vet_evaluator.py` appends this when a reply is not a grade, and asks again (max_tokens 3)
MMVET_RETRY_SUFFIX = "\nPredict the correctness of the answer (digit): "
MMVET_RETRY_TEMPERATURES = (0.0, 0.5, 1.0, 1.5)  # the evaluator's four re-asks; a fifth unreadable reply: 0.0


class JudgeRulesError(SticError, ValueError):
    """A judge rule file (eval.<benchmark>.rule_file) that is missing or not in the expected format."""


@dataclasses.dataclass(frozen=True)
class JudgeRules:
    """The official rules of one judged benchmark, as read from the user's rule file."""

    benchmark: str
    path: str
    sha256: str
    llava_bench: dict | None = None  # {"llava_bench_<category>": {"role": ..., "prompt": ...}}
    mmvet_prompt: str | None = None  # the grader prompt, verbatim


def load_judge_rules(benchmark: str, rule_file: str | None) -> JudgeRules | None:
    """The rules of `eval.<benchmark>.rule_file`, checked; None without one (the toolkit's own wording).

    llava_bench: LLaVA's `llava/eval/table/rule.json` as published, a JSON object whose entries
      `llava_bench_conv`, `llava_bench_detail` and `llava_bench_complex` each hold a "role" and a "prompt" (the
      official script reads the key `llava_bench_<category>`; its other keys are ignored).
    mmvet: a UTF-8 text file holding MM-Vet's grader prompt (the `prompt` string of `mm-vet_evaluator.py`:
      the instructions and the few-shot table), used verbatim; each request appends a newline and
      `question | ground truth | prediction | ` to it, as the evaluator does."""
    if rule_file is None:
        return None
    where = f"eval.{benchmark}.rule_file {rule_file}"
    if benchmark not in ("llava_bench", "mmvet"):
        raise JudgeRulesError(f"{where}: {benchmark} is not judged; rule files are for llava_bench and mmvet")
    path = Path(rule_file).expanduser()
    if not path.is_file():
        raise JudgeRulesError(f"{where} does not exist")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise JudgeRulesError(f"{where}: not UTF-8 text") from None
    if benchmark == "mmvet":
        if not text.strip():
            raise JudgeRulesError(f"{where} is empty; expected MM-Vet's grader prompt (plain text)")
        if text.lstrip().startswith("{"):
            raise JudgeRulesError(f"{where} looks like JSON; mmvet's rule file is MM-Vet's grader prompt as plain "
                                  "text (the prompt string of mm-vet_evaluator.py)")
        return JudgeRules(benchmark, str(path), digest, mmvet_prompt=text)
    try:
        rules = json.loads(text)
    except json.JSONDecodeError as err:
        raise JudgeRulesError(f"{where}: not valid JSON ({err.msg}, line {err.lineno}); expected LLaVA's "
                              "llava/eval/table/rule.json") from None
    if not isinstance(rules, dict):
        raise JudgeRulesError(f"{where}: expected a JSON object of rules by category (LLaVA's rule.json)")
    chosen = {}
    for category in LLAVA_BENCH_CATEGORIES:
        key = f"llava_bench_{category}"
        rule = rules.get(key)
        if not (isinstance(rule, dict) and isinstance(rule.get("role"), str) and isinstance(rule.get("prompt"), str)):
            raise JudgeRulesError(f"{where}: no rule {key!r} with a \"role\" and a \"prompt\" (LLaVA's rule.json "
                                  f"has one for each category: {', '.join(LLAVA_BENCH_CATEGORIES)})")
        chosen[key] = {"role": rule["role"], "prompt": rule["prompt"]}
    return JudgeRules(benchmark, str(path), digest, llava_bench=chosen)


def llava_bench_request(rule: dict, caption: str, question: str, reference: str, answer: str) -> str:
    """The review request of LLaVA's `eval_gpt_review_bench.py`: the caption as context, the question, the
    reference (GPT-4) answer as the first assistant, the model's as the second, then the rule's prompt."""
    role = rule["role"]
    return (f"[Context]\n{caption}\n\n[Question]\n{question}\n\n"
            f"[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n"
            f"[System]\n{rule['prompt']}\n\n")


def mmvet_request(grader_prompt: str, question: str, truth: str, prediction: str) -> str:
    """The grading request of MM-Vet's `mm-vet_evaluator.py`: the prompt, then one table row left open."""
    truth = truth.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    return grader_prompt + "\n" + " | ".join([question, truth, prediction, ""])


# -------------------------------------------------------------------------------------------------------------
# The offline mock judge


MOCK_LABEL = "mock judge: not a real score"


def _word_recall(reference: str, answer: str) -> float:
    """The share of the reference's distinct words that the answer contains (0 for an empty reference)."""
    ref, got = set(re.findall(r"\w+", reference.lower())), set(re.findall(r"\w+", answer.lower()))
    return len(ref & got) / len(ref) if ref else 0.0


class MockJudge:
    """`eval.judge.mock`: replies computed locally, in the official reply formats, so that the whole scoring path
    runs offline. Not a real score: word overlap with the reference says little about an answer's quality."""

    mock = True
    available = True

    def __init__(self, cfg: JudgeConfig):
        self.cfg = cfg

    def __repr__(self) -> str:
        return "MockJudge()"

    def review(self, reference: str, answer: str) -> str:
        """A LLaVA-Bench review: the reference gets 10, the answer 1 + 9 x its word recall of the reference."""
        return f"10 {1 + round(9 * _word_recall(reference, answer))}\n{MOCK_LABEL} (word overlap)"

    def grade(self, truth: str, prediction: str) -> str:
        """An MM-Vet grade: the best word recall of any <OR> alternative of the ground truth, in steps of 0.1."""
        alternatives = [alt.replace("<AND>", " ") for alt in truth.split("<OR>")]
        return f"{round(max(_word_recall(alt, prediction) for alt in alternatives), 1):.1f}"


def make_judge(cfg: JudgeConfig, cache_path: str | Path) -> Judge | MockJudge:
    return MockJudge(cfg) if cfg.mock else Judge(cfg, cache_path)


def judge_record(judge, rules: JudgeRules | None, benchmark: str) -> dict:
    """What scored a judged benchmark, for scores.json and summary.json: the judge model, the rules (file and
    sha256 digest), whether the score is comparable with published ones, and the label shown when it is not."""
    mock = getattr(judge, "mock", False)
    record = {"model": "mock" if mock else judge.cfg.model,
              "rules": "official" if rules else "toolkit wording",
              "rule_file": rules.path if rules else None, "rule_sha256": rules.sha256 if rules else None,
              "comparable": bool(rules) and not mock}
    if benchmark == "mmvet":
        record["runs"] = judge.cfg.mmvet_runs
    if mock:
        record["note"] = MOCK_LABEL
    elif not rules:
        record["note"] = (f"not comparable to published scores: judged with the toolkit's own wording (set "
                          f"eval.{benchmark}.rule_file to the official rules)")
    return record


# -------------------------------------------------------------------------------------------------------------
# Scoring


def score_llava_bench(items, answers, judge, rules: JudgeRules | None = None) -> tuple[dict, dict]:
    """LLaVA-Bench's relative score, 100 * mean(model) / mean(reference), per category and overall. With the
    official rules the reviews are summarised as LLaVA's `summarize_gpt_review.py` does, an unparsed review's
    [-1, -1] included; with the toolkit's wording unparsed reviews are left out."""
    reviews, per = [], {}
    for it in items:
        if getattr(judge, "mock", False):
            content = judge.review(it.meta["reference"], answers[it.id])
        elif rules:
            rule = rules.llava_bench[f"llava_bench_{it.meta['category']}"]
            content = judge.ask(llava_bench_request(rule, it.meta["caption"], it.meta["question"],
                                                    it.meta["reference"], answers[it.id]),
                                temperature=0.2, system=LLAVA_BENCH_SYSTEM, max_tokens=1024)
        else:
            content = judge.ask(LLAVA_BENCH_PROMPT.format(
                caption=it.meta["caption"], question=it.meta["question"], reference=it.meta["reference"],
                answer=answers[it.id]), temperature=0.2)
        scores = M.llava_bench_parse_scores(content)
        reviews.append({"question_id": it.id, "category": f"llava_bench_{it.meta['category']}",
                        "content": content, "tuple": scores})
        per[it.id] = scores[1]
    parsed = [r for r in reviews if r["tuple"] != [-1.0, -1.0]]
    summarised = reviews if rules else parsed
    summary = M.llava_bench_summary(summarised) if summarised else {}
    return {"relative": summary.get("all", {}).get("relative", 0.0), "by_category": summary,
            "unparsed_reviews": len(reviews) - len(parsed), "count": len(reviews)}, per


def _mmvet_official_grade(judge: Judge, grader_prompt: str, item, prediction: str, run: int) -> float:
    """One grading as MM-Vet's evaluator does it: asked at temperature 0; a reply that is not a grade is asked
    again with MMVET_RETRY_SUFFIX at rising temperatures; after five unreadable replies the grade is 0.0."""
    request = mmvet_request(grader_prompt, item.meta["question"], item.meta["answer"], prediction)
    grade = M.mmvet_official_parse(judge.ask(request, 0.0, max_tokens=3, run=run))
    for temperature in MMVET_RETRY_TEMPERATURES:
        if grade is not None:
            return grade
        grade = M.mmvet_official_parse(judge.ask(request + MMVET_RETRY_SUFFIX, temperature, max_tokens=3, run=run))
    return 0.0 if grade is None else grade


def score_mmvet(items, answers, judge, rules: JudgeRules | None = None, runs: int = 1) -> tuple[dict, dict]:
    """MM-Vet's scores as its evaluator reports them: each answer graded 0.0-1.0 in each of `runs` runs
    (eval.judge.mmvet_runs), then per run the mean x 100 in total, per capability and per capability set, averaged
    over the runs. With the toolkit's wording an unreadable grade counts 0.0."""
    grades: dict[str, list[float]] = {}
    for it in items:
        grades[it.id] = []
        for run in range(runs):
            if getattr(judge, "mock", False):
                grade = M.mmvet_official_parse(judge.grade(it.meta["answer"], answers[it.id]))
            elif rules:
                grade = _mmvet_official_grade(judge, rules.mmvet_prompt, it, answers[it.id], run)
            else:
                grade = M.mmvet_parse_score(judge.ask(MMVET_PROMPT.format(
                    question=it.meta["question"], answer=it.meta["answer"], prediction=answers[it.id]),
                    temperature=0.0, run=run))
            grades[it.id].append(0.0 if grade is None else grade)
    metrics = M.mmvet_summary(grades, {it.id: it.meta["capability"] for it in items})
    return metrics, {i: sum(g) / len(g) for i, g in grades.items()}
