"""A small self-made set of every paper benchmark in its official file layout, for a first eval run offline.

    python -m stic.eval_fixtures OUT [--force]

Writes 3-6 items per benchmark under OUT in the layouts the loaders of stic/benchmarks.py read (LLaVA-1.5's
`playground/data/eval`): tiny drawings made with PIL and questions and answers written for them, none taken
from a benchmark. The default recipe's `eval.data_root` points here and `make eval` makes it when missing, so
the eval table of a first run is real even without benchmark files. Its scores mean nothing beyond that.

The output is the same on every run. A folder that holds other files is never written into; one this module
wrote (it carries FIXTURE_MARKER) is left as it is unless --force.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from stic.benchmarks import SHORT_ANSWER
from stic.errors import SticError, one_line

FIXTURE_MARKER = "stic_eval_fixture.json"
FIXTURE_VERSION = 1

# How many items each benchmark's official loader gives on the fixture
COUNTS = {"scienceqa": 4, "textvqa": 4, "chartqa": 4, "pope": 6, "mmbench": 4, "mathvista": 4, "llava_bench": 3,
          "mmvet": 3}


class FixtureError(SticError, ValueError):
    """The fixture's folder holds files this module did not write."""


# -------------------------------------------------------------------------------------------------------------
# Drawings


COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 200, 30),
          "black": (20, 20, 20), "white": (255, 255, 255), "gray": (150, 150, 150)}


def _canvas(size=(96, 96), background="white") -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", size, COLORS[background])
    return img, ImageDraw.Draw(img)


def shapes(*items, size=(96, 96), background="white") -> Image.Image:
    """A drawing of (kind, colour, (x0, y0, x1, y1)) shapes; kind is circle, square or triangle."""
    img, draw = _canvas(size, background)
    for kind, color, (x0, y0, x1, y1) in items:
        if kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=COLORS[color])
        elif kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=COLORS[color])
        else:
            draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=COLORS[color])
    return img


def sign(text: str, board="red", ink="white", size=(96, 64)) -> Image.Image:
    """A board with a word written on it (PIL's built-in font)."""
    img, draw = _canvas(size, "gray")
    draw.rectangle((8, 12, size[0] - 8, size[1] - 12), fill=COLORS[board])
    draw.text((16, size[1] // 2 - 6), text, fill=COLORS[ink])
    return img


def bar_chart(values: dict[str, int], size=(120, 96)) -> Image.Image:
    """Labelled bars with their values written above them."""
    img, draw = _canvas(size)
    width = size[0] // (len(values) + 1)
    for i, (label, value) in enumerate(values.items()):
        x0 = width // 2 + i * width
        top = size[1] - 14 - value * 8
        draw.rectangle((x0, top, x0 + width - 6, size[1] - 14), fill=COLORS["blue"])
        draw.text((x0 + 2, size[1] - 12), label, fill=COLORS["black"])
        draw.text((x0 + 2, top - 11), str(value), fill=COLORS["black"])
    return img


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def _write_jsonl(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


# -------------------------------------------------------------------------------------------------------------
# One writer per benchmark, in the layouts of shared formats (LLaVA-1.5's eval files and the benchmarks' own)


def write_scienceqa(root: Path) -> None:
    d = root / "scienceqa"
    questions = [  # (pid, drawing or None for a text-only question, hint, question, choices, answer index)
        ("1", shapes(("circle", "red", (24, 24, 72, 72))), "", "Which shape is in the picture?",
         ["circle", "square", "triangle"], 0),
        ("2", shapes(("square", "blue", (28, 28, 68, 68))), "The picture shows one square.",
         "What color is the square?", ["green", "blue"], 1),
        ("3", shapes(*[("circle", "black", (10 + 28 * i, 40, 26 + 28 * i, 56)) for i in range(3)]), "",
         "How many dots are in the picture?", ["two", "three", "four"], 1),
        ("4", shapes(("circle", "green", (4, 20, 60, 76)), ("circle", "green", (70, 40, 86, 56))),
         "Look at the two circles.", "Which circle is larger?", ["the left circle", "the right circle"], 0),
        ("5", None, "", "Which of these is a liquid at room temperature?", ["water", "iron"], 0),
    ]
    problems, conversations = {}, []
    for pid, drawing, hint, question, choices, answer in questions:
        problems[pid] = {"question": question, "choices": choices, "answer": answer, "hint": hint,
                         "image": "image.png" if drawing else None, "task": "closed choice", "grade": "grade2",
                         "subject": "natural science", "topic": "shapes", "category": "Fixture", "skill": "looking",
                         "lecture": "", "solution": "", "split": "test"}
        text = ("<image>\n" if drawing else "") + (f"Context: {hint}\n" if hint else "") + question
        text += "".join(f"\n{letter}. {choice}" for letter, choice in zip("ABCDE", choices))
        record = {"id": pid, "conversations": [{"from": "human", "value": text},
                                               {"from": "gpt", "value": "ABCDE"[answer]}]}
        if drawing:
            record["image"] = f"{pid}/image.png"
            _save(drawing, d / "images" / "test" / pid / "image.png")
        conversations.append(record)
    _write_json(d / "problems.json", problems)
    _write_json(d / "pid_splits.json", {"test": list(problems)})
    _write_json(d / "llava_test_CQM-A.json", conversations)


def write_textvqa(root: Path) -> None:
    d = root / "textvqa"
    images = {"f1c0000000000001": sign("STOP"), "f1c0000000000002": sign("CAFE 24", board="green"),
              "f1c0000000000003": sign("EXIT", board="blue")}
    questions = [  # (image id, question, OCR tokens, ten human answers)
        ("f1c0000000000001", "what word is on the sign?", ["STOP"], ["stop"] * 9 + ["stop sign"]),
        ("f1c0000000000002", "what is the name of the place?", ["CAFE", "24"], ["cafe"] * 7 + ["cafe 24"] * 3),
        ("f1c0000000000002", "what number is written on the sign?", ["CAFE", "24"], ["24"] * 10),
        ("f1c0000000000003", "what does the sign say?", ["EXIT"], ["exit"] * 8 + ["exit sign"] * 2),
    ]
    for image_id, img in images.items():
        _save(img, d / "train_images" / f"{image_id}.jpg")
    lines, annotations = [], []
    for n, (image_id, question, tokens, answers) in enumerate(questions):
        # LLaVA's question file: question_id is the image id; the text carries the OCR tokens and the suffix
        lines.append({"question_id": image_id, "image": f"{image_id}.jpg", "category": "default",
                      "text": f"{question}\nReference OCR token: {', '.join(tokens)}{SHORT_ANSWER}"})
        annotations.append({"question": question, "image_id": image_id, "question_id": 900 + n, "answers": answers,
                            "question_tokens": question.rstrip("?").split(), "image_classes": ["Sign"],
                            "image_width": 96, "image_height": 64, "flickr_original_url": "", "flickr_300k_url": "",
                            "set_name": "val"})
    _write_jsonl(d / "llava_textvqa_val_v051_ocr.jsonl", lines)
    _write_json(d / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "dataset_name": "fixture", "data": annotations})


def write_pope(root: Path) -> None:
    d = root / "pope"
    images = {"fixture_pope_1.jpg": shapes(("circle", "red", (10, 10, 50, 50)), ("square", "blue", (56, 56, 88, 88))),
              "fixture_pope_2.jpg": shapes(("triangle", "green", (20, 20, 76, 76))),
              "fixture_pope_3.jpg": shapes(("square", "yellow", (16, 30, 48, 62)),
                                           ("circle", "black", (60, 40, 80, 60)))}
    for name, img in images.items():
        _save(img, d / "val2014" / name)
    per_split = {  # two questions per file, one yes and one no: (image, object, label)
        "adversarial": [("fixture_pope_1.jpg", "circle", "yes"), ("fixture_pope_2.jpg", "square", "no")],
        "popular": [("fixture_pope_3.jpg", "square", "yes"), ("fixture_pope_1.jpg", "triangle", "no")],
        "random": [("fixture_pope_2.jpg", "triangle", "yes"), ("fixture_pope_3.jpg", "triangle", "no")],
    }
    for split, questions in per_split.items():  # JSON Lines despite the .json name, as POPE's files are
        _write_jsonl(d / "coco" / f"coco_pope_{split}.json",
                     [{"question_id": n, "image": image, "text": f"Is there a {obj} in the image?", "label": label}
                      for n, (image, obj, label) in enumerate(questions, start=1)])


def write_mmbench(root: Path) -> None:
    d = root / "mmbench"
    d.mkdir(parents=True, exist_ok=True)

    def b64(img):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    circle = b64(shapes(("circle", "red", (24, 24, 72, 72))))
    dots = b64(shapes(*[("circle", "blue", (8 + 22 * i, 40, 22 + 22 * i, 54)) for i in range(4)]))
    split = b64(shapes(("square", "green", (4, 30, 36, 62)), ("triangle", "yellow", (56, 30, 92, 66))))
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "source",
              "comment", "split", "image"]
    rows = [  # index >= 1e6: a circular copy of question index % 1e6, its options rotated
        ["1", "What color is the circle?", "nan", "red", "green", "blue", "", "A", "color", "attribute", "fixture",
         "", "dev", circle],
        ["1000001", "What color is the circle?", "nan", "green", "blue", "red", "", "C", "color", "attribute",
         "fixture", "", "dev", circle],
        ["2", "How many dots are there?", "Count the dots in one row.", "three", "four", "five", "six", "B",
         "counting", "perception", "fixture", "", "dev", dots],
        ["3", "Which shape is on the right?", "nan", "a square", "a triangle", "", "", "B", "position",
         "relation", "fixture", "", "dev", split],
    ]
    (d / "mmbench_dev_20230712.tsv").write_text("\n".join("\t".join(r) for r in [header] + rows) + "\n")


def write_chartqa(root: Path) -> None:
    d = root / "chartqa"
    charts = {"fixture_chart_1.png": {"A": 3, "B": 7, "C": 5}, "fixture_chart_2.png": {"A": 6, "B": 2, "C": 4}}
    for name, values in charts.items():
        _save(bar_chart(values), d / "png" / name)
    _write_json(d / "test_human.json", [
        {"imgname": "fixture_chart_1.png", "query": "What is the value of the tallest bar?", "label": "7"},
        {"imgname": "fixture_chart_2.png", "query": "Which bar is the shortest?", "label": "B"}])
    _write_json(d / "test_augmented.json", [
        {"imgname": "fixture_chart_1.png", "query": "What is the value of bar C?", "label": "5"},
        {"imgname": "fixture_chart_2.png", "query": "Is bar A taller than bar B?", "label": "Yes"}])


def write_mathvista(root: Path) -> None:
    d = root / "mathvista"
    integer_hint = ("Hint: Please answer the question requiring an integer answer and provide the final value, "
                    "e.g., 1, 2, 3, at the end.")
    choice_hint = ("Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, "
                   "at the end.")
    float_hint = ("Hint: Please answer the question requiring a floating-point number with one decimal place and "
                  "provide the final value, e.g., 1.2, 1.3, 1.4, at the end.")
    problems = {  # pid: (drawing, question, choices, unit, precision, answer, question type, answer type, hint)
        "1": (shapes(*[("square", "blue", (6 + 30 * i, 36, 26 + 30 * i, 56)) for i in range(3)]),
              "How many squares are in the picture?", None, None, None, "3", "free_form", "integer", integer_hint),
        "2": (shapes(("circle", "red", (6, 30, 36, 60)), ("triangle", "green", (34, 30, 64, 60)),
                     ("square", "blue", (66, 30, 92, 56))),
              "Which shape has the most corners?", ["circle", "triangle", "square"], None, None, "square",
              "multi_choice", "text", choice_hint),
        "3": (sign("2.5 cm", board="white", ink="black"), "How long is the line in centimetres?", None, "cm", 1,
              "2.5", "free_form", "float", float_hint),
        "4": (sign("4 + 5", board="yellow", ink="black"), "What is the sum of the two numbers?", None, None, None,
              "9", "free_form", "integer", integer_hint),
    }
    testmini = {}
    for pid, (drawing, question, choices, unit, precision, answer, qtype, atype, hint) in problems.items():
        _save(drawing.convert("RGB"), d / "images" / f"{pid}.jpg")
        query = f"{hint}\nQuestion: {question}"
        if choices:
            query += "\nChoices:\n" + "\n".join(f"({'ABCDE'[i]}) {c}" for i, c in enumerate(choices))
        testmini[pid] = {"pid": pid, "question": question, "image": f"images/{pid}.jpg", "choices": choices,
                         "unit": unit, "precision": precision, "answer": answer, "question_type": qtype,
                         "answer_type": atype, "query": query,
                         "metadata": {"split": "testmini", "language": "english", "source": "fixture",
                                      "category": "math-targeted-vqa", "task": "figure question answering",
                                      "context": "synthetic scene", "grade": "elementary school",
                                      "skills": ["arithmetic reasoning"], "img_width": 96, "img_height": 96}}
    _write_json(d / "testmini.json", testmini)


def write_llava_bench(root: Path) -> None:
    d = root / "llava-bench-in-the-wild"
    _save(shapes(("circle", "yellow", (30, 8, 66, 44)), ("square", "green", (0, 60, 96, 96)), background="white"),
          d / "images" / "001.jpg")
    _save(sign("OPEN", board="green"), d / "images" / "002.jpg")
    _write_jsonl(d / "context.jsonl", [
        {"id": "001", "image": "001.jpg", "caption": "A yellow circle above a green strip, like a sun over grass."},
        {"id": "002", "image": "002.jpg", "caption": "A green board with the word OPEN written in white."}])
    questions = [  # (question id, image, category, question, reference answer)
        (0, "001.jpg", "conv", "What color is the circle?", "The circle is yellow."),
        (1, "001.jpg", "detail", "Describe the picture in detail.",
         "A plain drawing: a yellow circle near the top sits above a green strip that runs along the bottom edge, "
         "on a white background, which reads like a sun over grass."),
        (2, "002.jpg", "complex", "What might this sign tell a passer-by?",
         "The sign reads OPEN, so it tells a passer-by that the shop or office behind it is open and they may "
         "come in."),
    ]
    _write_jsonl(d / "questions.jsonl", [{"question_id": q, "image": image, "text": text, "category": category}
                                         for q, image, category, text, _ in questions])
    _write_jsonl(d / "answers_gpt4.jsonl", [{"question_id": q, "text": reference, "answer_id": f"fixture-{q}",
                                            "model_id": "fixture-reference", "metadata": {}}
                                           for q, _, _, _, reference in questions])


def write_mmvet(root: Path) -> None:
    d = root / "mm-vet"
    items = {  # key: (drawing, file name, question, answer, capabilities)
        "v1_0": (sign("OPEN", board="green"), "v1_0.png", "What is written on the sign?", "OPEN", ["ocr"]),
        "v1_1": (sign("3 + 4", board="white", ink="black"), "v1_1.png", "What is the result of the sum shown?",
                 "7<OR>seven", ["ocr", "math"]),
        "v1_2": (shapes(("circle", "red", (8, 30, 40, 62)), ("square", "blue", (56, 30, 88, 62))), "v1_2.png",
                 "Which shapes are in the picture, and what colors are they?", "a red circle <AND> a blue square",
                 ["rec", "spat"]),
    }
    data = {}
    for key, (drawing, name, question, answer, capability) in items.items():
        _save(drawing, d / "images" / name)
        data[key] = {"imagename": name, "question": question, "answer": answer, "capability": capability}
    _write_json(d / "mm-vet.json", data)


WRITERS = {"scienceqa": write_scienceqa, "textvqa": write_textvqa, "chartqa": write_chartqa, "pope": write_pope,
           "mmbench": write_mmbench, "mathvista": write_mathvista, "llava_bench": write_llava_bench,
           "mmvet": write_mmvet}


def make_fixture(out: str | Path, force: bool = False) -> bool:
    """Write the fixture under `out`; returns False when a current one is already there (and not `force`).
    Refuses a folder that holds files this module did not write."""
    out = Path(out)
    marker = out / FIXTURE_MARKER
    if marker.exists():
        try:
            current = json.loads(marker.read_text()).get("version") == FIXTURE_VERSION
        except (json.JSONDecodeError, AttributeError):
            current = False
        if current and not force:
            return False
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FixtureError(f"{out} exists and is not an eval fixture ({FIXTURE_MARKER} is missing); the fixture "
                           "is written only into a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    for write in WRITERS.values():
        write(out)
    _write_json(marker, {"version": FIXTURE_VERSION, "items": COUNTS,
                         "note": "self-made fixture (stic/eval_fixtures.py): drawings and questions written for the "
                                 "toolkit's first offline run; its scores mean nothing"})
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stic.eval_fixtures", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="the folder to write (eval.data_root of the recipe that reads it)")
    ap.add_argument("--force", action="store_true", help="write it again over an earlier fixture")
    args = ap.parse_args(argv)
    try:
        written = make_fixture(args.out, force=args.force)
    except SticError as err:
        print(f"eval_fixtures: error: {one_line(err)}", file=sys.stderr)
        return 2
    total = sum(COUNTS.values())
    print(f"eval fixture: {'wrote' if written else 'already at'} {args.out} ({total} items, {len(COUNTS)} benchmarks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
