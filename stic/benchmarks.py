"""Benchmark readers and scorers, from local files in their published formats.

Each benchmark turns its files into `Item`s (a unique id, the image, the exact prompt the model sees after
the image, and what the scorer needs) and scores a {item id: raw answer} mapping with `stic.metrics`.
Layouts follow LLaVA-1.5's `playground/data/eval/<benchmark>/`; see the README for where each file comes from.
A malformed file raises `BenchmarkFileError` naming the file and the record.

`BENCHMARKS` is a registry: this module registers the paper's eight, and a plugin module (named in a recipe's
`eval.plugins`, e.g. `stic.shapes.benchmarks`) registers its own with `register` when imported.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import json
import re
from pathlib import Path
from typing import Callable, Iterable

from stic import metrics as M
from stic.chair import ChairRules, chair_metrics, judge_description
from stic.errors import SticError

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
MULTIPLE_CHOICE = "\nAnswer with the option's letter from the given choices directly."
CHARTQA_SUFFIX = "\nAnswer the question with a single word."  # lmms-eval's ChartQA prompt


class BenchmarkFileError(SticError, ValueError):
    """A benchmark file is missing or malformed; the message names the file and record."""


class BenchmarkFileMissing(BenchmarkFileError):
    """A benchmark file (or dataset folder) does not exist."""


@dataclasses.dataclass
class Item:
    id: str
    image: str | bytes | None  # a file path, or encoded image bytes (MMBench)
    prompt: str
    meta: dict


def read_json(path: Path):
    """A JSON file's content; a missing or invalid file raises BenchmarkFileError naming it."""
    if not path.is_file():
        raise BenchmarkFileMissing(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BenchmarkFileError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None


def read_jsonl(path: Path) -> list[dict]:
    """A JSON Lines file's records (blank lines skipped); errors name the file and line."""
    if not path.is_file():
        raise BenchmarkFileMissing(f"{path} does not exist")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise BenchmarkFileError(f"{path} line {n}: not valid JSON ({err.msg})") from None
    return out


def _need(rec, keys, where: str):
    if not isinstance(rec, dict):
        raise BenchmarkFileError(f"{where}: expected an object")
    missing = [k for k in keys if k not in rec]
    if missing:
        raise BenchmarkFileError(f"{where}: missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")


# -------------------------------------------------------------------------------------------------------------
# ScienceQA-IMG


def load_scienceqa(root: Path) -> list[Item]:
    d = root / "scienceqa"
    questions = read_json(d / "llava_test_CQM-A.json")
    problems = read_json(d / "problems.json")
    if not isinstance(questions, list) or not isinstance(problems, dict):
        raise BenchmarkFileError(f"{d}: llava_test_CQM-A.json must hold a list and problems.json an object")
    items = []
    for i, rec in enumerate(questions):
        where = f"{d / 'llava_test_CQM-A.json'} record {i}"
        _need(rec, ["id", "conversations"], where)
        if "image" not in rec:
            # ScienceQA-IMG: the image questions only. The official scorer counts an answer as IMG when its
            # prompt holds '<image>', which LLaVA's model_vqa_science.py writes exactly for records with 'image'
            continue
        pid = str(rec["id"])
        if pid not in problems:
            raise BenchmarkFileError(f"{where}: id {pid} is not in problems.json")
        turns = rec["conversations"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict) or "value" not in turns[0]:
            raise BenchmarkFileError(f"{where}: conversations must be a list whose first turn has a value")
        _need(problems[pid], ["choices", "answer"], f"{d / 'problems.json'} problem {pid}")
        text = turns[0]["value"].replace("<image>\n", "").replace("<image>", "").strip()
        prob = problems[pid]
        items.append(Item(pid, str(d / "images" / "test" / rec["image"]), text + MULTIPLE_CHOICE,
                          {"n_choices": len(prob["choices"]), "answer": prob["answer"]}))
    return items


# Benchmarks whose official scorer takes an item with no prediction as FAILED instead of refusing the file
MISSING_PREDICTION_FAILS = frozenset({"scienceqa"})


def score_scienceqa(items, answers) -> tuple[dict, dict]:
    """IMG accuracy as LLaVA-1.5's eval_science_qa.py reports it. `answers` may lack items: those are FAILED
    (wrong in `per`), and, since the official script gives them the prompt 'Unknown' (no '<image>'), they are
    left out of IMG accuracy and its count."""
    per = {it.id: M.scienceqa_correct(answers.get(it.id), it.meta["n_choices"], it.meta["answer"]) for it in items}
    img = [per[it.id] for it in items if it.id in answers]
    return {"accuracy": _mean(img), "count": len(img)}, per


# -------------------------------------------------------------------------------------------------------------
# TextVQA val


def load_textvqa(root: Path) -> list[Item]:
    d = root / "textvqa"
    questions = read_jsonl(d / "llava_textvqa_val_v051_ocr.jsonl")
    annotations = read_json(d / "TextVQA_0.5.1_val.json")
    if not isinstance(annotations, dict) or "data" not in annotations:
        raise BenchmarkFileError(f"{d / 'TextVQA_0.5.1_val.json'}: expected an object with a 'data' list")
    for i, a in enumerate(annotations["data"]):
        _need(a, ["image_id", "question", "answers"], f"{d / 'TextVQA_0.5.1_val.json'} data[{i}]")
    by_key = {(a["image_id"], a["question"].lower()): a["answers"] for a in annotations["data"]}
    items = []
    for n, q in enumerate(questions, start=1):
        where = f"{d / 'llava_textvqa_val_v051_ocr.jsonl'} line {n}"
        _need(q, ["question_id", "image", "text"], where)
        # LLaVA's scorer matches on (image id, question read back from the prompt); so do we
        key = (q["question_id"], M.textvqa_question_from_prompt(q["text"]))
        if key not in by_key:
            raise BenchmarkFileError(f"{where}: no annotation for image {key[0]} and question {key[1]!r}")
        items.append(Item(f"{n}", str(d / "train_images" / q["image"]), q["text"],
                          {"image_id": q["question_id"], "answers": by_key[key]}))
    return items


def score_textvqa(items, answers):
    per = {it.id: M.vqa_soft_accuracy(answers[it.id], it.meta["answers"]) for it in items}
    return {"accuracy": _mean(per.values()), "count": len(per)}, per


# -------------------------------------------------------------------------------------------------------------
# POPE (COCO): three files, answers paired with labels by position within each


POPE_SPLITS = ("adversarial", "popular", "random")


def load_pope(root: Path) -> list[Item]:
    d = root / "pope"
    items = []
    for split in POPE_SPLITS:
        path = d / "coco" / f"coco_pope_{split}.json"  # JSON Lines despite the name
        for n, q in enumerate(read_jsonl(path), start=1):
            _need(q, ["question_id", "image", "text", "label"], f"{path} line {n}")
            if q["label"] not in ("yes", "no"):
                raise BenchmarkFileError(f"{path} line {n}: label must be 'yes' or 'no', got {q['label']!r}")
            items.append(Item(f"{split}/{q['question_id']}", str(d / "val2014" / q["image"]),
                              q["text"] + SHORT_ANSWER, {"split": split, "label": q["label"]}))
    return items


def score_pope(items, answers):
    out, per = {}, {}
    for split in POPE_SPLITS:
        sub = [it for it in items if it.meta["split"] == split]
        if not sub:
            continue
        out[split] = M.pope_scores([answers[it.id] for it in sub], [it.meta["label"] for it in sub])
        per.update({it.id: M.pope_parse(answers[it.id]) == it.meta["label"] for it in sub})
    splits = [s for s in POPE_SPLITS if s in out]
    out["f1"] = sum(out[s]["f1"] for s in splits) / len(splits)
    out["accuracy"] = sum(out[s]["accuracy"] for s in splits) / len(splits)
    return out, per


# -------------------------------------------------------------------------------------------------------------
# MMBench dev (circular rows included in the TSV)


def load_mmbench(root: Path) -> list[Item]:
    import pandas as pd

    path = root / "mmbench" / "mmbench_dev_20230712.tsv"
    if not path.is_file():
        raise BenchmarkFileMissing(f"{path} does not exist")
    df = pd.read_table(path)
    needed = ["index", "question", "A", "B", "answer", "image"]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise BenchmarkFileError(f"{path}: missing column(s) {', '.join(missing)}")
    items = []
    for row_no, row in enumerate(df.to_dict("records"), start=2):
        options = {k: str(row[k]) for k in "ABCDE" if k in row and not pd.isna(row[k])}
        hint = row.get("hint")
        prompt = ("" if hint is None or pd.isna(hint) else f"{hint}\n") + str(row["question"])
        prompt += "".join(f"\n{k}. {v}" for k, v in options.items()) + MULTIPLE_CHOICE
        try:
            image = base64.b64decode(str(row["image"]), validate=True)
        except ValueError:
            raise BenchmarkFileError(f"{path} line {row_no} (index {row['index']}): image is not base64") from None
        items.append(Item(str(int(row["index"])), image, prompt,
                          {"answer": str(row["answer"]), "choices": options,
                           "category": str(row.get("category", ""))}))
    return items


def score_mmbench(items, answers):
    rows = [{"index": int(it.id), "answer": it.meta["answer"], "prediction": answers[it.id],
             "choices": dict(it.meta["choices"]), "category": it.meta["category"]} for it in items]
    per = {it.id: M.mmbench_infer_option(answers[it.id], dict(it.meta["choices"])) == it.meta["answer"]
           for it in items}
    return M.mmbench_circular(rows), per


# -------------------------------------------------------------------------------------------------------------
# ChartQA test (human + augmented)


def load_chartqa(root: Path) -> list[Item]:
    d = root / "chartqa"
    items = []
    for split in ("human", "augmented"):
        path = d / f"test_{split}.json"
        records = read_json(path)
        if not isinstance(records, list):
            raise BenchmarkFileError(f"{path}: expected a list of records")
        for i, rec in enumerate(records):
            _need(rec, ["imgname", "query", "label"], f"{path} record {i}")
            items.append(Item(f"{split}/{i}", str(d / "png" / rec["imgname"]), rec["query"] + CHARTQA_SUFFIX,
                              {"split": split, "label": str(rec["label"])}))
    return items


def score_chartqa(items, answers):
    per = {it.id: M.relaxed_correctness(it.meta["label"], answers[it.id]) for it in items}
    out = {s: _mean(per[it.id] for it in items if it.meta["split"] == s) for s in ("human", "augmented")}
    out["accuracy"] = (out["human"] + out["augmented"]) / 2
    out["count"] = len(per)
    return out, per


# -------------------------------------------------------------------------------------------------------------
# MathVista testmini


def load_mathvista(root: Path) -> list[Item]:
    d = root / "mathvista"
    problems = read_json(d / "testmini.json")
    if not isinstance(problems, dict):
        raise BenchmarkFileError(f"{d / 'testmini.json'}: expected an object of problems by id")
    queries = read_json(d / "query.json") if (d / "query.json").exists() else {}
    items = []
    for pid, prob in problems.items():
        where = f"{d / 'testmini.json'} problem {pid}"
        _need(prob, ["question", "image", "answer", "question_type", "answer_type"], where)
        query = queries.get(pid) or prob.get("query") or prob["question"]
        items.append(Item(str(pid), str(d / prob["image"]), query,
                          {k: prob.get(k) for k in ("question_type", "answer_type", "choices", "precision",
                                                    "answer")}))
    return items


def score_mathvista(items, answers):
    per = {it.id: M.mathvista_correct(answers[it.id], it.meta)[0] for it in items}
    return {"accuracy": _mean(per.values()), "count": len(per)}, per


# -------------------------------------------------------------------------------------------------------------
# Judged: LLaVA-Bench (in the wild) and MM-Vet


def load_llava_bench(root: Path) -> list[Item]:
    d = root / "llava-bench-in-the-wild"
    questions = read_jsonl(d / "questions.jsonl")
    context_recs, answer_recs = read_jsonl(d / "context.jsonl"), read_jsonl(d / "answers_gpt4.jsonl")
    for n, c in enumerate(context_recs, start=1):
        _need(c, ["image"], f"{d / 'context.jsonl'} line {n}")
    for n, a in enumerate(answer_recs, start=1):
        _need(a, ["question_id", "text"], f"{d / 'answers_gpt4.jsonl'} line {n}")
    contexts = {c["image"]: c for c in context_recs}
    references = {a["question_id"]: a["text"] for a in answer_recs}
    items = []
    for n, q in enumerate(questions, start=1):
        _need(q, ["question_id", "image", "text", "category"], f"{d / 'questions.jsonl'} line {n}")
        caption = contexts.get(q["image"], {}).get("caption", "")
        items.append(Item(str(q["question_id"]), str(d / "images" / q["image"]), q["text"],
                          {"category": q["category"], "question": q["text"],
                           "caption": "\n".join(caption) if isinstance(caption, list) else caption,
                           "reference": references.get(q["question_id"], "")}))
    return items


def load_mmvet(root: Path) -> list[Item]:
    d = root / "mm-vet"
    data = read_json(d / "mm-vet.json")
    if not isinstance(data, dict):
        raise BenchmarkFileError(f"{d / 'mm-vet.json'}: expected an object of items by id")
    items = []
    for key, rec in data.items():
        _need(rec, ["imagename", "question", "answer"], f"{d / 'mm-vet.json'} item {key}")
        items.append(Item(key, str(d / "images" / rec["imagename"]), rec["question"],
                          {"question": rec["question"], "answer": rec["answer"],
                           "capability": rec.get("capability", [])}))
    return items


# -------------------------------------------------------------------------------------------------------------
# CHAIR on COCO val2014: object hallucination in detailed descriptions (rules in stic/chair.py)


def _chair_file(path: Path, key: str, unset: bool, what: str = "") -> Path:
    """A file the user supplies; missing: one line naming the recipe key and the file."""
    if not path.is_file():
        raise BenchmarkFileError(f"{key}{' (unset: under eval.data_root)' if unset else ''}: {path} does not exist"
                                 + (f" ({what})" if what else ""))
    return path


def _chair_image_ids(settings, pool: list[int], where: str) -> list[int]:
    """The evaluated images: those listed in eval.chair.image_ids, else `n_images` drawn from the sorted val2014
    ids with random.Random(seed).sample, in id order (all of them when n_images is null)."""
    import random

    if settings.image_ids:
        path = _chair_file(Path(settings.image_ids), "eval.chair.image_ids", False)
        known, ids = set(pool), []
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                digits = re.findall(r"\d+", line)  # an id, or a file name such as COCO_val2014_000000000042.jpg
                if not digits or int(digits[-1]) not in known:
                    raise BenchmarkFileError(f"{path} line {n}: {line.strip()!r} is no image of {where}")
                ids.append(int(digits[-1]))
        return list(dict.fromkeys(ids))
    if settings.n_images is None or settings.n_images >= len(pool):
        return sorted(pool)
    return sorted(random.Random(settings.seed).sample(sorted(pool), settings.n_images))


def load_chair(root: Path, settings) -> list[Item]:
    """COCO val2014 images with the describe prompt; `settings` is the recipe's eval.chair section (ChairConfig).
    Each item's meta holds the image's true objects: its instance categories and the objects its reference
    captions name, both mapped to the synonym list's COCO objects."""
    d = root / "chair"
    annotations = Path(settings.annotations) if settings.annotations else d / "annotations"
    instances_path, captions_path = (
        _chair_file(annotations / f"{kind}_val2014.json", "eval.chair.annotations", not settings.annotations,
                    "from COCO's annotations_trainval2014.zip") for kind in ("instances", "captions"))
    synonyms_path = _chair_file(Path(settings.synonyms) if settings.synonyms else d / "synonyms.txt",
                                "eval.chair.synonyms", not settings.synonyms,
                                "the public CHAIR synonym list, data/synonyms.txt of LisaAnne/Hallucination")
    images = Path(settings.images) if settings.images else d / "val2014"
    rules = ChairRules(synonyms_path.read_text())
    instances, captions = read_json(instances_path), read_json(captions_path)
    for path, data, keys in ((instances_path, instances, ["images", "annotations", "categories"]),
                             (captions_path, captions, ["annotations"])):
        _need(data, keys, str(path))
    category = {}
    for c in instances["categories"]:
        _need(c, ["id", "name"], f"{instances_path} category")
        if c["name"] not in rules.object_of:
            raise BenchmarkFileError(f"{synonyms_path}: no line for the COCO category {c['name']!r}")
        category[c["id"]] = rules.object_of[c["name"]]
    file_name = {}
    for i, im in enumerate(instances["images"]):
        _need(im, ["id", "file_name"], f"{instances_path} images[{i}]")
        file_name[im["id"]] = im["file_name"]
    chosen = _chair_image_ids(settings, list(file_name), str(instances_path))
    truth: dict[int, set[str]] = {i: set() for i in chosen}
    for i, a in enumerate(instances["annotations"]):  # ~290k in val2014: only the chosen images' are checked
        if isinstance(a, dict) and a.get("image_id") in truth:
            if a.get("category_id") not in category:
                raise BenchmarkFileError(f"{instances_path} annotations[{i}]: category_id "
                                         f"{a.get('category_id')!r} is not among its categories")
            truth[a["image_id"]].add(category[a["category_id"]])
    for i, a in enumerate(captions["annotations"]):
        if isinstance(a, dict) and a.get("image_id") in truth:
            _need(a, ["caption"], f"{captions_path} annotations[{i}]")
            truth[a["image_id"]].update(obj for _, obj in rules.mentions(a["caption"]))
    return [Item(str(i), str(images / file_name[i]), settings.prompt,
                 {"image_id": i, "objects": sorted(truth[i]), "rules": rules}) for i in chosen]


def score_chair(items, answers):
    """CHAIR_s, CHAIR_i and object recall in percent (the public CHAIR scorer's rules, see stic/chair.py)."""
    per = {it.id: judge_description(answers[it.id], set(it.meta["objects"]), it.meta["rules"]) for it in items}
    return chair_metrics(list(per.values())), per


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else 0.0


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    load: Callable[..., list[Item]]
    score: Callable | None  # None: scored by the LLM judge
    headline: str  # the metric key shown in tables
    max_new_tokens: int = 32
    higher_is_better: bool = True  # the headline's direction: `stic compare` averages only one direction
    config_section: str | None = None  # an eval section the loader takes after data_root (chair: eval.chair)


# The registry: the paper's benchmarks below, and those of the plugin modules a recipe names in `eval.plugins`
# (imported by `load_plugins`), e.g. ShapesWorld's in stic/shapes/benchmarks.py. Order is table column order.
BENCHMARKS: dict[str, Benchmark] = {}


class BenchmarkPluginError(SticError, ValueError):
    """A module named in `eval.plugins` (or `stic score --plugin`) cannot be imported, or a benchmark name is
    registered twice."""


def register(name: str, load: Callable[..., list[Item]], score: Callable | None, headline: str,
             max_new_tokens: int = 32, higher_is_better: bool = True,
             config_section: str | None = None) -> Benchmark:
    """Add a benchmark under `name`: `load(data_root)` gives its items, `score(items, {id: answer})` gives
    (metrics, per-item results) or is None for the judged llava_bench and mmvet; `headline` is the metric key
    tables show, `higher_is_better` its direction. With `config_section`, the loader is called as
    `load(data_root, <the eval config's section of that name>)`."""
    if name in BENCHMARKS:
        raise BenchmarkPluginError(f"benchmark {name!r} is registered twice")
    BENCHMARKS[name] = Benchmark(name, load, score, headline, max_new_tokens, higher_is_better, config_section)
    return BENCHMARKS[name]


def load_plugins(modules: Iterable[str]) -> None:
    """Import each module, which registers its benchmarks; a module already imported is not run again."""
    for module in modules:
        try:
            importlib.import_module(module)
        except BenchmarkPluginError:
            raise
        except Exception as err:  # a missing module, or one that fails as it runs (a syntax error, a bad name)
            why = str(err) if isinstance(err, ImportError) else f"{type(err).__name__}: {err}"
            raise BenchmarkPluginError(f"benchmark plugin {module!r} cannot be imported: {why}") from None


register("scienceqa", load_scienceqa, score_scienceqa, "accuracy", 16)
register("textvqa", load_textvqa, score_textvqa, "accuracy", 16)
register("chartqa", load_chartqa, score_chartqa, "accuracy", 16)
register("pope", load_pope, score_pope, "f1", 16)
register("mmbench", load_mmbench, score_mmbench, "accuracy", 16)
register("mathvista", load_mathvista, score_mathvista, "accuracy", 512)
register("llava_bench", load_llava_bench, None, "relative", 512)
register("mmvet", load_mmvet, None, "total", 512)
register("chair", load_chair, score_chair, "chair_s", 512, higher_is_better=False, config_section="chair")
PAPER_BENCHMARKS = ["scienceqa", "textvqa", "chartqa", "pope", "mmbench", "mathvista", "llava_bench", "mmvet"]


class UnknownBenchmark(SticError, ValueError):
    """A benchmark name that no imported module registered."""


def check_known(names: Iterable[str]) -> None:
    """Refuse names that are not registered, naming them and the known ones (after `load_plugins`)."""
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise UnknownBenchmark(f"unknown benchmark{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                               f"known: {', '.join(BENCHMARKS)}")


def get_benchmark(name: str) -> Benchmark:
    check_known([name])
    return BENCHMARKS[name]
