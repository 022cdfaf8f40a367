"""Benchmark metrics, each reproducing its official scorer's behaviour, quirks included.

Every scorer that `eval/run.py` and `stic score` use lives here. Each function names the official script
(and version) whose results it reproduces. Stricter variants, where offered, are separate functions and
never the default.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict

# -------------------------------------------------------------------------------------------------------------
# POPE — matches LLaVA `llava/eval/eval_pope.py` (commit 4241f08)


def pope_parse(text: str) -> str:
    """'yes' or 'no' as LLaVA's eval_pope.py decides: first sentence (up to the first '.'), commas dropped,
    split on single spaces; 'No', 'no' or 'not' among the words means no, anything else yes."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_scores(predictions: list[str], labels: list[str]) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio; predictions and labels paired by position."""
    if len(predictions) != len(labels):
        raise ValueError(f"POPE: {len(predictions)} answers for {len(labels)} labels; they pair by position")
    pred = [1 if pope_parse(p) == "yes" else 0 for p in predictions]
    gold = [0 if label == "no" else 1 for label in labels]
    tp = sum(p == 1 and g == 1 for p, g in zip(pred, gold))
    fp = sum(p == 1 and g == 0 for p, g in zip(pred, gold))
    tn = sum(p == 0 and g == 0 for p, g in zip(pred, gold))
    fn = sum(p == 0 and g == 1 for p, g in zip(pred, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0  # the official script divides by zero here
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / len(pred), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(pred) / len(pred), "tp": tp, "fp": fp, "tn": tn, "fn": fn, "count": len(pred)}


# -------------------------------------------------------------------------------------------------------------
# ScienceQA — matches LLaVA-1.5's `llava/eval/eval_science_qa.py` (haotian-liu/LLaVA at commit 32cebc38, the
# eval-file pin of shared/formats.md), item by item. Not the variant stored as commit 5200b75, which rewrites
# newlines as '. ', strips whitespace and falls back to a second, looser regex; the official script does none of it.
#   * the answer text is read exactly as written: no strip, no newline rewriting;
#   * a bare option letter (the whole text), or 'X. ' opening the text (X one of A–E), gives X;
#   * otherwise the pattern 'The answer is ([A-Z]).' must match exactly once: its '.' is an unescaped
#     wildcard, so some character other than a newline has to follow the letter ('The answer is B' at the very
#     end, or before a newline, is FAILED), and a second match, even of the same letter, is FAILED;
#   * a letter past the question's choices (e.g. 'E' with three choices, or any letter F–Z the regex reads)
#     scores as wrong: the official get_pred_idx gives -1 (its random-guess line sits after the return, dead);
#   * an item with no prediction is FAILED; the script gives it the prompt 'Unknown', so it counts in the
#     overall accuracy as wrong but falls outside IMG accuracy, which counts answers whose prompt has '<image>'.

SQA_OPTIONS = ["A", "B", "C", "D", "E"]
_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def scienceqa_parse(text: str) -> str:
    """The letter LLaVA-1.5's eval_science_qa.py reads from an answer, or 'FAILED'. The letter may lie outside
    A–E ('The answer is Z.' gives 'Z'); `scienceqa_correct` scores such letters as wrong."""
    if text in SQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _SQA_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def scienceqa_correct(text: str | None, n_choices: int, answer_index: int) -> bool:
    """Whether the answer picks the right option; None (no prediction) is FAILED, as in the official script."""
    letter = "FAILED" if text is None else scienceqa_parse(text)
    return letter in SQA_OPTIONS[:n_choices] and SQA_OPTIONS.index(letter) == answer_index


# -------------------------------------------------------------------------------------------------------------
# TextVQA — matches the EvalAI answer processing of LLaVA `llava/eval/m4c_evaluator.py` (from MMF) and
# `eval_textvqa.py` (commit 524a75b). The tables are the standard VQA normalisation data.

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# As in the reference: the look-behind is written `(?!<=\d)`, so a period is stripped unless a digit follows.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")


def vqa_normalize(answer: str) -> str:
    """EvalAI answer processing: lower-case, drop ',' '?' and split "'s", punctuation rules, periods not
    before digits, number words to digits, articles removed, contractions restored."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # the reference passes re.UNICODE as sub()'s `count` argument (= 32): at most 32 periods are removed
    out = _PERIOD_STRIP.sub("", out, re.UNICODE)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def vqa_soft_accuracy(prediction: str, human_answers: list[str]) -> float:
    """min(1, matches/3) averaged over the 10 leave-one-out subsets of the human answers."""
    answers = [vqa_normalize(a) for a in human_answers]
    pred = vqa_normalize(prediction)
    accs = []
    for i in range(len(answers)):
        others = answers[:i] + answers[i + 1:]
        accs.append(min(1.0, sum(a == pred for a in others) / 3))
    return sum(accs) / len(accs) if accs else 0.0


def textvqa_question_from_prompt(prompt: str) -> str:
    """The question LLaVA's eval_textvqa.py reads back from an answer's `prompt` (lower-cased)."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        m = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        question = m.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise ValueError(f"TextVQA prompt not in a known layout: {prompt[:80]!r}")
    return question.lower()


# -------------------------------------------------------------------------------------------------------------
# ChartQA — matches pix2struct `pix2struct/metrics.py` relaxed_correctness (as used by lmms-eval's chartqa)


def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0  # "45%" is 0.45
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(target: str, prediction: str, max_relative_change: float = 0.05) -> bool:
    """Numbers within 5% of a non-zero target; otherwise case-insensitive exact match. As in pix2struct, a
    number with a thousands separator ("1,000") is not parsed as a number, and a zero target needs an
    exact string match."""
    p, t = _to_float(prediction), _to_float(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= max_relative_change
    return prediction.lower() == target.lower()


def relaxed_correctness_strict(target: str, prediction: str, max_relative_change: float = 0.05) -> bool:
    """A stricter-parsing variant (not the default): strips whitespace and a trailing period, reads
    thousands separators, and compares a zero target numerically."""
    clean = lambda s: s.strip().rstrip(".").replace(",", "")
    p, t = _to_float(clean(prediction)), _to_float(clean(target))
    if p is not None and t is not None:
        return p == t if t == 0 else abs(p - t) / abs(t) <= max_relative_change
    return clean(prediction).lower() == clean(target).lower()


# -------------------------------------------------------------------------------------------------------------
# MMBench — matches VLMEvalKit `vlmeval/utils/matching_util.py` can_infer (commit 18fc37a), rule-based
# (exact-matching) mode, and VLMEvalKit's circular rule


def _count_choice(splits, choices) -> int:
    return sum(1 for c in choices if c in splits)


def mmbench_infer_option(answer: str, choices: dict[str, str]) -> str | None:
    """The option letter VLMEvalKit's rule matcher extracts from `answer`, 'Z' for a refusal, else None."""
    answer = str(answer)
    if "Failed to obtain answer via API" in answer:
        return None
    for refusal in ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                    "I'm sorry, but without the image provided", "Cannot determine the answer"):
        if refusal in answer:
            return "Z"
    mod = answer
    for c in ".()[],:;!*#{}":
        mod = mod.replace(c, " ")
    splits = [x.strip() for x in mod.split()]
    count = _count_choice(splits, choices)
    if count == 1:
        for ch in choices:
            if ch in splits:
                return ch
    elif count == 0 and _count_choice(splits, {"Z", ""}) == 1:
        return "Z"
    # the option's text, found once, counts too
    low = answer.lower()
    hits = [k for k, v in choices.items() if str(v).lower() in low]
    return hits[0] if len(hits) == 1 else None


def mmbench_circular(rows: list[dict]) -> dict:
    """rows: {index, answer, prediction, choices, category}. A question (index % 1e6) counts as right only if
    every one of its circular variants is right."""
    groups: dict[int, list[bool]] = defaultdict(list)
    cats: dict[int, str] = {}
    for r in rows:
        g = int(r["index"]) % 1_000_000
        hit = mmbench_infer_option(r["prediction"], r["choices"]) == r["answer"]
        groups[g].append(hit)
        cats.setdefault(g, r.get("category", ""))
    by_cat: dict[str, list[bool]] = defaultdict(list)
    for g, hits in groups.items():
        by_cat[cats[g]].append(all(hits))
    overall = [all(h) for h in groups.values()]
    return {"accuracy": sum(overall) / len(overall) if overall else 0.0, "questions": len(overall),
            "rows": len(rows),
            "by_category": {c: sum(v) / len(v) for c, v in sorted(by_cat.items())}}


# -------------------------------------------------------------------------------------------------------------
# MathVista — matches lupantech/MathVista `evaluation/extract_answer.py` (its rule-based steps) and
# `calculate_score.py` (normalize_extracted_answer, safe_equal). The official extractor falls back to GPT;
# here the fallback is a rule (the last option letter or number in the response), documented as our own.


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def mathvista_extract(response: str, problem: dict, quick_extract: bool = True) -> str:
    if response == "":
        return ""
    if problem["question_type"] == "multi_choice" and response in (problem.get("choices") or []):
        return response
    if problem["answer_type"] == "integer":
        try:
            return str(int(response))
        except ValueError:
            pass
    if problem["answer_type"] == "float":
        try:
            return str(float(response))
        except ValueError:
            pass
    if quick_extract:
        m = re.search(r'The answer is "(.*)"\.', response)
        if m:
            return m.group(1)
    # Rule fallback (ours; the official script asks GPT here)
    if problem["question_type"] == "multi_choice":
        letters = re.findall(r"\(([A-Z])\)|\b([A-Z])\b", response)
        n = len(problem.get("choices") or [])
        valid = [a or b for a, b in letters if (a or b) in string.ascii_uppercase[:n]]
        if valid:
            return valid[-1]
    numbers = re.findall(r"-?\d+(?:\.\d+)?", response.replace(",", ""))
    if numbers and problem["answer_type"] in ("integer", "float"):
        return numbers[-1]
    return response.strip()


def mathvista_normalize(extraction, choices, question_type, answer_type, precision):
    if question_type == "multi_choice":
        extraction = extraction.strip() if isinstance(extraction, str) else str(extraction)
        letter = re.findall(r"\(([a-zA-Z])\)", extraction)
        if letter:
            extraction = letter[0].upper()
        options = [chr(ord("A") + i) for i in range(len(choices))]
        if extraction in options:
            return choices[options.index(extraction)]
        distances = [_edit_distance(extraction, c) for c in choices]
        return choices[distances.index(min(distances))]  # the most similar option
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            return str(round(float(extraction), int(precision)))
        if answer_type == "list":
            return str(extraction)
    except (TypeError, ValueError):
        return None
    return extraction


def mathvista_correct(response: str, problem: dict) -> tuple[bool, str, object]:
    extraction = mathvista_extract(response, problem)
    prediction = mathvista_normalize(extraction, problem.get("choices"), problem["question_type"],
                                     problem["answer_type"], problem.get("precision") or 0)
    return prediction == problem["answer"], extraction, prediction


# -------------------------------------------------------------------------------------------------------------
# Judged benchmarks


def llava_bench_parse_scores(review: str) -> list[float]:
    """The two 1-10 scores on the judge's first line, [-1, -1] if it cannot be parsed (LLaVA
    `eval_gpt_review_bench.py` parse_score)."""
    try:
        first = review.split("\n")[0].replace(",", " ")
        parts = first.split(" ")
        if len(parts) == 2:
            return [float(parts[0]), float(parts[1])]
    except ValueError:
        pass
    return [-1.0, -1.0]


def llava_bench_summary(reviews: list[dict]) -> dict:
    """100 * mean(model) / mean(reference) per category and overall (LLaVA `summarize_gpt_review.py`)."""
    by_cat: dict[str, list[list[float]]] = defaultdict(list)
    for r in reviews:
        by_cat[r["category"]].append(r["tuple"])
        by_cat["all"].append(r["tuple"])
    out = {}
    for cat, tuples in sorted(by_cat.items()):
        ref = sum(t[0] for t in tuples) / len(tuples)
        model = sum(t[1] for t in tuples) / len(tuples)
        out[cat] = {"relative": 100 * model / ref if ref else 0.0, "reference": ref, "model": model}
    return out


def mmvet_parse_score(text: str) -> float | None:
    """The 0.0-1.0 grade the MM-Vet judge writes; None when it wrote something else."""
    m = re.search(r"-?\d+(?:\.\d+)?", text.strip())
    if not m:
        return None
    value = float(m.group(0))
    return value if 0.0 <= value <= 1.0 else None


def mmvet_official_parse(text: str) -> float | None:
    """The grade as MM-Vet's `mm-vet_evaluator.py` reads it: the reply's first space-separated word as a number
    from 0.0 to 1.0; None otherwise (the evaluator then asks again)."""
    try:
        value = float(text.split(" ")[0].strip())
    except ValueError:
        return None
    return value if 0.0 <= value <= 1.0 else None  # also refuses nan, which the evaluator would let through


def mmvet_summary(grades: dict[str, list[float]], capabilities: dict[str, list[str]]) -> dict:
    """MM-Vet's `mm-vet_evaluator.py` export: per run, 100 * the mean grade over all items (total), over the items
    of each capability, and over the items of each exact capability set ("integration", e.g. ocr_math); then each
    averaged over the runs, with the population std of the run totals. `grades` holds each item's grade per run."""
    n_runs = len(next(iter(grades.values()))) if grades else 0

    def averaged(groups: dict[str, list[str]]) -> dict[str, float]:
        return {name: sum(100 * sum(grades[i][run] for i in ids) / len(ids) for run in range(n_runs)) / n_runs
                for name, ids in sorted(groups.items())}

    by_cap: dict[str, list[str]] = defaultdict(list)
    by_set: dict[str, list[str]] = defaultdict(list)
    for item_id in grades:
        caps = sorted(set(capabilities.get(item_id) or []))  # the evaluator counts each capability once per item
        for cap in caps:
            by_cap[cap].append(item_id)
        if caps:
            by_set["_".join(caps)].append(item_id)
    totals = [100 * sum(g[run] for g in grades.values()) / len(grades) for run in range(n_runs)]
    mean = sum(totals) / n_runs if n_runs else 0.0
    std = (sum((t - mean) ** 2 for t in totals) / n_runs) ** 0.5 if n_runs else 0.0
    return {"total": mean, "by_capability": averaged(by_cap), "by_capability_integration": averaged(by_set),
            "std": std, "run_totals": totals, "count": len(grades)}
