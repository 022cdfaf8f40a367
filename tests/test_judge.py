"""stic/judge.py: the LLM judge's cache, its retry rules and the LLaVA-Bench and MM-Vet scoring over it."""

import hashlib
import json
from types import SimpleNamespace

import pytest

from stic.judge import Judge, JudgeConfig, JudgeUnavailable, score_llava_bench, score_mmvet


def cached(path, cfg: JudgeConfig, answers: dict) -> None:
    """Write judge answers to a cache file as the judge keys them: (model, prompt, temperature)."""
    with open(path, "a") as fh:
        for (prompt, temperature), text in answers.items():
            key = hashlib.sha256(json.dumps([cfg.model, prompt, temperature]).encode()).hexdigest()
            fh.write(json.dumps({"key": key, "response": text}) + "\n")


def test_cached_answers_need_no_endpoint_and_the_key_is_never_shown(tmp_path, monkeypatch):
    monkeypatch.delenv("STIC_JUDGE_BASE_URL", raising=False)
    monkeypatch.setenv("STIC_JUDGE_API_KEY", "sk-never-shown")
    cfg, cache = JudgeConfig(), tmp_path / "cache.jsonl"
    cached(cache, cfg, {("Score:", 0.0): "0.7"})
    with open(cache, "a") as fh:
        fh.write('{"key": "cut sho')  # a line a kill cut short is skipped
    judge = Judge(cfg, cache)
    assert not judge.available and judge.ask("Score:", 0.0) == "0.7"
    with pytest.raises(JudgeUnavailable, match=r"no judge endpoint: set STIC_JUDGE_BASE_URL"):
        judge.ask("Score:", 0.2)  # another temperature is another question
    assert "sk-never-shown" not in repr(judge) and repr(judge).endswith("endpoint=unset)")


def test_judge_follows_the_retry_rules(tmp_path, stubs, monkeypatch):
    from stic.judge import Judge, JudgeConfig, JudgeUnavailable

    monkeypatch.setattr("stic.serving.backoff_seconds", lambda attempt: 0.01)
    monkeypatch.setenv("STIC_JUDGE_API_KEY", "sk-judge-secret")
    refusing, down = stubs("401"), stubs("503")
    monkeypatch.setenv("STIC_JUDGE_BASE_URL", refusing.url)
    with pytest.raises(JudgeUnavailable, match=r"refused the key.*\$STIC_JUDGE_API_KEY") as info:
        Judge(JudgeConfig(), tmp_path / "cache.jsonl").ask("Score:", 0.0)
    assert refusing.hits == 1 and "sk-judge-secret" not in str(info.value)
    monkeypatch.setenv("STIC_JUDGE_BASE_URL", down.url)
    with pytest.raises(ValueError, match="at least 1, got 0"):  # 0 tries sent nothing and crashed
        JudgeConfig(max_retries=0)
    with pytest.raises(JudgeUnavailable, match="failed 3 tries.*503"):
        Judge(JudgeConfig(max_retries=3), tmp_path / "cache.jsonl").ask("Score:", 0.0)
    assert down.hits == 3



class Scripted:
    """A judge that answers from a list, recording the prompts."""

    def __init__(self, *answers):
        self.answers, self.prompts = list(answers), []

    def ask(self, prompt, temperature):
        self.prompts.append((prompt, temperature))
        return self.answers.pop(0)


def test_llava_bench_scores_relative_to_the_reference():
    items = [SimpleNamespace(id=f"q{i}", meta={"caption": f"c{i}", "question": f"Q{i}?", "reference": f"ref{i}",
                                               "category": cat}) for i, cat in enumerate(["conv", "detail", "conv"])]
    judge = Scripted("8 6\nshorter", "10 5", "no scores here")
    scores, per = score_llava_bench(items, {"q0": "a0", "q1": "a1", "q2": "a2"}, judge)
    assert per == {"q0": 6.0, "q1": 5.0, "q2": -1.0}
    assert scores["relative"] == pytest.approx(100 * (6 + 5) / (8 + 10))  # the unparsed review is left out
    assert scores["unparsed_reviews"] == 1 and scores["count"] == 3
    prompt, temperature = judge.prompts[1]
    assert temperature == 0.2 and "c1" in prompt and "Question: Q1?" in prompt
    assert prompt.index("ref1") < prompt.index("a1")  # the reference is Assistant 1


def test_mmvet_averages_scores_per_capability():
    items = [SimpleNamespace(id="a", meta={"question": "Q", "answer": "A", "capability": ["ocr", "math"]}),
             SimpleNamespace(id="b", meta={"question": "Q", "answer": "B", "capability": ["ocr"]}),
             SimpleNamespace(id="c", meta={"question": "Q", "answer": "C", "capability": []})]
    judge = Scripted("1.0", "0.4", "I cannot grade this")
    scores, per = score_mmvet(items, {"a": "x", "b": "y", "c": "z"}, judge)
    assert per == {"a": 1.0, "b": 0.4, "c": 0.0}  # an unreadable grade counts as wrong
    assert scores["total"] == pytest.approx(100 * 1.4 / 3)
    assert scores["by_capability"] == pytest.approx({"all": 0.0, "math": 100.0, "ocr": 70.0})
    assert all(t == 0.0 for _, t in judge.prompts) and judge.prompts[1][0].endswith("Model answer: y\nScore:")
