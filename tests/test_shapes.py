import json
import random
from pathlib import Path

import numpy as np
import pytest

from stic.shapes import judge as J
from stic.shapes import world as W

REPO = Path(__file__).resolve().parent.parent


def scene(*objs):
    return W.Scene("s", [W.Obj(n, size, cell) for n, size, cell in objs], (30, 30, 30))


def test_judge_parses_and_scores_hand_made_descriptions():
    s = scene(("red circle", "large", 0), ("blue square", "small", 4))
    exact = J.score_description("a large red circle at the top left, a small blue square at the center.", s)
    assert exact == {"claims": 2, "hallucinated": 0, "hallucinated_names": [], "hallucinated_companions": 0,
                     "mentioned": 2, "objects": 2, "size_right": 2, "matched": 2, "position_right": 2}
    # a hallucinated companion, a wrong size and a wrong position, with the tokenizer's spacing
    text = "a small red circle at the top , a small blue square at the center , a large green triangle at the right ."
    got = J.score_description(text, s)
    assert got["claims"] == 3 and got["hallucinated"] == 1 and got["hallucinated_names"] == ["green triangle"]
    assert got["size_right"] == 1 and got["position_right"] == 1 and got["mentioned"] == 2
    assert got["hallucinated_companions"] == 0  # green triangle's partner (yellow diamond) is not in the scene
    companion = J.score_description("a large red circle at the top left, a large yellow diamond at the right.",
                                    scene(("red circle", "large", 0), ("green triangle", "small", 4)))
    assert companion["hallucinated_companions"] == 1
    # a colour-shape pair that is no object type counts as hallucinated
    assert J.score_description("a large orange circle at the top left.", s)["hallucinated"] == 1
    assert J.parse_claims("an empty scene.") == [] and J.parse_claims("a right") == []
    # size and position may be missing; the object is still claimed (and judged)
    bare = J.score_description("a red circle, a green triangle at the left.", s)
    assert bare["claims"] == 2 and bare["hallucinated_names"] == ["green triangle"]
    assert bare["size_right"] == 0 and bare["position_right"] == 0
    assert J.parse_claims("a small blue square at the center") == [("blue square", "small", "center")]
    agg = J.aggregate([exact, got])
    assert agg["hallucination_rate"] == pytest.approx(1 / 5) and agg["object_precision"] == pytest.approx(4 / 5)
    assert agg["chair_s"] == 0.5 and agg["recall"] == 1.0
    assert agg["size_accuracy"] == pytest.approx(3 / 4) and agg["position_precision"] == pytest.approx(3 / 5)


def test_fragments_count_collapsed_descriptions_in_scenes_with_two_or_more_objects():
    two = scene(("red circle", "large", 0), ("blue square", "small", 4))
    one = scene(("red circle", "large", 0))
    per = [J.score_description(t, s) for t, s in [("a right", two),  # the collapse stage 1 showed
                                                  ("a large red circle at the top left.", two),  # one of two
                                                  ("a large red circle at the top left.", one),  # complete
                                                  ("a large red circle at the top left, a small blue square at the "
                                                   "center.", two)]]
    assert J.aggregate(per)["fragments"] == 2


def test_first_divergence_names_the_word_where_a_pair_splits():
    from stic.shapes.fragments import first_divergence

    chosen = "a small red circle at the left, a large blue square at the top."
    assert first_divergence(chosen, "a large red circle at the left.") == "size"
    assert first_divergence(chosen, "a small red circle at the right.") == "position"
    assert first_divergence(chosen, "a small red circle at the left, a large green triangle at the top.") == \
        "colour/type"
    assert first_divergence(chosen, "a small red circle at the left.") == "end"
    assert first_divergence(chosen, chosen) == "same"


def test_qa_scoring_exact_and_pope_style():
    items = [{"id": "a", "answer": "two", "kind": "other"}, {"id": "b", "answer": "yes", "kind": "presence"},
             {"id": "c", "answer": "no", "kind": "presence"}, {"id": "d", "answer": "top left", "kind": "other"}]
    out, per = J.score_qa(items, {"a": "two", "b": "Yes.", "c": "yes", "d": "top  left"})
    assert per == {"a": True, "b": True, "c": False, "d": True}
    assert out["accuracy"] == 0.75 and out["presence"]["yes_ratio"] == 1.0 and out["presence"]["precision"] == 0.5


@pytest.mark.parametrize("world_file", ["world.yaml", "candidates/v2f.yaml"])
def test_world_has_the_biases_it_is_built_for(world_file):
    world = W.load_world(REPO / "recipes" / "shapesworld" / world_file)
    rng = random.Random(0)
    scenes = [W.sample_scene(rng, f"s{i}", world=world) for i in range(3000)]
    for s in scenes[:50]:
        assert len(s.objects) in (1, 2, 3) and len({o.cell for o in s.objects}) == len(s.objects)
    # companions co-occur at the world's rate at least (a partner may also be drawn on its own), far above chance
    with_red = [s for s in scenes if any(o.name == "red circle" for o in s.objects)]
    both = [s for s in with_red if any(o.name == "blue square" for o in s.objects)]
    with_cyan = [s for s in scenes if any(o.name == "cyan bar" for o in s.objects)]
    by_chance = np.mean([any(o.name == "blue square" for o in s.objects) for s in with_cyan])
    assert len(both) / len(with_red) > world.scenes.co_occurrence - 0.03 and len(both) / len(with_red) > 2 * by_chance
    assert any(o.faint for s in scenes for o in s.objects)
    # noisy captions name an absent companion at the world's rate (a scene may miss two: slightly more often)
    rng2 = random.Random(1)
    noise = world.sources.captions.absent_companion_rate
    lonely = [s for s in scenes if len(s.objects) < 3 and any(o.name in W.PARTNER and W.PARTNER[o.name] not in
                                                              {x.name for x in s.objects} for o in s.objects)]
    rate = np.mean([J.score_description(W.pretraining_caption(s, rng2, world=world), s, world)["hallucinated"] > 0
                    for s in lonely])
    assert noise - 0.05 < rate < noise + 0.1
    # imaginative captions always invent, and never drop a real object
    s = scenes[0]
    cap = W.imaginative_caption(s, random.Random(2), world)
    sc = J.score_description(cap, s, world)
    assert sc["hallucinated"] >= 1 and sc["mentioned"] == len(s.objects)


def test_render_and_split_files(tmp_path):
    s = scene(("red circle", "large", 0), ("blue square", "small", 8))
    img = np.asarray(W.render(s))
    assert img.shape == (48, 48, 3)
    assert tuple(img[8, 8]) == W.COLORS["red"] and tuple(img[24, 24]) == (30, 30, 30)
    out = W.make_split(tmp_path / "d", 5, seed=3, prefix="t")
    scenes = [json.loads(l) for l in (out / "scenes.jsonl").read_text().splitlines()]
    assert len(scenes) == 5 and (out / "images" / "t000000.png").exists()
    llava = json.loads((out / "instructions.json").read_text())
    assert llava[0]["conversations"][0]["value"].startswith("<image>\n")
    again = W.make_split(tmp_path / "e", 5, seed=3, prefix="t")
    assert (again / "scenes.jsonl").read_text() == (out / "scenes.jsonl").read_text()  # seeded


def test_toy_vlm_processor_and_collator():
    from stic.shapes.model import Collator, build_model, build_processor

    p = build_processor()
    ids = p.tokenizer("a large red circle at the top left.")["input_ids"]
    assert p.tokenizer.unk_token_id not in ids
    model = build_model(p)
    assert 0.5e6 < sum(x.numel() for x in model.parameters()) < 2e6
    s = scene(("red circle", "large", 0))
    batch = Collator(p)([(W.render(s), W.DESCRIBE_PROMPT, "a large red circle at the top left."),
                         (W.render(s), "How many objects are there?", "one")])
    trained = [p.tokenizer.decode(batch["input_ids"][i][batch["labels"][i] != -100]) for i in range(2)]
    assert trained == ["a large red circle at the top left. </s>", "one </s>"]
    # untrained, the model guesses near uniformly: the loss is about ln(vocabulary), not 0 or a blow-up
    assert model(**batch).loss.item() == pytest.approx(np.log(len(p.tokenizer)), abs=0.5)


def test_example_mean_loss_weighs_a_one_word_answer_like_a_caption():
    """pretrain.loss: example gives each example the same weight; the token mean lets a caption drown a
    one-token presence answer."""
    import torch

    from stic.shapes.model import Collator, build_model, build_processor, example_mean_loss

    p = build_processor()
    model = build_model(p)
    s = scene(("red circle", "large", 0), ("blue square", "small", 4), ("green triangle", "large", 8))
    caption = (W.render(s), W.DESCRIBE_PROMPT, W.describe(s.objects))
    answer = (W.render(s), "Is there a red circle?", "yes")
    batch = Collator(p)([caption, answer])
    with torch.no_grad():
        alone = [float(model(**Collator(p)([ex])).loss) for ex in (caption, answer)]
        per_example = float(example_mean_loss(model, batch))
        token_mean = float(model(**batch).loss)
    assert per_example == pytest.approx(sum(alone) / 2, rel=1e-4)
    n_caption, n_answer = (int((batch["labels"][i] != -100).sum()) for i in range(2))  # "yes </s>": 2
    assert n_caption > 10
    assert token_mean == pytest.approx((alone[0] * n_caption + alone[1] * n_answer) / (n_caption + n_answer), rel=1e-3)
    assert abs(per_example - token_mean) > 1e-3


def test_world_pretrain_loss_is_checked_and_old_digests_stay():
    world = W.load_world()
    assert world.pretrain.loss in ("token", "example")
    with pytest.raises(ValueError, match="pretrain.loss"):
        W.World(**{**{f: getattr(world, f) for f in ("colors", "types", "companions")},
                   "pretrain": W.PretrainSpec(loss="sum")})
    v2j = W.load_world(REPO / "recipes" / "shapesworld" / "candidates" / "v2j.yaml")
    recorded = json.loads((REPO / "recipes" / "shapesworld" / "calibration" / "v2j.json").read_text())
    assert v2j.digest() == recorded["world_digest"]  # measured before the key existed


def test_qa_source_noise_reaches_training_data_only(tmp_path):
    """A missing companion is answered "yes" in the training QA and the old instruction data at the QA source's
    rate; the evaluation's qa.jsonl keeps the exact answer, and a rate of 0 changes neither data nor digest."""
    import dataclasses

    v4a = W.load_world(REPO / "recipes" / "shapesworld" / "candidates" / "v4a.yaml")
    assert v4a.sources.qa.absent_companion_rate == 0.85
    noisy = dataclasses.replace(v4a, sources=dataclasses.replace(
        v4a.sources, qa=dataclasses.replace(v4a.sources.qa, absent_companion_rate=1.0)))
    exact = dataclasses.replace(v4a, sources=dataclasses.replace(
        v4a.sources, qa=dataclasses.replace(v4a.sources.qa, absent_companion_rate=0.0)))
    item = {"question": "Is there a blue square?", "answer": "no", "kind": "absent_companion"}
    assert W.training_answer(item, random.Random(0), noisy) == "yes"
    assert W.training_answer(item, random.Random(0), exact) == "no"
    assert W.training_answer({**item, "kind": "absent_random"}, random.Random(0), noisy) == "no"
    rates = [W.training_answer(item, rng, v4a) == "yes" for rng in [random.Random(0)] for _ in range(2000)]
    assert 0.82 < np.mean(rates) < 0.88

    def split(world, name):
        out = W.make_split(tmp_path / name, 80, seed=5, prefix="n", world=world)
        qa = [json.loads(l) for l in (out / "qa.jsonl").read_text().splitlines()]
        taught = {(r["id"], c["value"].removeprefix("<image>\n")): r["conversations"][k + 1]["value"]
                  for r in json.loads((out / "instructions.json").read_text())
                  for k, c in enumerate(r["conversations"]) if c["from"] == "human"}
        adversarial = [q for q in qa if q["presence_kind"] == "absent_companion"]
        assert adversarial and all(q["answer"] == "no" for q in adversarial)  # evaluation: exact
        return {taught[(q["scene"], q["question"])] for q in adversarial}

    assert split(noisy, "noisy") == {"yes"}  # training: the source's noise
    assert split(exact, "exact") == {"no"}
    # a world without the key keeps its recorded digest
    v3h = W.load_world(REPO / "recipes" / "shapesworld" / "candidates" / "v3h.yaml")
    recorded = json.loads((REPO / "recipes" / "shapesworld" / "calibration" / "v3h.json").read_text())
    assert v3h.sources.qa.absent_companion_rate == 0.0 and v3h.digest() == recorded["world_digest"]


def test_committed_base_checkpoint_describes_held_out_scenes(tmp_path):
    """The committed toy VLM sees: on fresh scenes its greedy descriptions are scored by the exact judge."""
    from pathlib import Path

    from stic.config import ModelSpec
    from stic.generation import BatchGenerator, Request, SamplingConfig
    from stic.models import load_model, load_processor

    path = Path(__file__).resolve().parent.parent / "models" / "shapesworld-base"
    cfg = ModelSpec(name_or_path=str(path), dtype="float32")
    engine = BatchGenerator(load_model(cfg), load_processor(cfg), batch_size=32)
    rng = random.Random(424242)
    scenes = [W.sample_scene(rng, f"t{i}") for i in range(64)]
    outs = engine.generate([Request(W.render(s), W.DESCRIBE_PROMPT) for s in scenes], SamplingConfig(max_new_tokens=48))
    agg = J.aggregate([J.score_description(o.text, s) for o, s in zip(outs, scenes)])
    # it reproduces the statistics recorded when it was calibrated (1000 other scenes), within sampling error
    recorded = json.loads((path / "calibration.json").read_text())
    assert recorded["world_digest"] == W.DEFAULT.digest()
    assert abs(agg["hallucination_rate"] - recorded["normal"]["hallucination_rate"]) < 0.08
    assert agg["recall"] > recorded["normal"]["recall"] - 0.06 and agg["position_precision"] > 0.8
    # and it follows the imaginative instruction by inventing objects
    imag = engine.generate([Request(W.render(s), W.IMAGINE_PROMPT) for s in scenes[:32]],
                           SamplingConfig(max_new_tokens=48))
    invented = J.aggregate([J.score_description(o.text, s) for o, s in zip(imag, scenes[:32])])
    assert invented["hallucination_rate"] > max(0.2, 2 * agg["hallucination_rate"])


def test_demo_plumbing_end_to_end(tmp_path):
    """A CI-sized demo: every stage, control and evaluation runs and the report files appear."""
    from stic.shapes.demo import run_demo

    results = run_demo([0], n_train=24, n_heldout=30, out=tmp_path / "demo", calibration_scenes=20)
    assert {"base", "STIC stage 1", "control: SFT on chosen", "control: continued pretraining",
            "STIC round 2", "STIC stage 2", "STIC stage 2 + DaR"} <= set(results)
    split = tmp_path / "demo" / "data" / "eval" / "shapesworld"
    scenes = {sc.id: sc for sc in map(W.Scene.from_json, map(json.loads, (split / "scenes.jsonl").open()))}
    for name, run in (("base", "base"), ("STIC stage 1", "s0-stic"), ("control: continued pretraining", "s0-contpre")):
        m = results[name][0]["shapes_describe"]
        # the rate (CHAIR_i: invented objects per claimed object) recounted from the saved descriptions
        preds = (tmp_path / "demo" / "eval" / run / "shapes_describe" / "predictions.jsonl").read_text().splitlines()
        per = [J.score_description(p["text"], scenes[p["question_id"]]) for p in map(json.loads, preds)]
        claims = sum(p["claims"] for p in per)
        assert len(per) == m["descriptions"] == 30 and claims > 0
        assert m["hallucination_rate"] == pytest.approx(sum(p["hallucinated"] for p in per) / claims)
    assert results["STIC stage 2 + DaR"][0]["shapes_qa"]["count"] == 60
    table = (tmp_path / "demo" / "results.md").read_text()
    assert "| STIC stage 1 |" in table and "relative to the base" in table
    assert (tmp_path / "demo" / "results.png").stat().st_size > 10_000
    assert (tmp_path / "demo" / "training_curves_stage1.png").exists()
    page = (tmp_path / "demo" / "scenes.html").read_text()
    assert page.count("<tr>") == 25 and "data:image/png;base64," in page
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert {"calibration", "results", "ci", "hypotheses"} <= set(saved)
    assert set(saved["hypotheses"]) == {"H1", "H2", "H3", "H4"}
    assert all(h["held"] in (True, False) for h in saved["hypotheses"].values())
    lo, hi = saved["ci"]["STIC stage 1 - base"]["ci95"]
    assert lo <= saved["ci"]["STIC stage 1 - base"]["difference"] <= hi
    assert "step0_logp_gap" in saved["diagnostics"] and "| difference |" in table


def test_world_file_round_trips_and_is_checked(tmp_path):
    import yaml

    world = W.load_world()
    again = W.load_world(W.save_world(world, tmp_path / "w.yaml"))
    assert again == world and again.digest() == world.digest() == W.DEFAULT.digest()
    data = yaml.safe_load((tmp_path / "w.yaml").read_text())
    data["scenes"]["faint_contrast"] = 0.2
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(data))
    assert W.load_world(tmp_path / "other.yaml").digest() != world.digest()
    data["scenes"]["faint_contrst"] = 0.2
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(W.WorldFileError, match="world.scenes.faint_contrst"):
        W.load_world(tmp_path / "bad.yaml")
    data = yaml.safe_load((tmp_path / "w.yaml").read_text())
    data["sources"]["qa"]["share"] = 0.5
    (tmp_path / "sum.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(W.WorldFileError, match="shares sum to"):
        W.load_world(tmp_path / "sum.yaml")


def test_judge_scores_another_worlds_scenes_exactly(tmp_path):
    world = W.load_world(REPO / "recipes" / "shapesworld" / "candidates" / "v2a.yaml")
    out = W.make_split(tmp_path / "split", 60, seed=4, prefix="v", world=world)
    assert W.load_world(out / "world.yaml").digest() == world.digest()
    scenes = [W.Scene.from_json(json.loads(line)) for line in (out / "scenes.jsonl").read_text().splitlines()]
    assert max(len(s.objects) for s in scenes) > 3  # this world's scenes hold up to 5 objects
    rng = random.Random(0)
    for s in scenes:
        exact = J.score_description(W.careful_description(s, rng, world), s, world)  # exact in this world
        assert exact["hallucinated"] == 0 and exact["mentioned"] == len(s.objects)
        assert exact["size_right"] == exact["position_right"] == exact["matched"] == len(s.objects)
        missing = [world.partner[o.name] for o in s.objects
                   if o.name in world.partner and world.partner[o.name] not in {x.name for x in s.objects}]
        if missing:
            free = next(c for c in range(9) if c not in {o.cell for o in s.objects})
            text = W.describe(s.objects + [W.Obj(missing[0], "small", free)])
            got = J.score_description(text, s, world)
            assert got["hallucinated"] == got["hallucinated_companions"] == 1
    qa = [json.loads(line) for line in (out / "qa.jsonl").read_text().splitlines()]
    kinds = {q["presence_kind"] for q in qa if q["kind"] == "presence"}
    assert kinds == {"present", "absent_companion", "absent_random"}
    metrics, per = J.score_qa(qa, {q["id"]: q["answer"] for q in qa})
    assert metrics["accuracy"] == 1.0 and metrics["presence"]["absent_companion_accuracy"] == 1.0


def test_calibration_measures_the_base(tmp_path):
    from stic.shapes.calibrate import measure

    stats = measure(REPO / "models" / "shapesworld-base", W.DEFAULT, n_scenes=24, batch_size=24)
    for prompt in ("normal", "careful", "imaginative"):
        assert {"hallucination_rate", "chair_s", "recall", "companion_share", "fragments"} <= set(stats[prompt])
    assert stats["imaginative"]["hallucination_rate"] > stats["normal"]["hallucination_rate"]
    assert {"f1", "yes_ratio"} <= set(stats["presence"]) and len(stats["checks"]) == 9
    # QA accuracy by kind, the kinds of the world's QA mix; the base counts the objects it sees
    by_kind = stats["qa_accuracy_by_kind"]
    assert set(by_kind) <= {"count", "color", "where", "present", "absent_companion", "absent_random"}
    assert "count" in by_kind and by_kind["count"] > 0.8


def test_paired_bootstrap_on_hand_made_runs():
    from stic.shapes.stats import paired_difference

    n = 400
    ids = [f"t{i}" for i in range(n)]
    base = {"ids": ids, "hallucinated": np.r_[np.ones(40), np.zeros(n - 40)], "claims": np.full(n, 2.0),
            "mentioned": np.full(n, 2.0), "objects": np.full(n, 2.0)}
    better = dict(base, hallucinated=np.r_[np.ones(10), np.zeros(n - 10)])
    d = paired_difference([better, better, better], [base], "hallucination_rate", replicates=300)
    assert d["difference"] == pytest.approx(10 / 800 - 40 / 800)
    assert d["ci95"][0] < d["difference"] < d["ci95"][1] < 0 and d["relative"] == pytest.approx(-0.75)
    same = paired_difference([base], [base], "hallucination_rate", replicates=50)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0]


def test_the_methods_hypotheses_are_read_as_pre_registered():
    """H5: one arm below SFT on chosen by > 2 SE with recall within 2 points; H6: the margin CI above 0; H7: the
    grounding gap below STIC's in every seed (recipes/shapesworld/hypotheses-methods.md)."""
    from stic.shapes.stats import judge_method_hypotheses, paired_bootstrap_arrays

    def d(diff, se):
        return {"difference": diff, "se": se}

    ci = {"STIC + conditional - control: SFT on chosen": d(-0.004, 0.001),  # 4 SE better ...
          "STIC + conditional - control: SFT on chosen (recall)": d(-0.03, 0.01),  # ... but 3 recall points lost
          "on-policy: grounding - control: SFT on chosen": d(-0.001, 0.001),  # 1 SE: not enough
          "on-policy: grounding - control: SFT on chosen (recall)": d(0.0, 0.01)}
    rng = np.random.default_rng(0)
    plain = [rng.normal(0.0, 1.0, 300) for _ in range(3)]
    conditional = [m + 0.5 for m in plain]
    gaps = {"seed0/stic": {"gap": 15.0}, "seed0/ground": {"gap": 2.0}, "seed1/stic": {"gap": 14.0},
            "seed1/ground": {"gap": 16.0}}
    got = judge_method_hypotheses(ci, {"STIC stage 1": plain, "STIC + conditional": conditional}, gaps)
    assert got["H5"]["held"] is False and set(got["H5"]["arms"]) == {"STIC + conditional", "on-policy: grounding"}
    ci["STIC + conditional - control: SFT on chosen (recall)"] = d(-0.01, 0.01)
    assert judge_method_hypotheses(ci, None, gaps)["H5"]["held"] is True
    assert got["H6"]["held"] is True and got["H6"]["difference"] == pytest.approx(0.5)
    assert judge_method_hypotheses(ci, {"STIC stage 1": plain, "STIC + conditional": plain}, gaps)["H6"]["held"] is False
    assert got["H7"]["held"] is False  # seed 1's grounding gap is larger
    assert judge_method_hypotheses({}, None, {})["H7"]["held"] is None
    same = paired_bootstrap_arrays(plain, plain, replicates=50)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0]


def test_the_beyond_hypotheses_are_read_as_pre_registered():
    """H8: all four CIs (self-questions vs STIC and vs base, presence F1 and adversarial accuracy) above 0; H9: the
    |yes-ratio - 0.5| CI below 0 and the QA accuracy CI's lower bound above -1 point; H10: round 3 - round 1 below 0
    (recipes/shapesworld/hypotheses-beyond.md)."""
    from stic.shapes.stats import BALANCED_ARM, SQ_ARM, judge_beyond_hypotheses

    def d(lo, hi):
        return {"difference": (lo + hi) / 2, "ci95": [lo, hi]}

    ci = {f"{SQ_ARM} - {ref} ({m})": d(0.01, 0.05) for ref in ("STIC stage 1", "base")
          for m in ("presence_f1", "absent_companion_accuracy")}
    ci[f"{BALANCED_ARM} - STIC stage 2 (yes_ratio_distance)"] = d(-0.08, -0.02)
    ci[f"{BALANCED_ARM} - STIC stage 2 (QA)"] = d(-0.008, 0.004)
    ci["rounds: round 3 - round 1"] = d(-0.01, -0.001)
    got = judge_beyond_hypotheses(ci)
    assert [got[h]["held"] for h in ("H8", "H9", "H10")] == [True, True, True]
    ci[f"{SQ_ARM} - base (absent_companion_accuracy)"] = d(-0.001, 0.05)  # one of the four touches 0
    ci[f"{BALANCED_ARM} - STIC stage 2 (QA)"] = d(-0.012, 0.004)  # may lose more than a point
    ci["rounds: round 3 - round 1"] = d(-0.01, 0.0)
    got = judge_beyond_hypotheses(ci)
    assert [got[h]["held"] for h in ("H8", "H9", "H10")] == [False, False, False]
    ci[f"{BALANCED_ARM} - STIC stage 2 (QA)"] = d(-0.008, 0.004)
    ci[f"{BALANCED_ARM} - STIC stage 2 (yes_ratio_distance)"] = d(-0.08, 0.01)  # not clearly toward 0.5
    assert judge_beyond_hypotheses(ci)["H9"]["held"] is False
    assert all(h["held"] is None for h in judge_beyond_hypotheses({}).values())


def test_presence_metrics_are_recomputed_from_the_drawn_items():
    """The bootstrap's presence F1, adversarial accuracy and yes-ratio distance match their definitions."""
    from stic.shapes.stats import _metric

    data = {"said_yes": np.array([1, 1, 0, 1, 0, 1.0]), "is_yes": np.array([1, 0, 1, 1, 0, 0.0]),
            "correct": np.array([1, 0, 0, 1, 1, 0.0]), "companion": np.array([False, True, False, False, True, True])}
    every = np.arange(6)
    assert _metric(data, "presence_f1", every) == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))  # tp 2, fp 2, fn 1
    assert _metric(data, "absent_companion_accuracy", every) == pytest.approx(1 / 3)
    assert _metric(data, "yes_ratio_distance", every) == pytest.approx(abs(4 / 6 - 0.5))
    assert _metric(data, "presence_f1", np.array([1, 1, 4])) == 0.0  # no true positive drawn


def test_base_calibration_is_reused_only_for_its_world_and_size(tmp_path, monkeypatch):
    from stic.shapes import calibrate

    calls = []
    monkeypatch.setattr(calibrate, "measure", lambda base, world, n: calls.append((world.name, n)) or
                        {"world_digest": world.digest(), "scenes": n})
    other = W.load_world(REPO / "recipes" / "shapesworld" / "candidates" / "v2a.yaml")
    base = tmp_path / "base"
    base.mkdir()
    calibrate.base_calibration(base, W.DEFAULT, 50)
    assert calibrate.base_calibration(base, W.DEFAULT, 40)["scenes"] == 50  # recorded beside the base, reused
    calibrate.base_calibration(base, W.DEFAULT, 100)  # more scenes than recorded: measured again
    calibrate.base_calibration(base, other, 100)  # another world: measured again
    assert calls == [(W.DEFAULT.name, 50), (W.DEFAULT.name, 100), (other.name, 100)]


@pytest.mark.slow
def test_the_methods_round_2_of_each_seed_uses_its_own_scenes(tmp_path):
    """make demo-methods in miniature (2 seeds): every arm runs, and round 2 of each seed makes its pairs from that
    seed's scenes with that seed's merged model (the seeds' stage-1 closures once all read the last seed's)."""
    from stic.shapes.demo import run_demo

    out = tmp_path / "methods"
    results = run_demo([0, 1], n_train=16, n_heldout=20, out=out, calibration_scenes=20, methods=True)
    assert {"STIC + conditional", "on-policy: grounding", "on-policy: self-feedback",
            "round 2 of the best"} <= set(results)
    best = json.loads((out / "results.json").read_text())["diagnostics"]["round2_of"]
    tag = {"STIC + conditional": "cond", "on-policy: grounding": "ground", "on-policy: self-feedback": "selffb"}[best]
    for seed in (0, 1):
        config = json.loads((out / f"seed{seed}" / f"selfgen-{tag}-r2" / "run_config.json").read_text())
        assert config["selfgen"]["images"]["path"] == str(out / f"seed{seed}" / "data" / "train" / "images")
        assert config["selfgen"]["seed"] == seed
        assert config["model"]["name_or_path"] == str(out / f"seed{seed}" / f"{tag}-merged")


def test_demo_variants_equal_the_recipes_their_overrides_parse_to(tmp_path):
    """The demo builds its variants with dataclasses.replace; each equals the recipe that `section.key=value`
    overrides of the same settings parse to (so the stages see exactly what a user's command line would give)."""
    from stic.shapes.demo import base_recipe, variant, world_settings

    base, prompts = tmp_path / "base", tmp_path / "prompts"
    built = variant(variant(base_recipe(), **world_settings(W.DEFAULT, tmp_path, base)),
                    selfgen={"images": {"path": "scenes/images"}, "seed": 3},
                    dpo={"seed": 3, "report_to": [], "logging_steps": 1, "mode": "sft_positive", "max_steps": 7},
                    infuse_sft={"subset": {"size": 50, "seed": 3}, "stage1_adapter": "run/dpo"})
    parsed = base_recipe([
        f"model.name_or_path={base}", f"selfgen.prompts.good_prompt_file={prompts / 'careful_prompt.txt'}",
        f"selfgen.prompts.caption_prompts_file={prompts / 'caption_prompts.txt'}",
        f"selfgen.prompts.hallucination_prompts_file={prompts / 'hallucination_prompts.txt'}",
        f"infuse_sft.describe.prompt={W.DEFAULT.prompts.describe}", "selfgen.images.path=scenes/images",
        "selfgen.seed=3", "dpo.seed=3", "dpo.report_to=[]", "dpo.logging_steps=1", "dpo.mode=sft_positive",
        "dpo.max_steps=7", "infuse_sft.subset.size=50", "infuse_sft.subset.seed=3", "infuse_sft.stage1_adapter=run/dpo"])
    assert built == parsed and built.dpo.loss_type == ["sigmoid", "sft"] and built.dpo.loss_weights == [1.0, 1.0]
    assert built != base_recipe()
    # alpha = 0: the sft entry derived from sft_weight goes with it
    assert variant(base_recipe(), dpo={"sft_weight": 0.0, "loss_type": ["sigmoid"], "loss_weights": [1.0]}) == \
        base_recipe(["dpo.sft_weight=0.0"])
    # a new sft_weight against the derived entry is ambiguous: refused, not silently mixed
    with pytest.raises(ValueError, match="sft_weight or an 'sft' entry"):
        variant(base_recipe(), dpo={"sft_weight": 0.5})


def test_the_ablations_are_compared_with_stic_and_the_control(tmp_path):
    """`make demo-full` pools each ablation's runs by arm (one per seed) and reports it against STIC stage 1 and SFT
    on chosen with the same paired bootstrap as the pre-registered comparisons."""
    from stic.shapes.demo import ABLATION_TAGS
    from stic.shapes.stats import ABLATION_ARMS, ablation_comparisons, confidence_intervals, paired_difference

    assert len(ABLATION_TAGS) == len(ABLATION_ARMS) == 5
    n, rng = 300, np.random.default_rng(0)

    def write(run, bad):  # a run with `bad` hallucinated claims of 2 per scene
        per = {f"t{i:03d}": {"hallucinated": int(i < bad), "claims": 2, "mentioned": 2 - int(i % 7 == 0),
                             "objects": 2} for i in rng.permutation(n)}
        (tmp_path / run / "shapes_describe").mkdir(parents=True)
        (tmp_path / run / "shapes_describe" / "scores.json").write_text(json.dumps({"per_item": per}))

    arm_runs = {"STIC stage 1": [], "control: SFT on chosen": [], "ablation: 2x images": []}
    for seed in range(3):
        for arm, tag, bad in (("STIC stage 1", "stic", 12), ("control: SFT on chosen", "sftpos", 9),
                              ("ablation: 2x images", "2x", 6 + seed)):
            write(f"s{seed}-{tag}", bad)
            arm_runs[arm].append(f"s{seed}-{tag}")
    ci = confidence_intervals(tmp_path, arm_runs, replicates=200, comparisons=ablation_comparisons())
    # only the ablation that ran is reported, in its three comparisons
    assert list(ci) == ["ablation: 2x images - STIC stage 1", "ablation: 2x images - STIC stage 1 (recall)",
                        "ablation: 2x images - control: SFT on chosen"]
    assert ci["ablation: 2x images - STIC stage 1"]["difference"] == pytest.approx((7 - 12) / (2 * n))
    assert ci["ablation: 2x images - control: SFT on chosen"]["difference"] == pytest.approx((7 - 9) / (2 * n))
    assert ci["ablation: 2x images - STIC stage 1 (recall)"]["difference"] == 0
    from stic.shapes.stats import load_describe

    direct = paired_difference([load_describe(tmp_path, r) for r in arm_runs["ablation: 2x images"]],
                               [load_describe(tmp_path, r) for r in arm_runs["STIC stage 1"]],
                               "hallucination_rate", replicates=200)
    assert ci["ablation: 2x images - STIC stage 1"] == direct
