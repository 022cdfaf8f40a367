"""The paper's benchmarks from Hugging Face datasets in lmms-eval's layout (`eval.<benchmark>.hf_dataset`).

Each loader reads the columns lmms-eval's task file reads (lmms_eval/tasks/<task>/) and builds the `Item`s the
official-layout loader in stic/benchmarks.py builds from the same questions: the same prompt (LLaVA-1.5's, not
lmms-eval's own wording), the same id where the Hub copy carries it, the same scoring inputs, so one answer
scores the same from either layout. Images stay encoded (`Item.image` holds the file's bytes) until eval decodes
them. Where a Hub copy lacks what the official files carry (ScienceQA's pid, POPE's pinned random split), the
README's eval section says what differs.

A dataset is a Hub name, one parquet file, or a local folder (parquet files named by split, a Hub snapshot, a
`save_to_disk` folder), all read through `datasets` (see `open_dataset`).
"""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path

from stic.benchmarks import (CHARTQA_SUFFIX, MULTIPLE_CHOICE, POPE_SPLITS, SHORT_ANSWER, BenchmarkFileError,
                             BenchmarkFileMissing, Item, get_benchmark)


@dataclasses.dataclass(frozen=True)
class HubLayout:
    dataset: str  # the Hub dataset lmms-eval's task file names (dataset_path)
    config: str | None  # its dataset_name
    split: str  # its test_split
    columns: tuple[str, ...]  # the columns the loader needs
    optional: tuple[str, ...] = ()  # columns it reads when present


LAYOUTS = {
    "scienceqa": HubLayout("lmms-lab/ScienceQA", "ScienceQA-IMG", "test", ("question", "choices", "answer", "hint",
                                                                          "image")),
    "textvqa": HubLayout("lmms-lab/textvqa", None, "validation", ("image_id", "question", "answers", "ocr_tokens",
                                                                  "image")),
    "chartqa": HubLayout("lmms-lab/ChartQA", None, "test", ("type", "question", "answer", "image")),
    "pope": HubLayout("lmms-lab/POPE", None, "test", ("question_id", "question", "answer", "category", "image")),
    "mmbench": HubLayout("lmms-lab/MMBench", "en", "dev", ("index", "question", "hint", "A", "B", "answer",
                                                           "category", "image"), ("C", "D", "E")),
    "mathvista": HubLayout("AI4Math/MathVista", None, "testmini", ("pid", "query", "decoded_image", "answer",
                                                                   "question_type", "answer_type"),
                           ("choices", "precision")),
    "llava_bench": HubLayout("lmms-lab/llava-bench-in-the-wild", None, "train", ("question_id", "question", "image",
                                                                                 "caption", "gpt_answer",
                                                                                 "category")),
    "mmvet": HubLayout("lmms-lab/MMVet", None, "test", ("question_id", "question", "answer", "capability",
                                                        "image")),
}

# The image column of each layout (MathVista's `image` holds the file's name; the pixels are in `decoded_image`)
IMAGE_COLUMN = {name: "decoded_image" if name == "mathvista" else "image" for name in LAYOUTS}


def load_benchmark(name: str, data_root: Path, hf_dataset: str | None = None, hf_config: str | None = None,
                   split: str | None = None, sections: tuple = ()) -> list[Item]:
    """A benchmark's items: from `hf_dataset` when set (lmms-eval's layout), else from the official files under
    `data_root` (and the benchmark's own eval section, `sections`: CHAIR's). A missing official file's error says
    that the Hub layout exists."""
    if hf_dataset:
        return load_hf_benchmark(name, hf_dataset, hf_config, split)
    try:
        return get_benchmark(name).load(data_root, *sections)
    except BenchmarkFileMissing as err:
        if name not in LAYOUTS:
            raise
        raise BenchmarkFileMissing(f"{err} (the official layout under eval.data_root; or set eval.{name}.hf_dataset "
                                   f"to read lmms-eval's Hugging Face copy, e.g. {LAYOUTS[name].dataset})") from None


def load_hf_benchmark(name: str, hf_dataset: str, hf_config: str | None = None, split: str | None = None) -> list[Item]:
    """The items of a dataset in lmms-eval's layout of benchmark `name`; a dataset that is missing or lacks a
    column the loader reads raises BenchmarkFileError (one line) naming it and the layout expected."""
    if name not in LAYOUTS:
        raise BenchmarkFileError(f"eval.{name}.hf_dataset: no Hugging Face layout is known for {name} "
                                 f"(known: {', '.join(LAYOUTS)})")
    layout = LAYOUTS[name]
    split = split or layout.split
    ds = open_dataset(name, hf_dataset, hf_config, split)
    where = f"{hf_dataset} (split {split})"
    missing = [c for c in layout.columns if c not in ds.column_names]
    if name == "pope" and missing == ["category"] and split in POPE_SPLITS:
        missing = []  # the copy's `Full` configuration: one split per category
    if missing:
        raise BenchmarkFileError(f"eval.{name}.hf_dataset {where}: missing column{'s' if len(missing) > 1 else ''} "
                                 f"{', '.join(missing)}; expected lmms-eval's layout of {layout.dataset} (columns "
                                 f"{', '.join(layout.columns)}), found {', '.join(ds.column_names)}")
    ds = ds.select_columns([c for c in ds.column_names if c in layout.columns + layout.optional])
    rows = _rows(ds, IMAGE_COLUMN[name])
    return LOADERS[name](rows, split, where)


def _looks_like_hub_name(text: str) -> bool:
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and " " not in text


def open_dataset(name: str, hf_dataset: str, hf_config: str | None, split: str):
    """The split as a `datasets.Dataset`, from a Hub name, one parquet file, a `save_to_disk` folder, a Hub snapshot
    (read through its README card), or a folder of parquet files named `<split>-*.parquet` (in the sub-folder of
    the configuration when there is one). `hf_config` unset: the configuration lmms-eval reads."""
    import datasets

    layout = LAYOUTS[name]
    config = hf_config or layout.config
    path = Path(hf_dataset).expanduser()
    label = f"eval.{name}.hf_dataset {hf_dataset}"
    if not path.exists() and not _looks_like_hub_name(hf_dataset):
        raise BenchmarkFileMissing(f"{label} does not exist; expected a folder of parquet files or a save_to_disk "
                                   f"folder in lmms-eval's layout of {layout.dataset}, or a Hub dataset name")
    try:
        if not path.exists():  # a Hub name
            return datasets.load_dataset(hf_dataset, config, split=split)
        if path.is_file():  # one parquet file: its rows, whatever the split is called
            return datasets.load_dataset("parquet", data_files=str(path), split="train")
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise BenchmarkFileError(f"{label}: no split {split!r} (splits: {', '.join(ds)}); set "
                                             f"eval.{name}.split")
                ds = ds[split]
            return ds
        if (path / "README.md").is_file():  # a Hub snapshot: its card declares the configurations and splits
            return datasets.load_dataset(str(path), config, split=split)
        if config and (path / config).is_dir():  # a snapshot without its card: the configuration's folder
            path = path / config
        files = sorted(str(f) for f in path.rglob("*.parquet")
                       if f.name == f"{split}.parquet" or f.name.startswith(f"{split}-"))
        if files:  # parquet files named by split, as the Hub stores them (any split name)
            return datasets.load_dataset("parquet", data_files={split: files}, split=split)
        return datasets.load_dataset(str(path), split=split)  # datasets' own inference of files and splits
    except BenchmarkFileError:
        raise
    except Exception as err:  # datasets' own: an unknown split or configuration, no files, the Hub unreachable
        why = " ".join(str(err).split()) or type(err).__name__
        raise BenchmarkFileError(f"{label} (split {split}): cannot be loaded: {why[:300]}") from None


def _rows(ds, image_column: str) -> list[dict]:
    """The rows, images left encoded: each image cell becomes the file's bytes (or a path to the file)."""
    import datasets

    if isinstance(ds.features.get(image_column), datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    rows = ds.to_list()
    for row in rows:
        row[image_column] = _encoded(row[image_column])
    return rows


def _encoded(cell) -> str | bytes | None:
    """Encoded image bytes, a file path, or None for a row without an image."""
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return cell["bytes"]
        if cell.get("path") and Path(cell["path"]).is_file():
            return cell["path"]
        return None
    if isinstance(cell, (bytes, bytearray)) and cell:
        return bytes(cell)
    if hasattr(cell, "save"):  # a decoded PIL image
        buf = io.BytesIO()
        cell.save(buf, format="PNG")
        return buf.getvalue()
    return None


def _image(row, column: str = "image") -> str | bytes:
    # a row without an image gets empty bytes, which eval rejects as unreadable (like a missing file)
    return row[column] if row[column] is not None else b""


# -------------------------------------------------------------------------------------------------------------
# The loaders: rows -> Items equal to stic/benchmarks.py's for the same questions


def _scienceqa(rows, split, where) -> list[Item]:
    items = []
    for n, row in enumerate(rows):
        if row["image"] is None:  # ScienceQA-IMG: the image questions only (the FULL configuration has others)
            continue
        choices = list(row["choices"])
        # LLaVA-1.5's question file: [Context: <hint>\n]<question>\nA. <c0>\nB. <c1>... (lmms-eval builds the same)
        text = (f"Context: {row['hint']}\n" if row["hint"] else "") + row["question"]
        text += "".join(f"\n{letter}. {choice}" for letter, choice in zip("ABCDE", choices))
        # the copy has no pid: the row number stands in for it
        items.append(Item(f"{split}/{n}", row["image"], text.strip() + MULTIPLE_CHOICE,
                          {"n_choices": len(choices), "answer": int(row["answer"])}))
    return items


def _textvqa(rows, split, where) -> list[Item]:
    items = []
    for n, row in enumerate(rows, start=1):
        # LLaVA-1.5's question file: the question, its OCR tokens, the short-answer suffix (lmms-eval leaves the
        # tokens out by default and capitalises the question)
        prompt = f"{row['question']}\nReference OCR token: {', '.join(row['ocr_tokens'] or [])}{SHORT_ANSWER}"
        if not row["answers"]:
            raise BenchmarkFileError(f"{where} row {n - 1}: no answers (the {split} split must carry them)")
        items.append(Item(str(n), _image(row), prompt, {"image_id": row["image_id"], "answers": list(row["answers"])}))
    return items


def _chartqa(rows, split, where) -> list[Item]:
    items, position = [], {"human": 0, "augmented": 0}
    for n, row in enumerate(rows):
        part = str(row["type"]).removesuffix("_test")
        if part not in position:
            raise BenchmarkFileError(f"{where} row {n}: type must be human_test or augmented_test, got {row['type']!r}")
        # the copy lists test_human.json's questions, then test_augmented.json's, each in file order
        items.append(Item(f"{part}/{position[part]}", _image(row), row["question"] + CHARTQA_SUFFIX,
                          {"split": part, "label": str(row["answer"])}))
        position[part] += 1
    return items


def _pope(rows, split, where) -> list[Item]:
    by_split: dict[str, list[Item]] = {s: [] for s in POPE_SPLITS}
    for n, row in enumerate(rows):
        category = row.get("category") or split
        if category not in by_split:
            raise BenchmarkFileError(f"{where} row {n}: category must be one of {', '.join(POPE_SPLITS)}, "
                                     f"got {category!r}")
        label = str(row["answer"]).strip().lower()
        if label not in ("yes", "no"):
            raise BenchmarkFileError(f"{where} row {n}: answer must be 'yes' or 'no', got {row['answer']!r}")
        by_split[category].append(Item(f"{category}/{row['question_id']}", _image(row), row["question"] + SHORT_ANSWER,
                                       {"split": category, "label": label}))
    return [it for s in POPE_SPLITS for it in by_split[s]]  # the official loader's file order


def _tsv_missing(value) -> bool:
    """Whether MMBench's TSV, read with pandas as LLaVA and VLMEvalKit read it, would hold NaN for this cell."""
    from pandas._libs.parsers import STR_NA_VALUES

    return value is None or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, str) and value in STR_NA_VALUES)


def _mmbench(rows, split, where) -> list[Item]:
    items = []
    for row in rows:
        options = {k: str(row[k]) for k in "ABCDE" if k in row and not _tsv_missing(row[k])}
        hint = row.get("hint")
        prompt = ("" if _tsv_missing(hint) else f"{hint}\n") + str(row["question"])
        prompt += "".join(f"\n{k}. {v}" for k, v in options.items()) + MULTIPLE_CHOICE
        items.append(Item(str(int(row["index"])), _image(row), prompt,
                          {"answer": str(row["answer"]), "choices": options, "category": str(row.get("category", ""))}))
    return items


def _precision(value):
    """The precision as testmini.json writes it: an int, or None (the Hub copy stores floats, NaN for none)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return int(value) if float(value).is_integer() else value


def _mathvista(rows, split, where) -> list[Item]:
    items = []
    for row in rows:
        choices = row.get("choices")
        meta = {"question_type": row["question_type"], "answer_type": row["answer_type"],
                "choices": list(choices) if choices is not None else None,
                "precision": _precision(row.get("precision")), "answer": row["answer"]}
        items.append(Item(str(row["pid"]), _image(row, "decoded_image"), row["query"], meta))
    return items


def _llava_bench(rows, split, where) -> list[Item]:
    items = []
    for row in rows:
        caption = row["caption"]
        items.append(Item(str(row["question_id"]), _image(row), row["question"],
                          {"category": row["category"], "question": row["question"],
                           "caption": "\n".join(caption) if isinstance(caption, list) else (caption or ""),
                           "reference": row["gpt_answer"] or ""}))
    return items


def _mmvet(rows, split, where) -> list[Item]:
    items = []
    for row in rows:
        qid = str(row["question_id"])
        capability = row["capability"]
        if isinstance(capability, str):  # the copy joins them with commas: "ocr,math"
            capability = [c.strip() for c in capability.split(",") if c.strip()]
        items.append(Item(qid if qid.startswith("v1_") else f"v1_{qid}", _image(row), row["question"],
                          {"question": row["question"], "answer": row["answer"], "capability": list(capability or [])}))
    return items


LOADERS = {"scienceqa": _scienceqa, "textvqa": _textvqa, "chartqa": _chartqa, "pope": _pope, "mmbench": _mmbench,
           "mathvista": _mathvista, "llava_bench": _llava_bench, "mmvet": _mmvet}
