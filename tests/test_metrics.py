import pytest

from stic import metrics as M


@pytest.mark.parametrize("text, expected", [
    ("Yes, it is.", "yes"), ("No, there is no kite.", "no"), ("Yes. But no dog.", "yes"),
    ("There is not a kite in the image.", "no"), ("NO", "yes"),  # only 'No', 'no', 'not' count
    ("Nope", "yes"), ("no", "no"), ("I see no kite", "no"), ("Not really.", "yes"),  # 'Not' is not 'not'
    ("yes\nno", "yes"),  # split on single spaces: 'yes\nno' is one word
])
def test_pope_parse_matches_llava(text, expected):
    assert M.pope_parse(text) == expected


def test_pope_scores_hand_worked():
    preds = ["Yes, it is.", "No.", "yes", "No, not at all.", "Yes"]
    labels = ["yes", "no", "no", "yes", "yes"]
    s = M.pope_scores(preds, labels)
    # TP=2 (0,4) FP=1 (2) TN=1 (1) FN=1 (3)
    assert (s["tp"], s["fp"], s["tn"], s["fn"]) == (2, 1, 1, 1)
    assert s["accuracy"] == pytest.approx(3 / 5) and s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 3) and s["f1"] == pytest.approx(2 / 3)
    assert s["yes_ratio"] == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="position"):
        M.pope_scores(["yes"], ["yes", "no"])


# ScienceQA: LLaVA-1.5's eval_science_qa.py, item by item (see stic/metrics.py for the rules and the commit)

@pytest.mark.parametrize("text, letter", [
    ("A", "A"), ("C. Pacific", "C"), ("The answer is D.", "D"), ("I think the answer is B", "FAILED"),
    ("The answer is (A).", "FAILED"), ("The correct option is A", "FAILED"), ("E", "E"), ("AB", "FAILED"),
    ("A.", "FAILED"), ("A. The answer is B.", "A"), ("The answer is B,", "B"), ("So The answer is Cx", "C"),
])
def test_scienceqa_parse_matches_llava(text, letter):
    assert M.scienceqa_parse(text) == letter


@pytest.mark.parametrize("text, letter", [
    # the text is read as written: no strip, no newline rewriting (the old parser gave B or C to all five)
    (" B ", "FAILED"), (" B", "FAILED"), ("\tB", "FAILED"), ("B\n", "FAILED"), ("B\nbecause", "FAILED"),
    ("C\nPacific", "FAILED"),
    # 'The answer is ([A-Z]).': some character other than a newline must follow the letter
    ("The answer is B", "FAILED"), ("Because of X. The answer is B", "FAILED"),
    ("The answer is B\nbecause it is blue.", "FAILED"),
    # exactly one match: two are FAILED, even when they agree
    ("The answer is A. The answer is A.", "FAILED"), ("The answer is C. No: The answer is B.", "FAILED"),
    # the regex reads any capital letter, outside A-E too
    ("The answer is Z.", "Z"), ("The answer is F. The answer is B.", "FAILED"),
])
def test_scienceqa_parse_reads_the_answer_as_written(text, letter):
    assert M.scienceqa_parse(text) == letter


def test_scienceqa_correct_respects_number_of_choices():
    assert M.scienceqa_correct("B", 2, 1)
    assert not M.scienceqa_correct("C", 2, 2)  # C is not an option of a 2-choice question
    assert not M.scienceqa_correct("FAILED", 4, 0)
    assert not M.scienceqa_correct(None, 4, 0)  # no prediction: FAILED


@pytest.mark.parametrize("text", ["The answer is F. The answer is B.", " B", "B\n", "The answer is B",
                                  "The answer is B. The answer is B."])
def test_scienceqa_answers_the_official_script_fails(text):
    # each would pick B (index 1) under a normalising parser; the official script marks all FAILED
    assert not M.scienceqa_correct(text, 3, 1)


def _sqa_items(root):
    from stic.evaluate import EvalConfig, load_items

    return load_items(EvalConfig(data_root=str(root), benchmarks=["scienceqa"]), "scienceqa")


def test_scienceqa_missing_prediction_is_failed_and_outside_img(eval_root):
    from stic.evaluate import score_predictions

    items = _sqa_items(eval_root)
    # sample file: IMG questions 77 (answer A of 2), 78 (B of 3), 80 (B of 3); 79 is text-only, so not IMG
    assert [it.id for it in items] == ["77", "78", "80"]
    preds = [{"question_id": "77", "prompt": "<image>\n...", "text": "A"},
             {"question_id": "78", "prompt": "<image>\n...", "text": "B\n"}]  # 80: no prediction
    s = score_predictions("scienceqa", items, preds, None)
    assert s["missing_predictions"] == 1
    assert s["per_item"] == {"77": True, "78": False, "80": False}
    # the official script gives a missing answer the prompt 'Unknown', so it is outside IMG accuracy
    assert s["metrics"] == {"accuracy": 0.5, "count": 2}
    s = score_predictions("scienceqa", items, preds + [{"question_id": "80", "text": "B"}], None)
    assert s["missing_predictions"] == 0 and s["metrics"] == {"accuracy": 2 / 3, "count": 3}


def test_other_benchmarks_still_refuse_missing_predictions(eval_root):
    from stic.benchmarks import BenchmarkFileError
    from stic.evaluate import EvalConfig, load_items, score_predictions

    items = load_items(EvalConfig(data_root=str(eval_root), benchmarks=["pope"]), "pope")
    with pytest.raises(BenchmarkFileError, match="lack 1 item"):
        score_predictions("pope", items, [{"question_id": it.id, "text": "yes"} for it in items[1:]], None)


def test_stic_score_warns_about_missing_scienceqa_predictions(eval_root, tmp_path, capsys):
    import json

    from stic.cli import main

    path = tmp_path / "predictions.jsonl"
    path.write_text(json.dumps({"question_id": "77", "prompt": "<image>\n...", "text": "A"}) + "\n")
    with pytest.raises(SystemExit) as exit_:
        main(["score", "--benchmark", "scienceqa", "--predictions", str(path), "--data-root", str(eval_root)])
    assert exit_.value.code == 0
    out, err = capsys.readouterr()
    assert "warning: 2 of 3 scienceqa items have no prediction" in err and "FAILED" in err
    result = json.loads(out)
    assert result["missing_predictions"] == 2 and result["metrics"] == {"accuracy": 1.0, "count": 1}


@pytest.mark.parametrize("raw, norm", [
    ("The Coca-Cola", "coca cola"), ("an apple", "apple"), ("Two", "2"), ("dont", "don't"),
    ("Hello, World!", "hello world"), ("3.5", "3.5"), ("end.", "end"), ("yes?", "yes"),
    ("man's hat", "man 's hat"), ("x-ray", "x ray"), ("x - y", "x y"), ("ten", "10"),
    ("a-b", "b"),  # '-' becomes a space, then 'a' is dropped as an article
])
def test_vqa_normalization(raw, norm):
    assert M.vqa_normalize(raw) == norm


def test_vqa_soft_accuracy_leave_one_out():
    answers = ["two"] * 2 + ["2"] * 1 + ["three"] * 7
    # "2": 3 matches among 10; leaving out a match gives 2/3, leaving out a non-match gives 1 -> (3*2/3+7)/10
    assert M.vqa_soft_accuracy("2", answers) == pytest.approx((3 * (2 / 3) + 7 * 1) / 10)
    assert M.vqa_soft_accuracy("Three.", answers) == 1.0
    assert M.vqa_soft_accuracy("four", answers) == 0.0
    one = ["cat"] + ["dog"] * 9
    assert M.vqa_soft_accuracy("a cat", one) == pytest.approx(9 * (1 / 3) / 10)


def test_textvqa_question_recovered_from_prompt():
    p = "What brand is the kettle?\nReference OCR token: ACME, 2L\nAnswer the question using a single word or phrase."
    assert M.textvqa_question_from_prompt(p) == "what brand is the kettle?"
    assert M.textvqa_question_from_prompt("Who?\nAnswer briefly.") == "who?"


@pytest.mark.parametrize("target, pred, ok", [
    ("42.5", "42", True), ("42.5", "40", False), ("45%", "0.45", True), ("0.45", "45%", True),
    ("Yes", "yes", True), ("1000", "1,000", False), ("0", "0.0", False), ("0", "0", True), ("12", " 12", True),
    ("12", "12.", True), ("12", "12 apples", False), ("Label A", "label a", True),
])
def test_chartqa_relaxed_correctness_like_pix2struct(target, pred, ok):
    assert M.relaxed_correctness(target, pred) is ok


def test_chartqa_strict_variant_is_separate():
    assert M.relaxed_correctness_strict("1000", "1,000") and M.relaxed_correctness_strict("0", "0.0")


@pytest.mark.parametrize("answer, expected", [
    ("A", "A"), ("The answer is B.", "B"), ("(C) plum", "C"), ("I choose D: nan", None),
    ("B or C", None), ("plum", "C"), ("It is a lime, I think", "B"), ("Cannot determine the answer", "Z"),
    ("A pear and a lime", "A"),  # VLMEvalKit's quirk: the article 'A' is read as option A
])
def test_mmbench_option_matching(answer, expected):
    choices = {"A": "pear", "B": "lime", "C": "plum"}
    assert M.mmbench_infer_option(answer, dict(choices)) == expected


def test_mmbench_circular_needs_every_variant_right():
    ch = {"A": "pear", "B": "lime"}
    rows = [
        {"index": 7, "answer": "A", "prediction": "A", "choices": ch, "category": "x"},
        {"index": 1000007, "answer": "B", "prediction": "B", "choices": {"A": "lime", "B": "pear"}, "category": "x"},
        {"index": 8, "answer": "A", "prediction": "A", "choices": ch, "category": "y"},
        {"index": 1000008, "answer": "B", "prediction": "A", "choices": {"A": "lime", "B": "pear"}, "category": "y"},
    ]
    s = M.mmbench_circular(rows)
    assert s["questions"] == 2 and s["accuracy"] == 0.5 and s["by_category"] == {"x": 1.0, "y": 0.0}


def test_mathvista_extraction_and_normalisation():
    mc = {"question_type": "multi_choice", "answer_type": "text", "choices": ["3", "4", "5"], "answer": "4"}
    assert M.mathvista_correct("4", mc)[0]  # the response is a choice
    assert M.mathvista_correct("(B)", mc)[0]  # letter -> option text
    assert M.mathvista_correct("The answer is B", mc)[0]  # rule fallback: last option letter
    assert not M.mathvista_correct("A", mc)[0]
    integer = {"question_type": "free_form", "answer_type": "integer", "choices": None, "answer": "16"}
    assert M.mathvista_correct("16", integer)[0] and M.mathvista_correct("The area is 16.0.", integer)[0]
    assert not M.mathvista_correct("15", integer)[0]
    flt = {"question_type": "free_form", "answer_type": "float", "choices": None, "answer": "1.5", "precision": 1}
    assert M.mathvista_correct("1.50", flt)[0] and M.mathvista_correct("about 1.46", flt)[0]
    assert M.mathvista_correct('The answer is "1.5".', flt)[0]
    assert M.mathvista_normalize("banana", ["apple", "bananas"], "multi_choice", "text", 0) == "bananas"


def test_judge_parsers():
    assert M.llava_bench_parse_scores("8 6\nAssistant 2 omits the bridge.") == [8.0, 6.0]
    assert M.llava_bench_parse_scores("8,6") == [8.0, 6.0]
    assert M.llava_bench_parse_scores("8, 6") == [-1.0, -1.0]  # ', ' becomes two spaces: three parts
    assert M.llava_bench_parse_scores("Scores: 8 and 6") == [-1.0, -1.0]
    s = M.llava_bench_summary([{"category": "detail", "tuple": [8, 6]}, {"category": "conv", "tuple": [10, 10]}])
    assert s["detail"]["relative"] == pytest.approx(75.0) and s["all"]["relative"] == pytest.approx(16 / 18 * 100)
    assert M.mmvet_parse_score("0.6") == 0.6 and M.mmvet_parse_score("Correct") is None
