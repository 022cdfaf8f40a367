import json

import pytest

from stic.instructions import (InstructionDataConfig, InstructionDataError, SubsetConfig, choose_subset,
                               composition, convert_llava_record, informativeness, load_instructions)
from tests.conftest import conv, photo


def write_llava(tmp_path, records):
    (tmp_path / "coco").mkdir(exist_ok=True)
    (tmp_path / "gqa").mkdir(exist_ok=True)
    for rel in ("coco/a.jpg", "coco/b.jpg", "gqa/c.jpg"):
        photo(len(rel), size=(40, 30)).save(tmp_path / rel)
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(records))
    return InstructionDataConfig(path=str(path), image_folder=str(tmp_path), text_only="keep")


def test_llava_records_convert_with_the_image_token_removed(tmp_path):
    cfg = write_llava(tmp_path, [
        {"id": "lead", "image": "coco/a.jpg", "conversations": conv("<image>\nIs the mug red?", "No", "Why?", "Blue.")},
        {"id": 7, "image": "gqa/c.jpg", "conversations": conv("What is shown?\n<image>", "A bus")},
        {"id": "txt", "conversations": conv("Say hi.", "Hi.")},
    ])
    records, skipped = load_instructions(cfg)
    assert skipped == []
    lead, trail, txt = records
    assert lead["messages"] == [{"role": "user", "content": "Is the mug red?"}, {"role": "assistant", "content": "No"},
                                {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Blue."}]
    assert trail["id"] == "7" and trail["messages"][0]["content"] == "What is shown?"
    assert lead["source"] == "coco" and trail["source"] == "gqa" and txt["source"] == "text"
    assert txt["image"] is None and txt["image_path"] is None
    cfg.text_only = "exclude"
    records, skipped = load_instructions(cfg)
    assert [r["id"] for r in records] == ["lead", "7"] and skipped[0]["reason"].startswith("text-only")


def test_bad_records_are_skipped_and_listed(tmp_path):
    cfg = write_llava(tmp_path, [
        {"id": "ok", "image": "coco/a.jpg", "conversations": conv("<image>\nQ?", "A")},
        {"id": "gone", "image": "coco/missing.jpg", "conversations": conv("<image>\nQ?", "A")},
        {"id": "nohuman", "image": "coco/a.jpg", "conversations": [{"from": "gpt", "value": "A"}]},
        {"id": "noconv", "image": "coco/a.jpg"},
        {"id": "badturn", "conversations": [{"from": "robot", "value": "x"}]},
        "not a record",
    ])
    records, skipped = load_instructions(cfg)
    assert [r["id"] for r in records] == ["ok"]
    reasons = {s["id"]: s["reason"] for s in skipped}
    assert "missing image file" in reasons["gone"] and reasons["nohuman"] == "no human turn"
    assert reasons["noconv"] == "no conversations" and "from" in reasons["badturn"]
    assert skipped[-1] == {"index": 5, "id": None, "reason": "not a JSON object"}


def test_malformed_json_is_refused_naming_the_file_and_place(tmp_path):
    bad = tmp_path / "mix.json"
    bad.write_text('[{"id": "a", "conversations": []},\n {"id": oops}]')
    with pytest.raises(InstructionDataError, match=r"mix\.json: not valid JSON .*line 2"):
        load_instructions(InstructionDataConfig(path=str(bad)))
    bad = tmp_path / "mix.jsonl"
    bad.write_text('{"id": "a"}\n{broken\n')
    with pytest.raises(InstructionDataError, match=r"mix\.jsonl line 2"):
        load_instructions(InstructionDataConfig(path=str(bad)))
    obj = tmp_path / "obj.json"
    obj.write_text('{"id": "a"}')
    with pytest.raises(InstructionDataError, match="JSON list"):
        load_instructions(InstructionDataConfig(path=str(obj)))


def fake_records():
    recs = []
    for src, n in (("coco", 30), ("gqa", 6), ("vg", 3)):
        for i in range(n):
            text = "red blue left two" if i % 5 == 0 else "what is it"
            recs.append({"id": f"{src}-{i}", "image": f"{src}/{i}.jpg", "image_path": None, "source": src,
                         "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "x"}]})
    return recs


def test_random_subset_is_seeded():
    recs = fake_records()
    a = choose_subset(recs, SubsetConfig(size=10, seed=1))
    assert [r["id"] for r in a] == [r["id"] for r in choose_subset(recs, SubsetConfig(size=10, seed=1))]
    assert [r["id"] for r in a] != [r["id"] for r in choose_subset(recs, SubsetConfig(size=10, seed=2))]
    assert len({r["id"] for r in a}) == 10
    assert len(choose_subset(recs, SubsetConfig(size=1000))) == len(recs)


def test_balanced_subset_spreads_over_sources_and_can_prefer_informative():
    recs = fake_records()
    sub = choose_subset(recs, SubsetConfig(size=12, strategy="balanced", seed=0))
    comp = composition(sub)["by_source"]
    assert comp == {"coco": 5, "gqa": 4, "vg": 3}  # vg runs out at 3; the rest is shared evenly
    inf = choose_subset(recs, SubsetConfig(size=6, strategy="balanced", seed=0, prefer_informative=True))
    coco = [r for r in inf if r["source"] == "coco"]
    assert all(informativeness(r) == 4 for r in coco)
    assert convert_llava_record({"conversations": conv("hi", "yo")}, 0, InstructionDataConfig())[1].startswith("text")
