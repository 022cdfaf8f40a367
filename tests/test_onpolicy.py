"""On-policy pairs ranked without labels (stic/onpolicy.py): the scores on hand-made cases whose right ranking is
known, the claim splitter, and a real grounding run on the tiny LLaVA."""

import json
import re

import numpy as np
import pytest
import torch
import yaml

from corruptions import corrupt
from stic.config import RecipeError
from stic.generation import AnswerLogprobs, Output
from stic.onpolicy import claim_question, pick_pair, reference_corruption, split_claims
from stic.prompts import CAPTION_PROMPTS, HALLUCINATION_PROMPTS, PromptSets
from stic.selfgen import ID_COLUMN, PairGenerator, SelfGenConfig, parse_recipe
from tests.conftest import photo, selfgen_recipe, selfgen_rows, selfgen_run

PROMPTS = PromptSets("good prompt", tuple(CAPTION_PROMPTS), tuple(HALLUCINATION_PROMPTS))


def onpolicy_config(source, **kw):
    kw.setdefault("candidate_prompt", "good")  # the fakes below answer the step-by-step prompt
    return SelfGenConfig(pair_source=source, seed=7, corruptions=["color_jitter", "gaussian_blur"], **kw)


def test_claims_are_sentences_and_clauses_without_list_marks_or_labels():
    text = ("1. Main subjects: A brown dog sits on the grass, and a cat sleeps nearby. 2. Setting: a city park; "
            "tall trees stand behind it.\nYes. The sky is 3.5 times brighter than the road!")
    claims = split_claims(text)
    assert [c.text for c in claims] == ["A brown dog sits on the grass", "a cat sleeps nearby", "a city park",
                                        "tall trees stand behind it", "The sky is 3.5 times brighter than the road"]
    assert all(text[c.start:c.end] == c.text for c in claims)  # spans point into the answer
    assert split_claims("") == [] and split_claims("Yes.") == []
    listed = "a small blue square at the left, a large white plus at the center, two red circles at the top."
    assert [c.text for c in split_claims(listed)] == ["a small blue square at the left",
                                                      "a large white plus at the center", "two red circles at the top"]
    assert [c.text for c in split_claims("A dog, looking up, sits.")] == ["A dog, looking up, sits"]
    template = "Is it true that {claim}? Answer yes or no."
    assert claim_question("The sky is blue", template) == "Is it true that the sky is blue? Answer yes or no."
    assert claim_question("A dog", template) == "Is it true that a dog? Answer yes or no."
    assert claim_question("NASA logo on a wall", template).startswith("Is it true that NASA logo")


def test_pick_pair_takes_best_and_worst_and_drops_ties():
    assert pick_pair([0.2, 0.9, None, -0.4], 0.0) == (1, 3)
    assert pick_pair([0.5, 0.5, 0.5], 0.0) == "tied_scores"
    assert pick_pair([0.5, 0.4], 0.2) == "tied_scores"  # a gap below min_score_gap
    assert pick_pair([0.5, 0.4], 0.05) == (0, 1)
    assert pick_pair([None, 0.3, None], 0.0) == "too_few_scored"


class FakeModel:
    """Generates scripted candidates, and gives each word of an answer log p = -1, except that the words in `seen`
    (what the image shows) drop to -3 when the image is not the clean one: an answer about the image depends on
    it, one the model would say anyway does not."""

    def __init__(self, candidates, seen):
        self.candidates, self.seen, self.clean, self.scored, self.sampled = candidates, seen, {}, [], []

    def generate(self, requests, sampling, seed=0, on_batch=None):
        self.sampled.append((len(requests), sampling.do_sample, {r.seed for r in requests}))
        return [Output(t, "eos", len(t.split())) for _ in range(len(requests) // len(self.candidates))
                for t in self.candidates]

    def answer_logprobs(self, requests, answers):
        out = []
        for r, a in zip(requests, answers):
            clean = any(np.array_equal(np.asarray(r.image), np.asarray(c)) for c in self.clean.values())
            self.scored.append((clean, r))
            words = list(re.finditer(r"\w+", a))
            logps = [-1.0 if clean or w.group() not in self.seen else -3.0 for w in words]
            out.append(AnswerLogprobs(torch.tensor(logps), [w.span() for w in words]))
        return out


@pytest.mark.parametrize("mode, best", [
    ("mean", "red square"),  # the most image words per word
    ("sum", "red square red square. dog plays"),  # the most image words
    ("min_claim", "red square"),  # "dog plays" is a claim the image does not support
])
def test_grounding_prefers_answers_that_depend_on_the_image(mode, best):
    texts = ["red square", "nice picture here", "red square red square. dog plays", "red square. dog plays."]
    model = FakeModel(texts, seen={"red", "square"})
    cfg = onpolicy_config("grounding", candidates=len(texts), grounding_score=mode)
    items = [("img0.png", photo(0)), ("img1.png", photo(1))]
    model.clean = dict(items)
    rows, drops = PairGenerator(model, cfg, PROMPTS, "m")(items)
    assert not drops and [r[ID_COLUMN] for r in rows] == ["img0.png", "img1.png"]
    assert model.sampled[0][:2] == (8, True) and len(model.sampled[0][2]) == 8  # k sampled answers, own seeds
    for row in rows:
        assert row["chosen"][0]["content"] == best and row["rejected"][0]["content"] == "nice picture here"
        assert [c["role"] for c in row["candidates"]].count("chosen") == 1
        parts = json.loads(row["candidates"][0]["parts"])  # "red square": two image words, 2 nats each
        assert parts["logp_image"] == -2 and parts["logp_reference"] == -6 and parts["claims"][0]["margin"] == 2
        assert row["rejected_branch"] == "grounding" and row["chosen_prompt"] == row["rejected_prompt"] == "good prompt"
        assert row["prompt"][-1]["content"] == row["caption_prompt"]  # trained with the caption prompt x, as stic
    # every answer was scored on its clean image and on that image's own corrupted copy, drawn per image
    references = [r for clean, r in model.scored if not clean]
    assert len(references) == len(model.scored) / 2 == 8
    for (image_id, image), ref in zip(items, references[::4]):
        spec, seed = reference_corruption(image_id, cfg.seed, [{"kind": "color_jitter"}, {"kind": "gaussian_blur"}])
        assert np.array_equal(np.asarray(ref.image), np.asarray(corrupt(image, spec["kind"], seed)[0]))
        assert json.loads(rows[items.index((image_id, image))]["corruption_params"])["seed"] == seed


def test_grounding_on_a_blank_reference_scores_each_distinct_answer_once():
    model = FakeModel(["red square", "nice picture here", "red square", ""], seen={"red"})
    items = [("img0.png", photo(0))]
    model.clean = dict(items)
    cfg = onpolicy_config("grounding", candidates=4, grounding_reference="blank")
    rows, _ = PairGenerator(model, cfg, PROMPTS, "m")(items)
    assert rows[0]["chosen"][0]["content"] == "red square" and rows[0]["corruption_params"] is None
    assert len(model.scored) == 4  # two distinct answers, on the image and on the reference
    cands = rows[0]["candidates"]
    assert [c["role"] for c in cands] == ["chosen", "rejected", "", ""]
    assert cands[2]["score"] == cands[0]["score"] and cands[3]["score"] is None  # a repeat; an empty answer
    blank = np.asarray([r for clean, r in model.scored if not clean][0].image)
    assert blank.shape == np.asarray(items[0][1]).shape and (blank == 128).all()


class FakeJudge:
    """Candidates first, then a yes to every question about a claim whose words are all in `truth`."""

    def __init__(self, candidates, truth):
        self.candidates, self.truth, self.questions = candidates, truth, []

    def generate(self, requests, sampling, seed=0, on_batch=None):
        if not self.questions and requests[0].prompt == "good prompt":
            return [Output(t, "eos", 5) for t in self.candidates]
        self.questions += [(r, sampling) for r in requests]
        claims = [re.match(r"Is it true that (.*)\? Answer yes or no\.$", r.prompt).group(1) for r in requests]
        return [Output("Yes, it is." if set(c.split()) <= self.truth else "No.", "eos", 3) for c in claims]


@pytest.mark.parametrize("mode", ["share", "count"])
def test_self_feedback_prefers_the_answer_whose_claims_the_model_affirms(mode):
    three_of_three = "A red ball lies on a mat. A cat sits by the ball. The mat is blue."
    one_of_three = "A red ball lies on a mat. A dog runs in the park. Two birds fly above a tree."
    two_of_three = "A cat sits by the ball. The mat is blue. A car drives past."
    truth = set("a red ball lies on mat cat sits by the is blue".split())
    judge = FakeJudge([one_of_three, three_of_three, two_of_three], truth)
    items = [("img0.png", photo(0))]
    cfg = onpolicy_config("self_feedback", candidates=3, feedback_score=mode)
    rows, drops = PairGenerator(judge, cfg, PROMPTS, "m")(items)
    assert not drops
    assert rows[0]["chosen"][0]["content"] == three_of_three and rows[0]["rejected"][0]["content"] == one_of_three
    scores = [c["score"] for c in rows[0]["candidates"]]
    assert scores == ([1 / 3, 1.0, 2 / 3] if mode == "share" else [1.0, 3.0, 2.0])
    parts = json.loads(rows[0]["candidates"][0]["parts"])
    assert [p["affirmed"] for p in parts["claims"]] == [True, False, False] and parts["asked"] == 3
    assert parts["claims"][1] == {"claim": "A dog runs in the park", "answer": "No.", "affirmed": False}
    # nine questions, greedy and short, each on the clean image
    assert len(judge.questions) == 9
    assert all(not s.do_sample and s.max_new_tokens <= 16 for _, s in judge.questions)
    assert all(np.array_equal(np.asarray(r.image), np.asarray(items[0][1])) for r, _ in judge.questions)


def test_self_feedback_drops_an_image_whose_answers_tie():
    truth = set("a red ball lies on mat the is blue".split())
    judge = FakeJudge(["A red ball lies on a mat.", "The mat is blue."], truth)
    rows, drops = PairGenerator(judge, onpolicy_config("self_feedback", candidates=2), PROMPTS, "m")(
        [("img0.png", photo(0))])
    assert rows == [] and drops == [{"id": "img0.png", "status": "dropped", "reason": "tied_scores"}]


def test_onpolicy_settings_are_checked():
    with pytest.raises(ValueError, match="candidates must be at least 2"):
        SelfGenConfig(pair_source="grounding", candidates=1)
    with pytest.raises(ValueError, match="do_sample: true"):
        parse_recipe({"selfgen": {"pair_source": "self_feedback", "consistency_sampling": {"do_sample": False}}})
    with pytest.raises(ValueError, match="corruptions, which is empty"):
        SelfGenConfig(pair_source="grounding", hallucination_prob=1.0, corruptions=[])
    with pytest.raises(ValueError, match=r"\{claim\}"):
        SelfGenConfig(feedback_question="Is it true?")


def test_a_stic_run_does_not_depend_on_the_onpolicy_keys():
    from stic.prompts import PromptsConfig, load_prompts
    from stic.selfgen import run_config

    prompts = load_prompts(PromptsConfig())
    config = lambda **sg: run_config(parse_recipe({"selfgen": sg}), prompts)  # noqa: E731
    assert config(candidates=6, feedback_score="count") == config()  # a stic folder resumes whatever they say
    assert config(pair_source="grounding", candidates=6) != config(pair_source="grounding")


def test_grounding_on_a_server_backend_is_refused_with_one_line(tmp_path, capsys):
    from stic.cli import main

    recipe = {"generation": {"backend": "openai", "endpoints": ["http://127.0.0.1:9/v1"]},
              "selfgen": {"pair_source": "grounding", "output_dir": str(tmp_path / "out")}}
    with pytest.raises(RecipeError, match="pair_source grounding .* log-probs"):
        parse_recipe(recipe)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(SystemExit) as exit_:
        main(["selfgen", "--recipe", str(path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "log-probs" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    recipe["selfgen"]["pair_source"] = "self_feedback"  # only generates: fine on a server
    assert parse_recipe(recipe).selfgen.pair_source == "self_feedback"


def test_grounding_selfgen_on_the_tiny_model_writes_rows_that_train(tmp_path, photo_dir):
    from stic.dpo import DPOStageConfig, load_preference_dataset
    from stic.store import OutputConflict

    out = tmp_path / "out"
    images = {"type": "folder", "path": str(photo_dir), "limit": 2}
    recipe = selfgen_recipe(out, images, pair_source="grounding", candidates=3, batch_size=6,
                            consistency_sampling={"max_new_tokens": 6, "do_sample": True})
    manifest = selfgen_run(recipe)
    ds = selfgen_rows(out)
    assert manifest["counts"]["rows"] == len(ds) == 2 and manifest["counts"]["rejected_branch"] == {"grounding": 2}
    for row in ds:
        cands = row["candidates"]
        assert len(cands) == 3 and sorted(c["role"] for c in cands) == ["", "chosen", "rejected"]
        by_role = {c["role"]: c for c in cands}
        assert by_role["chosen"]["score"] > by_role["rejected"]["score"]
        assert by_role["chosen"]["text"] == row["chosen"][0]["content"]
        assert all(np.isfinite(c["score"]) and json.loads(c["parts"])["tokens"] > 0 for c in cands)
    train = load_preference_dataset(DPOStageConfig(output_dir=str(tmp_path / "dpo"), dataset=str(out),
                                                   use_cpu=True, report_to=[]))
    assert train.column_names == ["prompt", "chosen", "rejected", "images"] and len(train) == 2
    page = (out / "preview.html").read_text()
    assert page.count("scored without labels") == 2 and "logp_reference" in page and "grounding reference" in page
    config = json.loads((out / "run_config.json").read_text())["selfgen"]
    assert config["pair_source"] == "grounding" and config["candidates"] == 3 and "grounding_score" in config
    assert "feedback_question" not in config  # another source's key changes nothing here
    for change in ({"pair_source": "self_feedback"}, {"candidates": 4}, {"grounding_reference": "blank"}):
        with pytest.raises(OutputConflict, match=r"differs in: .*selfgen\." + next(iter(change))):
            selfgen_run({**recipe, "selfgen": {**recipe["selfgen"], **change}})
