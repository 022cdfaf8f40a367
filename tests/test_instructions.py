import dataclasses
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


# ---------------------------------------------------------------------------------------------------------
# subset.yes_no_ratio (SVIT's yes/no balance)


def test_yes_no_answers_are_read_as_pope_reads_them():
    from stic.instructions import yes_no_answer, yes_no_label

    assert [yes_no_answer(a) for a in ("Yes", "yes.", "Yes, the mug is red.", "NO", "No.", "no, it is blue")] == [
        "yes", "yes", "yes", "no", "no", "no"]
    assert yes_no_answer("Yes, it is not red.") == "no"  # POPE's scorer: 'not' in the first sentence
    assert [yes_no_answer(a) for a in ("Nothing.", "Yesterday.", "It is yes.", "Red", "")] == [None] * 5
    record = {"messages": [{"role": "user", "content": "Is it red?"}, {"role": "assistant", "content": "Red."},
                           {"role": "user", "content": "Is it big?"}, {"role": "assistant", "content": "Yes"}]}
    assert yes_no_label(record) is None  # the first answer decides


def yes_no_records(yes: int, no: int, other: int, sources=("coco", "gqa")) -> list[dict]:
    """Records whose first answers are `yes` yes, `no` no and `other` neither, spread over `sources`."""
    answers = ["Yes."] * yes + ["No, it is not."] * no + ["A red mug."] * other
    return [{"id": f"{a[0]}{i}", "image": f"x/{i}.jpg", "image_path": None, "source": sources[i % len(sources)],
             "messages": [{"role": "user", "content": "Is there a mug?" if i % 3 else "Is there a red left mug?"},
                          {"role": "assistant", "content": a}]} for i, a in enumerate(answers)]


@pytest.mark.parametrize("strategy, seed, before, after", [
    ("random", 4, (30, 10, 10), {1.0: (20, 20), 0.5: (13, 27)}),
    ("balanced", 0, (24, 10, 16), {1.0: (17, 17), 0.5: (11, 23)}),  # 13.3 yes for 26.7 no: 13 and 27
])
def test_yes_no_ratio_resamples_to_the_target_keeping_the_size(strategy, seed, before, after):
    """The strategy's subset fixes the number of yes/no records (40, 34) and of other records; yes_no_ratio splits
    the yes/no ones to the target (yes rounded half up), drawing the records in the strategy's own order."""
    from stic.instructions import select_subset

    records = yes_no_records(yes=70, no=30, other=30)
    plain = SubsetConfig(size=50, seed=seed, strategy=strategy, prefer_informative=strategy == "balanced")
    counts = {**dict(zip(("yes", "no", "other"), before)), "ratio": before[0] / before[1]}
    assert select_subset(records, plain)[1] == {"target_ratio": None, "before": counts, "after": counts}
    for ratio, (yes, no) in after.items():
        cfg = dataclasses.replace(plain, yes_no_ratio=ratio)
        subset, report = select_subset(records, cfg)
        assert report["after"] == {"yes": yes, "no": no, "other": before[2], "ratio": round(yes / no, 4)}
        assert report["before"]["ratio"] == before[0] / before[1] and report["target_ratio"] == ratio
        assert len(subset) == 50 and len({r["id"] for r in subset}) == 50
        assert [r["id"] for r in choose_subset(records, cfg)] == [r["id"] for r in subset]  # seeded: the same again
    other_seed = select_subset(records, dataclasses.replace(plain, seed=seed + 1, yes_no_ratio=0.5))[0]
    assert {r["id"] for r in other_seed} != {r["id"] for r in subset}


def test_yes_no_ratio_keeps_the_ratio_when_the_data_has_too_few_of_one_answer():
    from stic.instructions import select_subset

    records = yes_no_records(yes=40, no=2, other=40, sources=("coco",))
    subset, report = select_subset(records, SubsetConfig(size=30, seed=0, yes_no_ratio=1.0))
    # both no records, as many yes records, the rest other records: still 30
    assert report["after"] == {"yes": 2, "no": 2, "other": 26, "ratio": 1.0} and len(subset) == 30
    with pytest.raises(ValueError, match="yes_no_ratio must be positive"):
        SubsetConfig(yes_no_ratio=0)
    assert select_subset(records, SubsetConfig(size=30, seed=0))[1]["target_ratio"] is None
