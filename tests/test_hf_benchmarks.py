"""stic/hf_benchmarks.py: the paper's benchmarks from Hugging Face datasets in lmms-eval's layout give the items
(prompts, ids, scoring inputs) and the scores of the official layout, and a wrong dataset stops with one line."""

import csv
import json
import math
from pathlib import Path

import datasets
import pytest

from stic.benchmarks import PAPER_BENCHMARKS, BenchmarkFileError, BenchmarkFileMissing, get_benchmark
from stic.evaluate import load_items
from stic.hf_benchmarks import LAYOUTS, load_hf_benchmark
from stic.images import decode_image
from stic.recipe import BenchmarkSource, EvalConfig


def _image(path: Path) -> dict:
    return {"bytes": path.read_bytes(), "path": path.name}


# The eval_root fixture's questions (tests/bench_files.py) rewritten as the rows of lmms-eval's dataset copies,
# in the columns its task files read (lmms_eval/tasks/<task>/)


def scienceqa_rows(root):
    d = root / "scienceqa"
    problems = json.loads((d / "problems.json").read_text())
    rows = []
    for pid, p in problems.items():  # the copy keeps the ScienceQA columns, not the pid
        image = d / "images" / "test" / pid / "image.png"
        rows.append({"image": _image(image) if p["image"] else None, "question": p["question"],
                     "choices": p["choices"], "answer": p["answer"], "hint": p["hint"], "task": p["task"],
                     "lecture": p["lecture"], "solution": p["solution"]})
    return rows


def textvqa_rows(root):
    d = root / "textvqa"
    lines = [json.loads(x) for x in (d / "llava_textvqa_val_v051_ocr.jsonl").read_text().splitlines()]
    annotations = json.loads((d / "TextVQA_0.5.1_val.json").read_text())["data"]
    rows = []
    for line, a in zip(lines, annotations):
        tokens = line["text"].split("\n")[1].removeprefix("Reference OCR token: ").split(", ")
        rows.append({"image_id": a["image_id"], "question_id": a["question_id"], "question": a["question"],
                     "image": _image(d / "train_images" / line["image"]), "answers": a["answers"],
                     "ocr_tokens": tokens, "set_name": "val"})
    return rows


def chartqa_rows(root):
    d = root / "chartqa"
    return [{"type": f"{split}_test", "question": r["query"], "answer": r["label"],
             "image": _image(d / "png" / r["imgname"])}
            for split in ("human", "augmented") for r in json.loads((d / f"test_{split}.json").read_text())]


def pope_rows(root):
    d = root / "pope"
    rows = []
    for split in ("random", "popular", "adversarial"):  # not the official loader's order: items come out in its
        for line in (d / "coco" / f"coco_pope_{split}.json").read_text().splitlines():
            q = json.loads(line)
            rows.append({"id": str(len(rows)), "question_id": str(q["question_id"]), "question": q["text"],
                         "answer": q["label"], "image_source": q["image"].removesuffix(".jpg"),
                         "image": _image(d / "val2014" / q["image"]), "category": split})
    return rows


def mmbench_rows(root):
    import base64

    with open(root / "mmbench" / "mmbench_dev_20230712.tsv", newline="") as fh:
        records = list(csv.DictReader(fh, delimiter="\t"))
    # the copy writes no option as None and keeps "nan" hints as text; both are missing, as pandas reads the TSV
    return [{"index": r["index"], "question": r["question"], "hint": r["hint"],
             **{k: r[k] or None for k in "ABCD"}, "answer": r["answer"], "category": r["category"],
             "image": {"bytes": base64.b64decode(r["image"]), "path": None}, "source": r["source"],
             "L2-category": r["l2-category"], "comment": r["comment"], "split": r["split"]} for r in records]


def mathvista_rows(root):
    d = root / "mathvista"
    return [{"pid": pid, "question": p["question"], "image": p["image"], "decoded_image": _image(d / p["image"]),
             "choices": p["choices"], "unit": p["unit"],
             "precision": math.nan if p["precision"] is None else float(p["precision"]),  # a float column
             "answer": p["answer"], "question_type": p["question_type"], "answer_type": p["answer_type"],
             "query": p["query"]} for pid, p in json.loads((d / "testmini.json").read_text()).items()]


def llava_bench_rows(root):
    d = root / "llava-bench-in-the-wild"
    read = lambda name: [json.loads(x) for x in (d / name).read_text().splitlines()]  # noqa: E731
    captions = {c["image"]: c["caption"] for c in read("context.jsonl")}
    references = {a["question_id"]: a["text"] for a in read("answers_gpt4.jsonl")}
    return [{"question_id": q["question_id"], "question": q["text"], "image": _image(d / "images" / q["image"]),
             "caption": captions[q["image"]], "gpt_answer": references[q["question_id"]], "category": q["category"],
             "image_id": q["image"].removesuffix(".jpg")} for q in read("questions.jsonl")]


def mmvet_rows(root):
    d = root / "mm-vet"
    return [{"question_id": key, "image": _image(d / "images" / r["imagename"]), "question": r["question"],
             "answer": r["answer"], "image_source": r["imagename"], "capability": ",".join(r["capability"])}
            for key, r in json.loads((d / "mm-vet.json").read_text()).items()]


ROWS = {"scienceqa": scienceqa_rows, "textvqa": textvqa_rows, "chartqa": chartqa_rows, "pope": pope_rows,
        "mmbench": mmbench_rows, "mathvista": mathvista_rows, "llava_bench": llava_bench_rows, "mmvet": mmvet_rows}


def as_dataset(rows, image_column="image") -> datasets.Dataset:
    return datasets.Dataset.from_list(rows).cast_column(image_column, datasets.Image())


def write_hub_copy(name, rows, folder: Path) -> Path:
    """The rows in one of the local layouts a user gets from the Hub: parquet files named by split (ScienceQA as a
    snapshot with one folder per configuration), or a save_to_disk folder (MMBench)."""
    layout = LAYOUTS[name]
    ds = as_dataset(rows, "decoded_image" if name == "mathvista" else "image")
    if name == "mmbench":
        datasets.DatasetDict({layout.split: ds}).save_to_disk(str(folder))
    else:
        sub = folder / (layout.config if layout.config else "data")
        sub.mkdir(parents=True)
        ds.to_parquet(str(sub / f"{layout.split}-00000-of-00001.parquet"))
    return folder


@pytest.fixture(scope="module")
def hub_root(eval_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    for name in PAPER_BENCHMARKS:
        write_hub_copy(name, ROWS[name](eval_root), root / name)
    return root


# Answers that score right on some items and wrong on others, cycled over each benchmark's items
ANSWERS = {"scienceqa": ["A", "B. Indian", "The answer is C."], "textvqa": ["Acme", "kettle", "the ACME"],
           "chartqa": ["42.5", "no", "0.45"], "pope": ["Yes, there is.", "No.", "There is not a kite."],
           "mmbench": ["C", "B. pear", "The answer is B"], "mathvista": ["16", "(A) 3"],
           "llava_bench": ["A red block."], "mmvet": ["7"]}


def answers_for(name, items) -> dict:
    return {it.id: ANSWERS[name][n % len(ANSWERS[name])] for n, it in enumerate(items)}


def pixels(image) -> bytes:
    return decode_image(image, max_pixels=10**6, max_decode_pixels=10**7).tobytes()


@pytest.mark.parametrize("name", PAPER_BENCHMARKS)
def test_hub_layout_gives_the_official_items_and_scores(name, eval_root, hub_root):
    official = get_benchmark(name).load(eval_root)
    hub = load_hf_benchmark(name, str(hub_root / name))
    assert len(hub) == len(official) > 0
    assert [it.prompt for it in hub] == [it.prompt for it in official]
    assert [it.meta for it in hub] == [it.meta for it in official]  # what the scorer (or the judge) reads
    if name == "scienceqa":  # the copy has no pid: items are numbered by row (the text-only row skipped)
        assert [it.id for it in hub] == ["test/0", "test/1", "test/3"]
    else:
        assert [it.id for it in hub] == [it.id for it in official]
    assert all(isinstance(it.image, bytes) for it in hub)
    assert [pixels(it.image) for it in hub] == [pixels(it.image) for it in official]
    score = get_benchmark(name).score
    if score is not None:  # the same answers, item for item, score the same
        answers = answers_for(name, official)
        hub_answers = {h.id: answers[o.id] for h, o in zip(hub, official)}
        (metrics, per), (hub_metrics, hub_per) = score(official, answers), score(hub, hub_answers)
        assert hub_metrics == metrics
        assert [hub_per[h.id] for h in hub] == [per[o.id] for o in official]
        assert 0 < sum(per.values()) < len(per)  # the answers tell right from wrong


def test_recipe_source_section_reads_the_hub_copy(eval_root, hub_root, tmp_path):
    cfg = EvalConfig(data_root=str(tmp_path / "no-official-files"), benchmarks=["pope", "chartqa"], limit=4,
                     pope=BenchmarkSource(hf_dataset=str(hub_root / "pope")))
    items = load_items(cfg, "pope")
    assert [it.id for it in items] == [it.id for it in get_benchmark("pope").load(eval_root)][:4]
    with pytest.raises(BenchmarkFileMissing) as err:  # chartqa has no source section: its official files
        load_items(cfg, "chartqa")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "no-official-files" / "chartqa") in message
    assert "eval.chartqa.hf_dataset" in message and "lmms-lab/ChartQA" in message


def test_a_lone_parquet_file_and_other_splits_and_configurations(eval_root, tmp_path):
    rows = pope_rows(eval_root)
    one_file = tmp_path / "pope.parquet"
    as_dataset(rows).to_parquet(str(one_file))
    assert len(load_hf_benchmark("pope", str(one_file))) == 9
    # the copy's `Full` configuration: one split per category, no category column
    full = tmp_path / "Full"
    full.mkdir()
    as_dataset([{k: v for k, v in r.items() if k != "category"} for r in rows if r["category"] == "popular"]
               ).to_parquet(str(full / "popular-00000-of-00001.parquet"))
    items = load_hf_benchmark("pope", str(tmp_path), hf_config="Full", split="popular")
    assert [it.id for it in items] == ["popular/1", "popular/2", "popular/3"]
    # a Hub snapshot keeps its card, which declares where each configuration's splits are
    (tmp_path / "README.md").write_text("---\nconfigs:\n- config_name: Full\n  data_files:\n  - split: popular\n"
                                        "    path: Full/popular-*\n---\n")
    items = load_hf_benchmark("pope", str(tmp_path), hf_config="Full", split="popular")
    assert [it.id for it in items] == ["popular/1", "popular/2", "popular/3"]


def one_line_error(name, path, **kw) -> str:
    with pytest.raises(BenchmarkFileError) as err:
        load_hf_benchmark(name, str(path), **kw)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_wrong_dataset_stops_with_one_line_naming_the_layout(eval_root, tmp_path):
    rows = [{("text" if k == "question" else k): v for k, v in r.items()} for r in mmvet_rows(eval_root)]
    write_hub_copy("mmvet", rows, tmp_path / "renamed")
    message = one_line_error("mmvet", tmp_path / "renamed")
    assert "missing column question" in message and "lmms-lab/MMVet" in message and str(tmp_path / "renamed") in message
    message = one_line_error("mmvet", tmp_path / "absent")
    assert "does not exist" in message and str(tmp_path / "absent") in message and "lmms-lab/MMVet" in message
    message = one_line_error("mmvet", tmp_path / "renamed", split="validation")
    assert "split validation" in message and "cannot be loaded" in message
    write_hub_copy("mmbench", mmbench_rows(eval_root), tmp_path / "saved")
    message = one_line_error("mmbench", tmp_path / "saved", split="test")
    assert "no split 'test'" in message and "splits: dev" in message and "eval.mmbench.split" in message
