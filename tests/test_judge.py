"""stic/judge.py: the LLM judge's cache, its retry rules, the official rule files, the mock judge and the LLaVA-Bench
and MM-Vet scoring over them. The rule files here are self-written in the official files' structure: the toolkit
ships no copy of LLaVA's or MM-Vet's texts."""

import hashlib
import json
from types import SimpleNamespace

import pytest

from stic.judge import (LLAVA_BENCH_SYSTEM, MMVET_RETRY_SUFFIX, MOCK_LABEL, Judge, JudgeConfig, JudgeRulesError,
                        JudgeUnavailable, MockJudge, load_judge_rules, score_llava_bench, score_mmvet)


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
    """A judge that answers from a list, recording the prompts (and the request's other settings in `asked`)."""

    available, cfg = True, JudgeConfig()

    def __init__(self, *answers):
        self.answers, self.prompts, self.asked = list(answers), [], []

    def ask(self, prompt, temperature, **settings):
        self.prompts.append((prompt, temperature))
        self.asked.append(settings)
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
    assert scores["by_capability"] == pytest.approx({"math": 100.0, "ocr": 70.0})  # c: in the total only
    assert all(t == 0.0 for _, t in judge.prompts) and judge.prompts[1][0].endswith("Model answer: y\nScore:")


# --- official rule files (self-written, in the official structure) ---------------------------------------------

LLAVA_RULES = {  # LLaVA's rule.json keys; "conv" is a LLaVA-Instruct rule the benchmark must not use
    "conv": {"role": "Assistant", "prompt": "WRONG RULE"},
    "llava_bench_conv": {"role": "Helper", "prompt": "Rate both (conv rule). Two numbers first."},
    "llava_bench_detail": {"role": "Helper", "prompt": "Rate both (detail rule)."},
    "llava_bench_complex": {"role": "Helper", "prompt": "Rate both (complex rule)."},
}
MMVET_GRADER = ("Grade the prediction 0.0 to 1.0.\n\nQuestion | Ground truth | Prediction | Correctness\n"
                "--- | --- | --- | ---\nWhat is 1+1? | 2 | 2 | 1.0\n")


def rule_file(tmp_path, name, content) -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def llava_items(*categories):
    return [SimpleNamespace(id=f"q{i}", meta={"caption": f"cap{i}", "question": f"Q{i}?", "reference": f"ref{i}",
                                              "category": cat}) for i, cat in enumerate(categories)]


def test_llava_bench_official_rules_assemble_the_request_and_summarise_as_llava_does(tmp_path):
    rules = load_judge_rules("llava_bench", rule_file(tmp_path, "rule.json", LLAVA_RULES))
    judge = Scripted("8 6\nAssistant 2 omits a detail.", "10 5", "no scores here")
    scores, per = score_llava_bench(llava_items("conv", "detail", "conv"), {"q0": "a0", "q1": "a1", "q2": "a2"},
                                    judge, rules)
    # eval_gpt_review_bench.py: context, question, reference as the rule's role 1, the model as role 2, the prompt
    assert judge.prompts[0] == ("[Context]\ncap0\n\n[Question]\nQ0?\n\n[Helper 1]\nref0\n\n[End of Helper 1]\n\n"
                                "[Helper 2]\na0\n\n[End of Helper 2]\n\n[System]\nRate both (conv rule). Two numbers "
                                "first.\n\n", 0.2)
    assert judge.prompts[1][0].endswith("[System]\nRate both (detail rule).\n\n")
    assert judge.asked[0] == {"system": LLAVA_BENCH_SYSTEM, "max_tokens": 1024}
    # summarize_gpt_review.py averages every review's tuple, the unparsed [-1, -1] included
    assert per == {"q0": 6.0, "q1": 5.0, "q2": -1.0} and scores["unparsed_reviews"] == 1
    assert scores["relative"] == pytest.approx(100 * (6 + 5 - 1) / (8 + 10 - 1))
    assert scores["by_category"]["llava_bench_conv"]["relative"] == pytest.approx(100 * (6 - 1) / (8 - 1))
    assert scores["by_category"]["llava_bench_detail"]["relative"] == pytest.approx(50.0)


def test_mmvet_official_grader_prompt_retries_like_the_evaluator(tmp_path):
    rules = load_judge_rules("mmvet", rule_file(tmp_path, "grader.txt", MMVET_GRADER))
    items = [SimpleNamespace(id="a", meta={"question": "Which two?", "answer": "3<AND>4", "capability": ["math"]}),
             SimpleNamespace(id="b", meta={"question": "Q", "answer": "x", "capability": ["ocr"]}),
             SimpleNamespace(id="c", meta={"question": "Q", "answer": "y", "capability": ["ocr"]})]
    judge = Scripted("0.5", "Correctness: 1.0", "0.8 because", "?", "??", "???", "????", "?????")
    scores, per = score_mmvet(items, {"a": "3 and 4", "b": "x", "c": "z"}, judge, rules)
    # the grader prompt verbatim, a newline, then the open table row (<AND> spaced out as the evaluator does)
    assert judge.prompts[0] == (MMVET_GRADER + "\nWhich two? | 3 <AND> 4 | 3 and 4 | ", 0.0)
    assert judge.asked[0] == {"max_tokens": 3, "run": 0}
    # b: "Correctness: 1.0" is no grade (its first word is read); asked again with the suffix; "0.8 because" -> 0.8
    assert judge.prompts[2] == (judge.prompts[1][0] + MMVET_RETRY_SUFFIX, 0.0)
    # c: five unreadable replies at the evaluator's temperatures, then 0.0
    assert [t for _, t in judge.prompts[3:]] == [0.0, 0.0, 0.5, 1.0, 1.5] and not judge.answers
    assert per == {"a": 0.5, "b": 0.8, "c": 0.0}
    assert scores["by_capability"] == pytest.approx({"math": 50.0, "ocr": 40.0})
    assert scores["total"] == pytest.approx(100 * 1.3 / 3)


def test_mmvet_runs_are_averaged_per_capability_with_their_std():
    items = [SimpleNamespace(id="a", meta={"question": "Q", "answer": "A", "capability": ["ocr", "math"]}),
             SimpleNamespace(id="b", meta={"question": "Q", "answer": "B", "capability": ["ocr"]}),
             SimpleNamespace(id="c", meta={"question": "Q", "answer": "C", "capability": ["rec", "rec"]})]
    # item by item, run by run: a 1.0 then 0.5, b 0.0 then 0.5, c 0.4 then 1.0
    judge = Scripted("1.0", "0.5", "0.0", "0.5", "0.4", "1.0")
    scores, per = score_mmvet(items, {"a": "x", "b": "y", "c": "z"}, judge, runs=2)
    assert [s["run"] for s in judge.asked] == [0, 1] * 3  # each run is its own request (and cache entry)
    assert scores["run_totals"] == pytest.approx([100 * 1.4 / 3, 100 * 2.0 / 3])
    assert scores["total"] == pytest.approx(100 * 1.7 / 3) and scores["std"] == pytest.approx(10.0)
    assert scores["by_capability"] == pytest.approx({"math": 75.0, "ocr": 50.0, "rec": 70.0})  # rec once per item
    assert scores["by_capability_integration"] == pytest.approx({"math_ocr": 75.0, "ocr": 25.0, "rec": 70.0})
    assert per == pytest.approx({"a": 0.75, "b": 0.25, "c": 0.7})


@pytest.mark.parametrize("benchmark, content, message", [
    ("llava_bench", None, r"eval.llava_bench.rule_file .*nowhere.json does not exist"),
    ("llava_bench", "{\"llava_bench_conv\": ", r"not valid JSON"),
    ("llava_bench", ["a list"], r"expected a JSON object"),
    ("llava_bench", {k: v for k, v in LLAVA_RULES.items() if k != "llava_bench_complex"},
     r"no rule 'llava_bench_complex' with a \"role\" and a \"prompt\""),
    ("mmvet", "", r"is empty"),
    ("mmvet", LLAVA_RULES, r"looks like JSON; mmvet's rule file is MM-Vet's grader prompt"),
    ("pope", "anything", r"eval.pope.rule_file .*: pope is not judged"),
])
def test_a_wrong_rule_file_is_refused_in_one_line(tmp_path, benchmark, content, message):
    path = str(tmp_path / "nowhere.json") if content is None else rule_file(tmp_path, "rules", content)
    with pytest.raises(JudgeRulesError, match=message) as info:
        load_judge_rules(benchmark, path)
    assert "\n" not in str(info.value)


def test_scores_name_the_judge_the_rules_digest_and_label_the_fallback_and_the_mock(tmp_path, eval_root):
    from stic.evaluate import EvalConfig, load_items, score_predictions
    from stic.report import results_table

    path = rule_file(tmp_path, "grader.txt", MMVET_GRADER)
    items = load_items(EvalConfig(data_root=str(eval_root)), "mmvet")
    preds = [{"question_id": it.id, "text": it.meta["answer"]} for it in items]
    official = score_predictions("mmvet", items, preds, Scripted(*["0.7"] * len(items)),
                                 load_judge_rules("mmvet", path))
    assert official["judge"] == {"model": "gpt-4-0613", "rules": "official", "rule_file": path, "runs": 1,
                                 "rule_sha256": hashlib.sha256(MMVET_GRADER.encode()).hexdigest(), "comparable": True}
    fallback = score_predictions("mmvet", items, preds, Scripted(*["0.7"] * len(items)))
    assert fallback["judge"]["comparable"] is False and fallback["judge"]["rule_sha256"] is None
    assert "not comparable to published scores" in fallback["judge"]["note"]
    mock = score_predictions("mmvet", items, preds, MockJudge(JudgeConfig(mock=True)))
    assert mock["metrics"]["total"] == 100.0  # the answers are the ground truths
    assert mock["judge"]["model"] == "mock" and mock["judge"]["note"] == MOCK_LABEL
    from stic.report import benchmark_summary

    table = results_table([{"run": r, "benchmarks": {"mmvet": benchmark_summary("total", s)}}
                           for r, s in (("official", official), ("fallback", fallback), ("mock", mock))])
    assert "- mmvet (fallback): not comparable to published scores" in table
    assert "- mmvet (mock): mock judge: not a real score" in table and "(official)" not in table


def test_the_mock_judge_grades_offline_by_word_overlap():
    mock = MockJudge(JudgeConfig(mock=True))
    assert mock.review("A red bus on a street.", "The bus is red.").startswith("10 5\n")  # 2 of 5 words: 1 + 3.6
    assert mock.grade("7<OR>seven", "It shows seven.") == "1.0" and mock.grade("3<AND>4", "3") == "0.5"
    scores, per = score_llava_bench(llava_items("conv", "detail"), {"q0": "ref0", "q1": "nothing"}, mock)
    assert per == {"q0": 10.0, "q1": 1.0} and scores["relative"] == pytest.approx(55.0)
