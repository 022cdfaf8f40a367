"""Small benchmark files in each benchmark's real published format (see shared formats.md), for the tests."""

import base64
import io
import json
from pathlib import Path

from tests.conftest import photo


def _img(path: Path, seed: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    photo(seed, size=(48, 40)).save(path)


def make_eval_root(root: Path) -> Path:
    # ScienceQA (LLaVA conversion + problems.json); one text-only question that IMG accuracy skips
    d = root / "scienceqa"
    problems, convs = {}, []
    for i, (pid, img) in enumerate([("77", True), ("78", True), ("79", False), ("80", True)]):
        problems[pid] = {"question": f"Which ocean {i}?", "choices": ["Pacific", "Indian", "Arctic"][: 2 + i % 2],
                         "answer": i % 2, "hint": "Look at the map." if i else "", "image": "image.png" if img else None,
                         "task": "closed choice", "grade": "grade5", "subject": "social science", "topic": "geography",
                         "category": "Geography", "skill": "oceans", "lecture": "", "solution": "", "split": "test"}
        text = ("<image>\n" if img else "") + (f"Context: {problems[pid]['hint']}\n" if problems[pid]["hint"] else "")
        text += problems[pid]["question"] + "".join(f"\n{l}. {c}" for l, c in zip("ABC", problems[pid]["choices"]))
        rec = {"id": pid, "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "AB"[i % 2]}]}
        if img:
            rec["image"] = f"{pid}/image.png"
            _img(d / "images" / "test" / pid / "image.png", i)
        convs.append(rec)
    d.mkdir(parents=True, exist_ok=True)
    (d / "problems.json").write_text(json.dumps(problems))
    (d / "llava_test_CQM-A.json").write_text(json.dumps(convs))
    (d / "pid_splits.json").write_text(json.dumps({"test": list(problems)}))

    # TextVQA: question_id is the image id and repeats across questions of one image
    d = root / "textvqa"
    qs, ann = [], []
    for i, (image_id, q) in enumerate([("0a1b", "What brand is the kettle?"), ("0a1b", "What color is it?"),
                                       ("ff00", "What number is shown?")]):
        _img(d / "train_images" / f"{image_id}.jpg", 10 + i)
        qs.append({"question_id": image_id, "image": f"{image_id}.jpg",
                   "text": f"{q}\nReference OCR token: ACME, 2L\nAnswer the question using a single word or phrase.",
                   "category": "default"})
        ann.append({"question": q, "image_id": image_id, "question_id": 100 + i,
                    "answers": ["acme"] * 6 + ["the acme"] * 2 + ["kettle"] * 2, "question_tokens": [],
                    "image_classes": [], "image_width": 48, "image_height": 40, "flickr_original_url": "",
                    "flickr_300k_url": "", "set_name": "val"})
    (d / "llava_textvqa_val_v051_ocr.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    (d / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_type": "val", "data": ann}))

    # POPE: JSON Lines despite .json, three splits
    d = root / "pope"
    for s, split in enumerate(("random", "popular", "adversarial")):
        lines = []
        for i in range(3):
            name = f"COCO_val2014_00000000012{i}.jpg"
            _img(d / "val2014" / name, 20 + i)
            lines.append({"question_id": i + 1, "image": name, "text": f"Is there a {['kite', 'dog', 'cup'][i]} in "
                          "the image?", "label": ["yes", "no", "yes"][(i + s) % 3]})
        (d / "coco").mkdir(parents=True, exist_ok=True)
        (d / "coco" / f"coco_pope_{split}.json").write_text("".join(json.dumps(x) + "\n" for x in lines))

    # MMBench dev TSV with base64 images and a circular copy (index >= 1e6)
    d = root / "mmbench"
    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    photo(30, size=(48, 40)).save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    rows = [["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "source", "comment",
             "split", "image"],
            ["42", "Which fruit?", "nan", "pear", "lime", "plum", "", "C", "cat_x", "l2_y", "toy", "", "dev", b64],
            ["1000042", "Which fruit?", "nan", "plum", "pear", "lime", "", "A", "cat_x", "l2_y", "toy", "", "dev", b64],
            ["43", "What shape?", "A hint.", "circle", "square", "", "", "B", "cat_y", "l2_y", "toy", "", "dev", b64]]
    (d / "mmbench_dev_20230712.tsv").write_text("\n".join("\t".join(r) for r in rows) + "\n")

    # ChartQA: two JSON arrays and png/
    d = root / "chartqa"
    for split, recs in (("human", [("9001.png", "What is the tallest bar?", "42.5")]),
                        ("augmented", [("9002.png", "Is it rising?", "Yes"), ("9003.png", "Share?", "45%")])):
        for k, (img, _, _) in enumerate(recs):
            _img(d / "png" / img, 40 + k)
        (d / f"test_{split}.json").write_text(json.dumps([{"imgname": a, "query": b, "label": c} for a, b, c in recs]))

    # MathVista testmini: dict keyed by pid, answer is the option text for multiple choice
    d = root / "mathvista"
    probs = {
        "1": {"pid": "1", "question": "Area of the square?", "image": "images/1.jpg", "choices": None, "unit": "cm^2",
              "precision": None, "answer": "16", "question_type": "free_form", "answer_type": "integer",
              "query": "Hint: Please answer the question requiring an integer answer.\nQuestion: Area of the square?",
              "metadata": {"split": "testmini", "language": "english", "source": "Toy", "task": "geometry"}},
        "2": {"pid": "2", "question": "Which is larger?", "image": "images/2.jpg", "choices": ["3", "4"],
              "unit": None, "precision": None, "answer": "4", "question_type": "multi_choice",
              "answer_type": "text", "query": "Hint: Please answer the question and provide the correct option "
              "letter, e.g., A, B, C, D, at the end.\nQuestion: Which is larger?\nChoices:\n(A) 3\n(B) 4",
              "metadata": {"split": "testmini", "language": "english", "source": "Toy", "task": "math"}},
    }
    for pid in probs:
        _img(d / "images" / f"{pid}.jpg", 50 + int(pid))
    (d / "testmini.json").write_text(json.dumps(probs))

    # LLaVA-Bench in the wild
    d = root / "llava-bench-in-the-wild"
    _img(d / "images" / "001.jpg", 60)
    (d / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in [
        {"question_id": 0, "image": "001.jpg", "text": "What is in the picture?", "category": "conv"},
        {"question_id": 1, "image": "001.jpg", "text": "Describe it in detail.", "category": "detail"}]))
    (d / "context.jsonl").write_text(json.dumps({"id": "001", "image": "001.jpg", "caption": "A red block."}) + "\n")
    (d / "answers_gpt4.jsonl").write_text("".join(json.dumps({"question_id": i, "text": "A red block.",
                                                              "answer_id": "x"}) + "\n" for i in range(2)))

    # MM-Vet
    d = root / "mm-vet"
    _img(d / "images" / "v1_0.png", 70)
    (d / "mm-vet.json").write_text(json.dumps({"v1_0": {"imagename": "v1_0.png", "question": "What is 3+4?",
                                                        "answer": "7<OR>seven", "capability": ["ocr", "math"]}}))
    return root
