import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from corruptions import corrupt
from stic.config import ModelSpec
from stic.generation import BatchGenerator, Output
from stic.models import load_model, load_processor
from stic.prompts import CAPTION_PROMPTS, HALLUCINATION_PROMPTS, PromptSets
from stic.selfgen import (
    ID_COLUMN,
    PairGenerator,
    SelfGenConfig,
    parse_recipe,
    plan_image,
)
from stic.tiny import FAMILIES
from tests.conftest import (free_port, photo, selfgen_recipe, selfgen_rows, selfgen_run, spy_on_generate, tiny_llava,
                            write_bad_images)

REPO = Path(__file__).resolve().parent.parent
PROMPTS = PromptSets("good prompt", tuple(CAPTION_PROMPTS), tuple(HALLUCINATION_PROMPTS))
SPECS = [{"kind": "color_jitter"}, {"kind": "lower_resolution"}, {"kind": "jpeg"}]


@pytest.mark.parametrize("p", [0.0, 0.2, 0.5, 1.0])
def test_branch_split_follows_p(p):
    cfg = SelfGenConfig(hallucination_prob=p, seed=1)
    plans = [plan_image(f"img{i}.jpg", cfg, PROMPTS, SPECS) for i in range(4000)]
    share = np.mean([pl.branch == "hallucination" for pl in plans])
    assert abs(share - p) <= 4 * np.sqrt(p * (1 - p) / 4000) + 1e-9  # within four standard errors
    for pl in plans[:200]:
        if pl.branch == "hallucination":
            assert pl.hallucination_prompt in HALLUCINATION_PROMPTS and pl.corruption is None
            assert pl.rejected_prompt == pl.hallucination_prompt
        else:
            assert pl.corruption in SPECS and pl.hallucination_prompt is None
            assert pl.rejected_prompt == pl.caption_prompt  # the corrupted branch uses the ordinary prompt x
    # every corruption kind and many caption prompts get used; plans depend only on (seed, id)
    if p < 1:
        assert {pl.corruption["kind"] for pl in plans if pl.corruption} == {s["kind"] for s in SPECS}
    assert len({pl.caption_prompt for pl in plans}) == len(CAPTION_PROMPTS)
    assert plan_image("img7.jpg", cfg, PROMPTS, SPECS) == plans[7]


def test_corrupted_branch_feeds_corrupted_pixels_to_the_model():
    model, processor = tiny_llava()
    seen = spy_on_generate(model, lambda kw: kw["pixel_values"].clone())
    cfg = SelfGenConfig(hallucination_prob=0.5, corruptions=["color_jitter", "lower_resolution"], seed=3)
    cfg.chosen_sampling.max_new_tokens = cfg.rejected_sampling.max_new_tokens = 3
    pairs = PairGenerator(BatchGenerator(model, processor, batch_size=1, group_by_length=False), cfg, PROMPTS, "m")
    items = [(f"img{i}.png", photo(i, size=(64, 64))) for i in range(8)]
    plans = [pairs.plan(i) for i, _ in items]
    assert {p.branch for p in plans} == {"hallucination", "corruption"}
    pairs(items)
    assert len(seen) == 2 * len(items)  # one call per chosen, then one per rejected
    pixels = lambda img: processor.image_processor(img, return_tensors="pt")["pixel_values"]
    for i, (plan, (_, clean)) in enumerate(zip(plans, items)):
        assert np.allclose(seen[i], pixels(clean))  # chosen: the clean image
        rejected_input = seen[len(items) + i]
        if plan.branch == "corruption":
            expected, _ = corrupt(clean, plan.corruption["kind"], plan.corruption_seed)
            assert np.allclose(rejected_input, pixels(expected))
            assert not np.allclose(rejected_input, pixels(clean))
        else:
            assert np.allclose(rejected_input, pixels(clean))


class ScriptedEngine:
    """Returns fixed outputs, to test the filters without a model."""

    def __init__(self, chosen, rejected):
        self.queue = [chosen, rejected]

    def generate(self, requests, sampling, seed=0, on_batch=None):
        return self.queue.pop(0)


def test_filters_drop_and_count():
    cfg = SelfGenConfig(drop_truncated_chosen=True)
    chosen = [Output("a red car", "eos", 3), Output("", "eos", 0), Output("same", "eos", 1),
              Output("long text", "length", 2), Output("fine", "eos", 1)]
    rejected = [Output("a blue car", "eos", 3), Output("x", "eos", 1), Output("same", "eos", 1),
                Output("y", "eos", 1), Output("", "length", 0)]
    pairs = PairGenerator(ScriptedEngine(chosen, rejected), cfg, PROMPTS, "m")
    rows, drops = pairs([(f"i{k}", photo(k)) for k in range(5)])
    assert [r[ID_COLUMN] for r in rows] == ["i0"]
    assert {d["id"]: d["reason"] for d in drops} == {
        "i1": "empty_chosen", "i2": "identical", "i3": "truncated_chosen", "i4": "empty_rejected"}


def test_bad_images_are_skipped_and_listed(tmp_path, photo_dir):
    expected = write_bad_images(photo_dir)
    out = tmp_path / "out"
    manifest = selfgen_run(selfgen_recipe(out, {"type": "folder", "path": str(photo_dir),
                                        "max_decode_pixels": 1_000_000}))
    assert manifest["counts"]["rows"] + sum(manifest["counts"]["dropped_pairs"].values()) == 6
    assert manifest["counts"]["rejected_images"] == 4
    rejects = {json.loads(line)["id"]: json.loads(line)["reason"]
               for line in (out / "rejects.jsonl").read_text().splitlines()}
    assert set(rejects) == set(expected)
    for name, word in expected.items():
        assert word in rejects[name]
    assert set(selfgen_rows(out)[ID_COLUMN]).isdisjoint(expected)


def write_recipe(tmp_path, recipe):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_killed_process_resumes_with_each_image_once(tmp_path, photo_dir):
    for i in range(6):
        photo(10 + i, size=(64, 48)).save(photo_dir / f"extra{i}.png")  # 12 images, one per part
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, selfgen_recipe(out, {"type": "folder", "path": str(photo_dir)},
                                                   images_per_part=1, batch_size=2,
                                                   chosen_sampling={"max_new_tokens": 24}))
    cmd = [sys.executable, "-m", "stic", "selfgen", "--recipe", str(recipe)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "data").glob("*.parquet")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-run: some parts written, others not
    proc.wait()
    written = len(list((out / "data").glob("*.parquet")))
    assert 0 < written < 12, "the kill should land mid-run"
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    ids = list(selfgen_rows(out)[ID_COLUMN])
    manifest = json.loads((out / "manifest.json").read_text())
    dropped = sum(manifest["counts"]["dropped_pairs"].values())
    assert len(ids) == len(set(ids)) and len(ids) + dropped == 12
    assert manifest["last_run"]["already_done_at_start"] >= written


@pytest.mark.parametrize("family", FAMILIES)
def test_output_trains_one_dpo_step(tmp_path, photo_dir, family):
    import torch
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    out = tmp_path / "out"
    manifest = selfgen_run(selfgen_recipe(out, {"type": "folder", "path": str(photo_dir), "limit": 4}, family=family))
    ds = selfgen_rows(out)
    assert len(ds) == manifest["counts"]["rows"] >= 3
    row = ds[0]
    assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
    assert row["model"] == f"tiny:{family}" and row["rejected_branch"] in ("hallucination", "corruption")
    assert row["image_corruption"] == (row["rejected_branch"] == "corruption")
    assert row["chosen_finish_reason"] in ("eos", "length")
    cfg = ModelSpec(name_or_path=f"tiny:{family}", dtype="float32")
    model, processor = load_model(cfg), load_processor(cfg)
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, per_device_train_batch_size=2,
                     learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                     loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0], logging_steps=1)
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=processor,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    result = trainer.train()
    assert result.global_step == 1 and np.isfinite(result.training_loss)
    changed = [n for n, p in trainer.model.named_parameters() if "lora_B" in n and not torch.equal(p, lora[n])]
    assert changed, "the DPO step must update the adapter"


def test_two_processes_give_the_same_ids_as_one(tmp_path, photo_dir):
    images = {"type": "folder", "path": str(photo_dir)}
    one = write_recipe(tmp_path, selfgen_recipe(tmp_path / "one", images))
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump(selfgen_recipe(tmp_path / "two", images)))
    base = [sys.executable, "-m", "stic", "selfgen"]
    subprocess.run([*base, "--recipe", str(one)], cwd=REPO, check=True, capture_output=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "recipes/accelerate/ddp.yaml"), "--num_processes", "2", "--main_process_port",
              str(free_port()), "-m", "stic", "selfgen", "--recipe", str(two)]
    res = subprocess.run(launch, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    one_ids = list(selfgen_rows(tmp_path / "one")[ID_COLUMN])
    two_ids = list(selfgen_rows(tmp_path / "two")[ID_COLUMN])
    assert sorted(one_ids) == sorted(two_ids) and len(two_ids) == len(set(two_ids))
    parts = list((tmp_path / "two" / "data").glob("*.parquet"))
    assert {p.name.split("-")[2] for p in parts} == {"r000", "r001"}  # both processes wrote their shard
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["last_run"]["processes"] == 2
    # the per-image plan does not depend on sharding
    cols = ["rejected_branch", "caption_prompt", "corruption_params"]
    key = lambda ds: sorted(zip(ds[ID_COLUMN], *(ds[c] for c in cols)))
    assert key(selfgen_rows(tmp_path / "one")) == key(selfgen_rows(tmp_path / "two"))


def test_self_consistency_keeps_the_most_agreed_description():
    from stic.selfgen import agreement, most_consistent

    outs = [Output("a red circle at the top left.", "eos", 7), Output("a red circle at the top.", "eos", 6),
            Output("two green dogs in a park.", "eos", 6), Output("a red circle at the top left.", "eos", 7)]
    best, score = most_consistent(outs)
    assert best.text == "a red circle at the top left." and 0.5 < score < 1.0
    assert agreement("a b", "a b") == 1.0 and agreement("a", "z") == 0.0
    assert most_consistent(outs[:1]) == (outs[0], 1.0)


def test_self_consistency_in_selfgen_with_an_agreement_floor():
    class Scripted:
        def __init__(self):
            self.calls = []

        def generate(self, requests, sampling, seed=0, on_batch=None):
            self.calls.append((len(requests), sampling.do_sample))
            if len(self.calls) == 1:  # 3 samples for each of 2 images: image 0 consistent, image 1 not
                texts = ["red ball", "red ball", "red cube", "cat", "dog on grass", "blue sky"]
            else:
                texts = ["something else", "another thing"]
            return [Output(t, "eos", 2) for t in texts]

    cfg = SelfGenConfig(consistency_samples=3, min_agreement=0.5)
    engine = Scripted()
    rows, drops = PairGenerator(engine, cfg, PROMPTS, "m")([("i0", photo(0)), ("i1", photo(1))])
    assert engine.calls[0] == (6, True)  # k sampled answers per image, in one batch call
    assert [r["chosen"][0]["content"] for r in rows] == ["red ball"] and rows[0]["chosen_agreement"] > 0.5
    assert drops == [{"id": "i1", "status": "dropped", "reason": "low_agreement"}]
    with pytest.raises(ValueError, match="min_agreement"):
        SelfGenConfig(min_agreement=0.3)


def test_resume_with_another_batch_size_gives_the_same_pairs(tmp_path, photo_dir):
    """Sampled answers come from per-image streams, so how the images were batched changes no pair."""
    images = {"type": "folder", "path": str(photo_dir)}
    sampled = {"max_new_tokens": 6, "do_sample": True, "temperature": 1.0}
    kw = dict(chosen_sampling=sampled, rejected_sampling=sampled)
    selfgen_run(selfgen_recipe(tmp_path / "whole", images, batch_size=4, **kw))
    partial = dict(images, limit=3)
    selfgen_run(selfgen_recipe(tmp_path / "resumed", partial, batch_size=2, **kw))
    selfgen_run(selfgen_recipe(tmp_path / "resumed", images, batch_size=3, group_by_length=False, **kw))
    key = lambda ds: sorted(zip(ds[ID_COLUMN], (c[0]["content"] for c in ds["chosen"]),
                                (r[0]["content"] for r in ds["rejected"])))
    whole, resumed = key(selfgen_rows(tmp_path / "whole")), key(selfgen_rows(tmp_path / "resumed"))
    assert whole == resumed and len(whole) >= 5


def test_default_hallucination_pool_invents_objects_only():
    import re

    from stic.config import RecipeError
    from stic.prompts import PromptsConfig, load_prompts

    default = load_prompts(PromptsConfig()).hallucination
    assert default == tuple(HALLUCINATION_PROMPTS) and len(default) >= 8
    for prompt in default:  # objects, people, animals that are not there; no invented text, numbers or colours
        assert re.search(r"object|people|animal|item|figure|vehicle|things", prompt, re.I), prompt
        assert not re.search(r"\b(text|written|names?|numbers?|counts?|colou?rs?|positions?)\b", prompt, re.I), prompt

    from stic.prompts import EXTRA_HALLUCINATION_PROMPTS

    extra = [p for kind in ("text", "numbers", "attributes") for p in EXTRA_HALLUCINATION_PROMPTS[kind]]
    everything = load_prompts(PromptsConfig(hallucination_kinds=["objects", "text", "numbers", "attributes"]))
    assert everything.hallucination == default + tuple(extra)  # opting in adds the other kinds
    assert load_prompts(PromptsConfig(hallucination_kinds=["text"])).hallucination == \
        tuple(EXTRA_HALLUCINATION_PROMPTS["text"])
    recipe = parse_recipe({"selfgen": {"prompts": {"hallucination_kinds": ["objects", "numbers"]}}})
    assert recipe.selfgen.prompts.hallucination_kinds == ["objects", "numbers"]
    with pytest.raises(RecipeError, match=r"selfgen.prompts: hallucination_kinds: unknown kind 'colours'; "
                                          r"choose from objects, text, numbers, attributes"):
        parse_recipe({"selfgen": {"prompts": {"hallucination_kinds": ["objects", "colours"]}}})
