"""The model's old instruction data: loading LLaVA-format records, checking them, and choosing a subset.

A LLaVA record is `{id, image?, conversations: [{from: human|gpt, value}]}` with `<image>` once in the first
human turn (leading or trailing). It becomes `{id, image, source, messages}` with `messages` in the
conversational format (`role`/`content`) and the `<image>` placeholder removed: the image is passed
separately and the chat template puts it where the model expects it.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Literal

from stic.config import option
from stic.errors import SticError
from stic.images import escapes
from stic.metrics import pope_parse

IMAGE_TOKEN = "<image>"
ROLES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system"}

# Words of the visual concepts a description should cover (the "informative" score of the balanced subset).
CONCEPT_WORDS = set("""
red orange yellow green blue purple pink brown black white gray grey golden silver beige dark bright colorful
wood wooden metal metallic glass plastic stone brick concrete fabric leather paper ceramic marble
one two three four five six seven eight nine ten several many few pair dozen number count
left right above below behind front near next beside between under over top bottom middle center corner
large small big tiny tall short long wide narrow huge little size round square
""".split())


class InstructionDataError(SticError, ValueError):
    """The instruction file cannot be read at all; the message names the file and record."""


@dataclasses.dataclass
class InstructionDataConfig:
    path: str = option("recipes/data/sample_llava_instructions.json",
                       help="a LLaVA-format JSON/JSONL file, or a local/hub dataset with messages (+ images/image) "
                            "columns")
    image_folder: str | None = option(
        None, help="root of the records' relative image paths; sample_photos looks names up among the bundled photos")
    allow_outside_image_folder: bool = option(
        False, help="read image paths that lead outside image_folder (absolute or ../); false refuses them")
    text_only: Literal["keep", "exclude"] = option("exclude", help="what to do with records without an image")
    split: str = option("train", help="the split, for datasets")


@dataclasses.dataclass
class SubsetConfig:
    size: int = option(5000, help="records to train on (the paper: 5k samples of LLaVA's SFT mix)")
    strategy: Literal["random", "balanced"] = option("random", help="random, or balanced over the records' sources")
    seed: int = option(42, help="seeds the choice of records")
    source_field: str | None = option(
        None, help="balanced: a record's source, from this field, else the first folder of its image path (coco/ ...)")
    prefer_informative: bool = option(
        False, help="balanced: within each source, take the records that mention the most concept words first")
    yes_no_ratio: float | None = option(
        None, help="re-sample the records whose first answer is yes or no to this yes:no ratio (1.0: 1:1), keeping "
                   "the subset's size and its number of yes/no records (SVIT's balance); null: off")

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"size must be at least 1, got {self.size}")
        if self.yes_no_ratio is not None and not self.yes_no_ratio > 0:
            raise ValueError(f"yes_no_ratio must be positive (1.0: as many yes as no answers; null: off), got "
                             f"{self.yes_no_ratio}")


def resolve_image(folder: str | None, rel: str) -> str:
    if folder == "sample_photos":
        from stic.images import sample_photos_dir

        return str(sample_photos_dir() / Path(rel).name)
    path = Path(rel)
    return str(path if path.is_absolute() or folder is None else Path(folder) / path)


def _strip_image_token(text: str) -> str:
    return re.sub(r"\s*<image>\s*", "\n", text).strip()


def _malformed_turns(messages: list[dict]) -> str | None:
    """Why a conversation cannot be trained on as LLaVA's format defines it, or None: human and gpt turns
    alternate from a human turn to a gpt turn (a final human turn has no answer to learn), and `<image>` is in
    the first human turn at most once (the one image is placed there; a second would stand for nothing)."""
    turns = [m for m in messages if m["role"] != "system"]
    if turns[0]["role"] != "user":
        return "the first turn is gpt, not human"
    for i, (a, b) in enumerate(zip(turns, turns[1:]), start=1):
        if a["role"] == b["role"]:
            return f"turns do not alternate (turn {i + 1} is {'human' if b['role'] == 'user' else 'gpt'} again)"
    if turns[-1]["role"] != "assistant":
        return "the last turn is human (no answer to train on)"
    if any(IMAGE_TOKEN in m["content"] for m in turns if m["role"] == "assistant"):
        return "<image> in a gpt turn"
    count = sum(m["content"].count(IMAGE_TOKEN) for m in turns)
    if count > 1:
        return f"<image> {count} times (once at most, in the first human turn)"
    if count and IMAGE_TOKEN not in turns[0]["content"]:
        return "<image> in a later human turn (only the first may hold it)"
    return None


def convert_llava_record(rec, index: int, cfg: InstructionDataConfig) -> tuple[dict | None, str | None]:
    """(converted record, None) or (None, reason it is skipped)."""
    if not isinstance(rec, dict):
        return None, "not a JSON object"
    convs = rec.get("conversations")
    if not isinstance(convs, list) or not convs:
        return None, "no conversations"
    messages = []
    for turn in convs:
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            return None, "a turn lacks a valid 'from' or 'value'"
        messages.append({"role": ROLES[turn["from"]], "content": turn["value"]})
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        return None, "no human turn"
    if not any(m["role"] == "assistant" for m in messages):
        return None, "no gpt turn"
    malformed = _malformed_turns(messages)
    if malformed:
        return None, malformed
    image = rec.get("image")
    if image is not None and not isinstance(image, str):
        return None, "'image' is not a path"
    first = messages[users[0]]
    first["content"] = _strip_image_token(first["content"])
    for m in messages:
        if IMAGE_TOKEN in m["content"]:
            m["content"] = _strip_image_token(m["content"])
    if image is None and cfg.text_only == "exclude":
        return None, "text-only (text_only: exclude)"
    if (image and cfg.image_folder not in (None, "sample_photos") and not cfg.allow_outside_image_folder
            and escapes(cfg.image_folder, image)):
        raise InstructionDataError(f"{cfg.path}: record {index} (id {rec.get('id')!r}): image {image!r} lies outside "
                                   f"image_folder {cfg.image_folder}; set "
                                   "infuse_sft.data.allow_outside_image_folder: true to read it")
    image_path = resolve_image(cfg.image_folder, image) if image else None
    if image_path and not Path(image_path).is_file():
        return None, f"missing image file {image_path}"
    source = str(rec.get("source") or (Path(image).parts[0] if image and len(Path(image).parts) > 1 else
                                       ("text" if image is None else "unknown")))
    return {"id": str(rec.get("id", index)), "image": image, "image_path": image_path, "source": source,
            "messages": messages}, None


def load_instructions(cfg: InstructionDataConfig) -> tuple[list[dict], list[dict]]:
    """(usable records, skipped [{index, id, reason}]). Malformed files raise InstructionDataError."""
    path = Path(cfg.path)
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        text = path.read_text()
        try:
            if path.suffix == ".json":
                raw = json.loads(text)
            else:
                raw = []
                for n, line in enumerate(text.splitlines(), start=1):
                    if line.strip():
                        try:
                            raw.append(json.loads(line))
                        except json.JSONDecodeError as err:
                            raise InstructionDataError(f"{path} line {n}: not valid JSON ({err.msg})") from None
        except json.JSONDecodeError as err:
            raise InstructionDataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, "
                                       f"column {err.colno})") from None
        if not isinstance(raw, list):
            raise InstructionDataError(f"{path}: expected a JSON list of records")
        records, skipped = [], []
        for i, rec in enumerate(raw):
            out, reason = convert_llava_record(rec, i, cfg)
            if out is None:
                rid = rec.get("id") if isinstance(rec, dict) else None
                skipped.append({"index": i, "id": rid, "reason": reason})
            else:
                records.append(out)
        return records, skipped
    return _load_messages_dataset(cfg)


def _load_messages_dataset(cfg: InstructionDataConfig) -> tuple[list[dict], list[dict]]:
    """A dataset already in `messages` format; images as paths or stored bytes."""
    import datasets

    path = Path(cfg.path)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
        ds = datasets.load_from_disk(str(path))
        ds = ds[cfg.split] if isinstance(ds, datasets.DatasetDict) else ds
    elif path.exists() or cfg.path.count("/") == 1:
        ds = datasets.load_dataset(cfg.path, split=cfg.split)
    else:
        raise InstructionDataError(f"instruction data {cfg.path} does not exist")
    if "messages" not in ds.column_names:
        raise InstructionDataError(f"{cfg.path}: needs a 'messages' column (has: {', '.join(ds.column_names)})")
    col = "images" if "images" in ds.column_names else ("image" if "image" in ds.column_names else None)
    if col:
        ds = ds.cast_column(col, datasets.List(datasets.Image(decode=False)) if col == "images"
                            else datasets.Image(decode=False))
    records, skipped = [], []
    for i, row in enumerate(ds):
        imgs = row.get(col) if col else None
        img = (imgs[0] if isinstance(imgs, list) and imgs else imgs) if col else None
        messages = [{"role": m["role"], "content": _strip_image_token(m["content"])
                     if isinstance(m["content"], str) else m["content"]} for m in row["messages"]]
        if not any(m["role"] == "user" for m in messages):
            skipped.append({"index": i, "id": row.get("id"), "reason": "no user turn"})
            continue
        if img is None and cfg.text_only == "exclude":
            skipped.append({"index": i, "id": row.get("id"), "reason": "text-only (text_only: exclude)"})
            continue
        image_path = img.get("path") if img else None
        if img and not img.get("bytes") and not (image_path and Path(image_path).is_file()):
            skipped.append({"index": i, "id": row.get("id"), "reason": f"missing image file {image_path}"})
            continue
        records.append({"id": str(row.get("id", i)), "image": image_path or (f"row-{i}" if img else None),
                        "image_path": image_path, "image_bytes": img.get("bytes") if img else None,
                        "source": str(row.get("source") or "dataset"), "messages": messages})
    return records, skipped


def informativeness(record: dict) -> int:
    text = " ".join(m["content"] for m in record["messages"] if isinstance(m["content"], str)).lower()
    return len(set(re.findall(r"[a-z]+", text)) & CONCEPT_WORDS)


def choose_subset(records: list[dict], cfg: SubsetConfig) -> list[dict]:
    """N records chosen with `seed`: uniformly, or evenly across sources (round-robin over shuffled sources); then,
    with `yes_no_ratio`, its yes/no records re-sampled to that ratio (see `select_subset`)."""
    return select_subset(records, cfg)[0]


def _by_strategy(records: list[dict], cfg: SubsetConfig) -> list[int]:
    """Indices of the strategy's subset: sorted (random), or in the order the round-robin took them (balanced)."""
    n = min(cfg.size, len(records))
    if cfg.strategy == "random":
        return sorted(random.Random(cfg.seed).sample(range(len(records)), n))
    return _source_round_robin(records, cfg)[:n]


def _source_round_robin(records: list[dict], cfg: SubsetConfig) -> list[int]:
    """Every record's index in the order the balanced strategy takes them: round-robin over the sources, each
    source's records shuffled with `seed` (and, with prefer_informative, the most informative first)."""
    rng = random.Random(cfg.seed)
    groups: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        key = str(rec.get(cfg.source_field) or rec["source"]) if cfg.source_field else rec["source"]
        groups.setdefault(key, []).append(i)
    for key in sorted(groups):
        rng.shuffle(groups[key])
        if cfg.prefer_informative:  # stable sort keeps the shuffled order among equal scores
            groups[key].sort(key=lambda i: informativeness(records[i]), reverse=True)
    order, queues = [], [groups[key] for key in sorted(groups)]
    while any(queues):
        for queue in queues:
            if queue:
                order.append(queue.pop(0))
    return order


# ---------------------------------------------------------------------------------------------------------
# Yes/no balance (SVIT, Zhao et al. 2023): a mix heavy on "yes" answers teaches the model to answer "yes"


def yes_no_answer(text: str) -> str | None:
    """'yes' or 'no' for an answer whose first word is yes or no (any case), read as POPE's scorer reads answers
    (stic.metrics.pope_parse: 'no' or 'not' in the first sentence makes it no, so "Yes, it is not red." is no);
    None for any other answer."""
    first = re.match(r"\W*([A-Za-z]+)", text)
    if not first or first.group(1).lower() not in ("yes", "no"):
        return None
    return pope_parse(first.group(1).lower() + text[first.end():])


def yes_no_label(record: dict) -> str | None:
    """A record's yes/no class: that of its first assistant answer. Only the first counts: a LLaVA VQA record asks
    several questions of one image, and a record is kept or dropped whole."""
    answer = next((m["content"] for m in record["messages"] if m["role"] == "assistant"), None)
    return yes_no_answer(answer) if isinstance(answer, str) else None


def yes_no_counts(records: list[dict]) -> dict:
    """Records by yes_no_label, with the yes:no ratio (None without a no record)."""
    labels = Counter(yes_no_label(r) for r in records)
    yes, no = labels["yes"], labels["no"]
    return {"yes": yes, "no": no, "other": len(records) - yes - no, "ratio": round(yes / no, 4) if no else None}


def select_subset(records: list[dict], cfg: SubsetConfig) -> tuple[list[dict], dict]:
    """(the subset, {target_ratio, before, after}: its yes_no_counts before and after yes_no_ratio re-sampled it).

    In order: (1) the strategy ranks every record (random: a seeded shuffle of its subset, then of the rest;
    balanced: its source round-robin, informative first with prefer_informative) and its first `size` records are
    the plain subset; (2) the plain subset's yes/no records fix how many yes/no records the subset holds, split to
    the target ratio (a class the data holds too few of shrinks both, keeping the ratio; other records take the
    slots freed); (3) the ranking is walked again, each record taken while its class (yes, no, other) has room.
    Source balance and informativeness thus decide which records of each class are kept; the size stays."""
    plain = _by_strategy(records, cfg)
    before = yes_no_counts([records[i] for i in plain])
    if cfg.yes_no_ratio is None:
        return [records[i] for i in plain], {"target_ratio": None, "before": before, "after": before}
    labels = [yes_no_label(r) for r in records]
    if cfg.strategy == "random":
        rng = random.Random(f"{cfg.seed}\x1fyes_no")
        kept, chosen = list(plain), set(plain)
        rest = [i for i in range(len(records)) if i not in chosen]
        rng.shuffle(kept)
        rng.shuffle(rest)
        ranking = kept + rest
    else:
        ranking = _source_round_robin(records, cfg)
    ratio, slots = cfg.yes_no_ratio, before["yes"] + before["no"]
    yes = int(slots * ratio / (1 + ratio) + 0.5)
    no = slots - yes
    held = Counter(labels)
    scale = min(1.0, held["yes"] / yes if yes else 1.0, held["no"] / no if no else 1.0)
    room = {"yes": int(yes * scale), "no": int(no * scale)}
    room[None] = len(plain) - room["yes"] - room["no"]
    taken, left = [], []
    for i in ranking:
        if room[labels[i]] > 0:
            room[labels[i]] -= 1
            taken.append(i)
        else:
            left.append(i)
    taken += left[:len(plain) - len(taken)]  # too few other records: the size comes first
    if cfg.strategy == "random":
        taken.sort()
    subset = [records[i] for i in taken]
    return subset, {"target_ratio": ratio, "before": before, "after": yes_no_counts(subset)}


def composition(records: list[dict]) -> dict:
    return {
        "records": len(records),
        "by_source": dict(sorted(Counter(r["source"] for r in records).items())),
        "with_image": sum(1 for r in records if r["image"]),
        "turns": sum(len(r["messages"]) for r in records),
        "mean_concept_words": round(sum(map(informativeness, records)) / max(1, len(records)), 2),
    }
