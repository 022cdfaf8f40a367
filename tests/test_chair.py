"""stic/chair.py: CHAIR's rules (the public scorer's) on hand-made descriptions, and the `chair` benchmark on a
tiny fake COCO annotation set (its loader in stic/benchmarks.py, its recipe section eval.chair)."""

import json
import random

import pytest

from stic.benchmarks import BENCHMARKS, BenchmarkFileError, get_benchmark, load_chair, score_chair
from stic.chair import ChairRules, singular, tokenize
from stic.recipe import ChairConfig, EvalConfig

# A small synonym list in the public list's format (one COCO object, then its synonyms). The motorcycle line
# has the public list's doubled space before "motor bike", which the scorer never matches.
SYNONYMS = """person, man, woman, people, child, children, baby, adult, passenger, policeman
bicycle, bike
motorcycle, scooter,  motor bike, motorbike
airplane, jet, plane
bus
train
bird
cat, kitten
dog, puppy, doggy
elephant
bear
tie, bow, bow tie
skis, ski
knife
hot dog
chair, seat, stool
toilet
teddy bear, teddybear
stop sign
"""


@pytest.fixture(scope="module")
def rules():
    return ChairRules(SYNONYMS)


def objects(rules, text):
    return [obj for _, obj in rules.mentions(text)]


# -------------------------------------------------------------------------------------------------------------
# The rules, one at a time


def test_text_is_lower_cased_and_split_as_nltk_splits_it(rules):
    assert tokenize("A DOG's bowl, the dogs' toys; a cat.") == [
        "a", "dog", "'s", "bowl", ",", "the", "dogs", "'", "toys", ";", "a", "cat", "."]
    assert objects(rules, "A DOG, a Kitten.") == ["dog", "cat"]
    assert objects(rules, "a hot-dog stand") == []  # hyphenated: one token, no entry
    assert objects(rules, "hot, dog") == ["dog"]  # punctuation between the words: no pair


def test_plurals_become_the_singular_entries(rules):
    assert objects(rules, "dogs, buses, knives, puppies, men, women, children, policemen, skis, jets") == [
        "dog", "bus", "knife", "dog", "person", "person", "person", "person", "skis", "airplane"]
    vocabulary = rules.vocabulary
    assert singular("bus", vocabulary) == "bus"  # a vocabulary word keeps its s
    assert singular("ski", vocabulary) == "ski" and singular("skis", vocabulary) == "skis"
    assert singular("doggies", vocabulary) == "doggy" and singular("knives", vocabulary) == "knife"
    assert singular("glasses", vocabulary) == "glass"  # a word of a pair ("wine glass") is vocabulary too
    assert singular("boxes", vocabulary) == "boxes"  # no vocabulary word: left as it is


def test_two_word_objects_stay_whole(rules):
    assert objects(rules, "A hot dog next to a dog.") == ["hot dog", "dog"]
    assert objects(rules, "Two teddy bears and a bear.") == ["teddy bear", "bear"]
    assert objects(rules, "A stop sign; a teddybear.") == ["stop sign", "teddy bear"]
    # pairs that name nothing still hide their words: no train on train tracks
    assert objects(rules, "train tracks by a train") == ["train"]
    # read left to right, each word in one pair: "baby teddy" is no pair, so the baby is a person
    assert objects(rules, "a baby teddy bear") == ["person", "teddy bear"]


def test_the_scorers_special_cases(rules):
    assert objects(rules, "a baby elephant with adult elephants") == ["elephant", "elephant"]
    assert objects(rules, "a baby bird, an adult animal, a baby") == ["bird", "person"]
    assert objects(rules, "a passenger jet and a passenger") == ["airplane", "person"]
    assert objects(rules, "a passenger trains") == ["train"]
    assert objects(rules, "a bow tie and a bow") == ["tie", "tie"]
    assert objects(rules, "a toilet seat") == ["toilet"]
    assert objects(rules, "the seat of the toilet, and a seat") == ["toilet"]  # no chair where a toilet is
    assert objects(rules, "a seat and a stool") == ["chair", "chair"]


def test_synonyms_map_to_their_coco_object(rules):
    assert objects(rules, "a puppy, a kitten, a motorbike, a scooter, people") == [
        "dog", "cat", "motorcycle", "motorcycle", "person"]
    # the public list's " motor bike" (after a doubled space) never matches, in the scorer as here; and the pair
    # hides "bike"
    assert objects(rules, "a motor bike") == []
    assert rules.object_of["bow tie"] == "tie" and rules.object_of["person"] == "person"


def test_each_mention_counts(rules):
    mentions = rules.mentions("A dog chases another dog and two dogs.")
    assert mentions == [("dog", "dog")] * 3


# -------------------------------------------------------------------------------------------------------------
# The benchmark on a fake COCO annotation set

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 17, "name": "cat"}, {"id": 18, "name": "dog"},
              {"id": 70, "name": "toilet"}]
IMAGES = {11: ["A man walks his puppy."], 22: ["A toilet next to a sink.", "A cat sits on the toilet seat."],
          33: ["A teddy bear on a bed with a dog."], 44: ["A cat."]}
INSTANCES = [(11, 18), (11, 1), (11, 1), (22, 70), (44, 17)]  # (image, category)


def make_coco(root, synonyms=SYNONYMS):
    """<root>/chair/ in the default layout: annotations/, synonyms.txt (val2014/ needs no files to load)."""
    d = root / "chair" / "annotations"
    d.mkdir(parents=True)
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in IMAGES]
    (d / "instances_val2014.json").write_text(json.dumps({
        "images": images, "categories": CATEGORIES,
        "annotations": [{"id": n, "image_id": i, "category_id": c} for n, (i, c) in enumerate(INSTANCES)]}))
    (d / "captions_val2014.json").write_text(json.dumps({
        "images": images,
        "annotations": [{"id": 100 * i + n, "image_id": i, "caption": c}
                        for i, caps in IMAGES.items() for n, c in enumerate(caps)]}))
    (root / "chair" / "synonyms.txt").write_text(synonyms)
    return root


DESCRIPTIONS = {
    "11": "Two men and their dogs. The dog is next to a cat and a cat.",  # person dog dog cat* cat*
    "22": "A cat on a toilet with the seat up.",  # cat (named by a reference caption) toilet
    "33": "A teddy bear and a bear on a chair.",  # teddy bear, bear*, chair*
    "44": "A sunny day.",  # no object
}


def test_chair_s_chair_i_and_recall_on_hand_counted_descriptions(tmp_path):
    items = load_chair(make_coco(tmp_path), ChairConfig(n_images=None))
    assert [it.id for it in items] == ["11", "22", "33", "44"]
    # the true objects: instance categories and what the reference captions name
    assert {it.id: it.meta["objects"] for it in items} == {
        "11": ["dog", "person"], "22": ["cat", "toilet"], "33": ["dog", "teddy bear"], "44": ["cat"]}
    metrics, per = score_chair(items, DESCRIPTIONS)
    # CHAIR_s: 2 of 4 descriptions name an absent object; CHAIR_i: 4 of 10 mentions (the cat twice);
    # recall: 2 + 2 + 1 + 0 of 2 + 2 + 2 + 1 true objects named
    assert metrics["chair_s"] == pytest.approx(50.0)
    assert metrics["chair_i"] == pytest.approx(40.0)
    assert metrics["recall"] == pytest.approx(100 * 5 / 7)
    assert metrics["count"] == 4 and metrics["mentions_per_description"] == pytest.approx(2.5)
    assert per["11"]["hallucinated"] == ["cat", "cat"] and per["11"]["recalled"] == ["dog", "person"]
    assert per["22"]["hallucinated"] == [] and per["33"]["hallucinated"] == ["bear", "chair"]
    assert per["44"] == {"named": [], "hallucinated": [], "recalled": [], "truth": 1}


def test_chair_is_registered_lower_is_better_with_a_long_answer_budget():
    chair = BENCHMARKS["chair"]
    assert (chair.headline, chair.higher_is_better, chair.max_new_tokens) == ("chair_s", False, 512)
    assert chair.load is load_chair and chair.config_section == "chair"
    assert BENCHMARKS["pope"].higher_is_better


def test_the_loader_draws_seeded_images_and_reads_the_recipe_section(tmp_path):
    from stic.evaluate import load_items

    make_coco(tmp_path)
    settings = ChairConfig(n_images=2, seed=7, prompt="Describe it.", images=str(tmp_path / "imgs"))
    items = load_chair(tmp_path, settings)
    expected = sorted(random.Random(7).sample([11, 22, 33, 44], 2))  # the documented draw
    assert [it.meta["image_id"] for it in items] == expected
    assert items[0].image == str(tmp_path / "imgs" / f"COCO_val2014_{expected[0]:012d}.jpg")
    assert {it.prompt for it in items} == {"Describe it."}
    assert load_chair(tmp_path, ChairConfig())[0].prompt == "Please describe this image in detail."
    # eval's loader passes the recipe's eval.chair section
    cfg = EvalConfig(data_root=str(tmp_path), benchmarks=["chair"], chair=settings)
    assert [it.id for it in load_items(cfg, "chair")] == [str(i) for i in expected]
    # a listed set of images instead of the draw: ids or file names
    (tmp_path / "ids.txt").write_text("COCO_val2014_000000000033.jpg\n11\n\n")
    items = load_chair(tmp_path, ChairConfig(image_ids=str(tmp_path / "ids.txt")))
    assert [it.id for it in items] == ["33", "11"]
    (tmp_path / "ids.txt").write_text("11\n99\n")
    with pytest.raises(BenchmarkFileError, match=r"ids.txt line 2: '99' is no image of "):
        load_chair(tmp_path, ChairConfig(image_ids=str(tmp_path / "ids.txt")))
    with pytest.raises(ValueError, match="n_images must be at least 1"):
        ChairConfig(n_images=0)


def test_a_missing_file_is_one_line_naming_its_key_and_path(tmp_path):
    make_coco(tmp_path)
    annotations = tmp_path / "chair" / "annotations"
    with pytest.raises(BenchmarkFileError) as err:
        load_chair(tmp_path, ChairConfig(synonyms=str(tmp_path / "nowhere.txt")))
    assert str(err.value).startswith(f"eval.chair.synonyms: {tmp_path / 'nowhere.txt'} does not exist (the public")
    (annotations / "captions_val2014.json").unlink()
    with pytest.raises(BenchmarkFileError) as err:
        load_chair(tmp_path, ChairConfig(annotations=str(annotations)))
    assert str(err.value).startswith(f"eval.chair.annotations: {annotations / 'captions_val2014.json'} does not")
    (tmp_path / "chair" / "synonyms.txt").unlink()
    with pytest.raises(BenchmarkFileError) as err:
        load_chair(tmp_path, ChairConfig())
    assert str(err.value).startswith("eval.chair.annotations (unset: under eval.data_root): ")
    assert "\n" not in str(err.value)


def test_a_synonym_list_lacking_a_coco_category_is_refused(tmp_path):
    make_coco(tmp_path, SYNONYMS.replace("toilet\n", ""))
    with pytest.raises(BenchmarkFileError, match="synonyms.txt: no line for the COCO category 'toilet'"):
        load_chair(tmp_path, ChairConfig())


def test_stic_score_scores_a_predictions_file(tmp_path, capsys):
    from stic.cli import main

    make_coco(tmp_path)
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("".join(json.dumps({"question_id": i, "text": t}) + "\n" for i, t in DESCRIPTIONS.items()))
    # n_images defaults to 500, more than the fake set holds: every image
    assert len(get_benchmark("chair").load(tmp_path, ChairConfig())) == 4
    with pytest.raises(SystemExit) as code:
        main(["score", "--benchmark", "chair", "--predictions", str(predictions), "--data-root", str(tmp_path)])
    assert code.value.code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["headline"] == "chair_s" and out["metrics"]["chair_s"] == pytest.approx(50.0)
    (tmp_path / "chair" / "synonyms.txt").unlink()
    with pytest.raises(SystemExit) as code:
        main(["score", "--benchmark", "chair", "--predictions", str(predictions), "--data-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code.value.code == 2 and err.startswith("stic: error: eval.chair.synonyms (unset: under eval.data_root)")
    assert err.count("\n") == 1
