import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from stic.config import ModelSpec
from stic.generation import BatchGenerator
from stic.infuse import (DEFAULT_TEMPLATE, InfuseSFTConfig, Recipe, describe_and_respond, describe_images,
                         infuse_instruction, infuse_record, run_infuse_sft)
from stic.instructions import InstructionDataConfig, SubsetConfig, load_instructions
from stic.models import load_model, load_processor
from tests.conftest import conv, die_on_call, make_adapter, photo, spy_on_generate, tiny_llava

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def llava_mix(tmp_path):
    (tmp_path / "img" / "coco").mkdir(parents=True)
    for i in range(4):
        photo(20 + i, size=(56, 48)).save(tmp_path / "img" / "coco" / f"{i}.jpg")
    records = [
        {"id": f"r{i}", "image": f"coco/{i % 4}.jpg",
         "conversations": conv(f"<image>\nWhat color is the block {i}?", f"Block {i} is red.",
                               "And the background?", "A gradient.")} for i in range(6)]
    records += [{"id": "text", "conversations": conv("Name a fruit.", "Apple.")},
                {"id": "gone", "image": "coco/nope.jpg", "conversations": conv("<image>\nQ?", "A")},
                {"id": "nohuman", "image": "coco/0.jpg", "conversations": [{"from": "gpt", "value": "A"}]}]
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(records))
    return InstructionDataConfig(path=str(path), image_folder=str(tmp_path / "img"), text_only="keep")


def stage2_cfg(tmp_path, data, adapter, **kw):
    base = dict(output_dir=str(tmp_path / "s2"), data=data, subset=SubsetConfig(size=7, strategy="balanced"),
                stage1_adapter=str(adapter), per_device_train_batch_size=2, learning_rate=1e-3,
                max_length=None, report_to=[], save_strategy="no", activation_checkpointing=False, plot=False,
                lora_r=4, lora_alpha=8)
    base.update(kw)
    cfg = InfuseSFTConfig(**base)
    cfg.describe.sampling.max_new_tokens = 8
    cfg.describe.images_per_part = 1
    return cfg


def test_infused_prompt_matches_the_template_exactly():
    record = {"id": "x", "image": "a.jpg", "image_path": "/a.jpg",
              "messages": [{"role": "user", "content": "What is red?"}, {"role": "assistant", "content": "The mug."},
                           {"role": "user", "content": "And blue?"}, {"role": "assistant", "content": "The sky."}]}
    out = infuse_record(record, "  A mug on a table.  ", DEFAULT_TEMPLATE)
    assert out["messages"][0]["content"] == "Image description: A mug on a table.\nWhat is red?"
    assert out["messages"][1:] == record["messages"][1:]  # answers and later turns unchanged
    assert record["messages"][0]["content"] == "What is red?"  # the source record is not modified
    custom = infuse_record(record, "d", "Context: {description}\n\nQuestion: {instruction}")
    assert custom["messages"][0]["content"] == "Context: d\n\nQuestion: What is red?"
    assert infuse_instruction("Q", "D") == "Image description: D\nQ"
    with pytest.raises(ValueError, match="description"):
        InfuseSFTConfig(output_dir="x", template="{instruction}", report_to=[])


def test_image_placeholder_goes_where_the_chat_template_puts_it(llava_mix):
    from trl.data_utils import prepare_multimodal_messages

    records, _ = load_instructions(llava_mix)
    row = infuse_record(records[0], "A block.", DEFAULT_TEMPLATE)
    processor = load_processor(ModelSpec(name_or_path="tiny:llava"))
    text = processor.apply_chat_template(prepare_multimodal_messages(row["messages"], images=[None]), tokenize=False)
    assert text.startswith("<s>USER: <image>\nImage description: A block.\nWhat color is the block 0? ASSISTANT: Block 0")


def test_loss_mask_covers_only_the_answers(tmp_path, llava_mix):
    from trl import SFTTrainer

    from stic.infuse import build_training_set

    records, _ = load_instructions(llava_mix)
    ds, _ = build_training_set(records[:2], {"coco/0.jpg": "A block.", "coco/1.jpg": "Two blocks."},
                               DEFAULT_TEMPLATE)
    cfg = stage2_cfg(tmp_path, llava_mix, "unused", stage1_adapter=None, adapter_mode="new")
    mcfg = ModelSpec(name_or_path="tiny:llava", dtype="float32")
    processor = load_processor(mcfg)
    trainer = SFTTrainer(model=load_model(mcfg), args=cfg, train_dataset=ds, processing_class=processor)
    batch = trainer.data_collator([ds[0], ds[1]])
    tok = processor.tokenizer
    for i, rec in enumerate(records[:2]):
        labels = batch["labels"][i]
        trained = labels[labels != -100].tolist()
        answers = [m["content"] for m in rec["messages"] if m["role"] == "assistant"]
        expected = []
        for a in answers:  # each answer followed by the end-of-turn token, nothing else
            expected += tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert trained == expected
        assert "Image description" not in tok.decode(trained)


def test_description_step_resumes_without_loss_or_duplication(tmp_path, llava_mix, monkeypatch):
    from stic import store
    from stic.instructions import choose_subset

    adapter = make_adapter(tmp_path / "stage1")
    cfg = stage2_cfg(tmp_path, llava_mix, adapter)
    recipe = Recipe(model=ModelSpec(name_or_path="tiny:llava", dtype="float32"), infuse_sft=cfg)
    records, _ = load_instructions(llava_mix)
    subset = choose_subset(records, cfg.subset)
    real = die_on_call(monkeypatch, store.ShardedOutput, "write_rows", 3)  # killed while describing
    with pytest.raises(KeyboardInterrupt):
        describe_images(recipe, subset)
    monkeypatch.setattr(store.ShardedOutput, "write_rows", real)
    out = store.ShardedOutput(Path(cfg.output_dir) / "descriptions")
    first = {p.name: p.stat().st_mtime_ns for p in out.part_files()}
    assert len(first) == 2
    descriptions = describe_images(recipe, subset)
    images = {r["image"] for r in subset if r["image"]}
    assert set(descriptions) == images
    ids = out.row_ids("image_id")
    assert len(ids) == len(set(ids)) == len(images)
    assert all(out.root.joinpath("data", n).stat().st_mtime_ns == t for n, t in first.items())  # not redone
    # each image was described with a caption prompt drawn for it (the paper's Algorithm 2), not one fixed prompt
    import pyarrow.parquet as pq

    from stic.prompts import CAPTION_PROMPTS

    rows = [r for part in out.part_files() for r in pq.read_table(part).to_pylist()]
    assert all(r["prompt"] == cfg.describe.prompt_for(r["image_id"], cfg.seed) for r in rows)
    drawn = {cfg.describe.prompt_for(f"img{i}", cfg.seed) for i in range(40)}
    assert drawn <= set(CAPTION_PROMPTS) and len(drawn) >= 5


def test_stage2_end_to_end_continues_the_stage1_adapter(tmp_path, llava_mix):
    from safetensors.torch import load_file

    adapter = make_adapter(tmp_path / "stage1")
    cfg = stage2_cfg(tmp_path, llava_mix, adapter)
    summary = run_infuse_sft(Recipe(model=ModelSpec(name_or_path="tiny:llava", dtype="float32"), infuse_sft=cfg))
    out = Path(cfg.output_dir)
    skipped = [json.loads(line) for line in (out / "skipped_records.jsonl").read_text().splitlines()]
    assert {s["id"] for s in skipped} == {"gone", "nohuman"}
    assert summary["subset"]["composition"]["records"] == 7
    assert summary["subset"]["composition"]["by_source"] == {"coco": 6, "text": 1}
    assert summary["trained_records"] == 7 and summary["global_step"] == 4
    sample = json.loads((out / "infused_samples.jsonl").read_text().splitlines()[0])
    assert sample["messages"][0]["content"].startswith("Image description: ")
    s1, s2 = load_file(str(adapter / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert s1.keys() == s2.keys()  # the same adapter, trained further
    assert any(not torch.equal(s1[k], s2[k]) for k in s1)


def test_stage2_new_adapter_on_the_merged_stage1_model(tmp_path, llava_mix):
    adapter = make_adapter(tmp_path / "stage1")
    cfg = stage2_cfg(tmp_path, llava_mix, adapter, adapter_mode="new", subset=SubsetConfig(size=3))
    summary = run_infuse_sft(Recipe(model=ModelSpec(name_or_path="tiny:llava", dtype="float32"), infuse_sft=cfg))
    assert summary["adapter_mode"] == "new" and summary["global_step"] == 2
    assert json.loads((Path(cfg.output_dir) / "adapter_config.json").read_text())["r"] == 4


def test_dar_gives_the_model_the_image_in_both_steps():
    model, processor = tiny_llava()
    calls = spy_on_generate(model, lambda kw: {"pixels": kw.get("pixel_values"), "ids": kw["input_ids"].clone()})
    image = photo(5, size=(64, 64))
    [(description, answer)] = describe_and_respond(BatchGenerator(model, processor), [image], ["Is it red?"])
    assert len(calls) == 2
    expected = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    for call in calls:
        assert call["pixels"] is not None and torch.allclose(call["pixels"], expected)
    second = processor.tokenizer.decode(calls[1]["ids"][0], skip_special_tokens=False)
    assert "<image>" in second
    assert infuse_instruction("Is it red?", description) in second  # exactly the training infusion
    assert answer.finish_reason in ("eos", "length")


def test_dar_and_infuse_commands(tmp_path, llava_mix):
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"model": {"name_or_path": "tiny:llava", "dtype": "float32"},
                                 "infuse_sft": {"output_dir": str(tmp_path / "s2"), "report_to": []}}))
    photo(1).save(tmp_path / "q.png")
    res = subprocess.run([sys.executable, "-m", "stic", "dar", "--recipe", str(r), "--base", "--image",
                          str(tmp_path / "q.png"), "--question", "What is it?", "--max-new-tokens", "4"],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout[res.stdout.index("{"):])
    # exactly what describe-and-respond gives in this process with the recipe's settings (greedy, seeded)
    from stic.generation import SamplingConfig
    from stic.images import decode_image
    from stic.infuse import parse_recipe

    cfg = parse_recipe(yaml.safe_load(r.read_text())).infuse_sft
    image = decode_image(str(tmp_path / "q.png"), max_pixels=2048 * 2048, max_decode_pixels=16384 * 16384)
    [(description, answer)] = describe_and_respond(
        BatchGenerator(*tiny_llava()), [image], ["What is it?"], keys=[str(tmp_path / "q.png")],
        describe=cfg.describe, template=cfg.template, seed=cfg.seed, answer_sampling=SamplingConfig(max_new_tokens=4))
    assert out == {"adapters": [], "description": description, "answer": answer.text,
                   "finish_reason": answer.finish_reason}
    assert answer.num_tokens == 4 or answer.finish_reason == "eos"
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    res = subprocess.run([sys.executable, "-m", "stic", "infuse-sft", "--recipe", str(r), f"data.path={bad}"],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2 and "bad.json: not valid JSON" in res.stderr and "Traceback" not in res.stderr


def test_stage2_trains_the_projector_at_its_own_rate(tmp_path, llava_mix):
    from peft import get_peft_model
    from trl import SFTTrainer

    from stic.infuse import build_training_set, load_model_for_training
    from stic.models import LoraOptions, lora_config
    from stic.training import TrainingSetupError, trainer_class

    model = load_model(ModelSpec(name_or_path="tiny:llava", dtype="float32"))  # a stage 1 that trained it
    options = LoraOptions(lora_r=4, lora_alpha=8, train_projector=True)
    get_peft_model(model, lora_config(options, model)).save_pretrained(tmp_path / "stage1")
    mcfg = ModelSpec(name_or_path="tiny:llava", dtype="float32")
    cfg = stage2_cfg(tmp_path, llava_mix, tmp_path / "stage1", train_projector=True, mm_projector_lr=2e-2,
                     learning_rate=1e-3, lr_scheduler_type="constant", max_steps=1, lora_dropout=0.0)
    model, _ = load_model_for_training(Recipe(model=mcfg, infuse_sft=cfg))
    records, _ = load_instructions(llava_mix)
    ds, _ = build_training_set(records[:2], {"coco/0.jpg": "A block.", "coco/1.jpg": "Two blocks."}, DEFAULT_TEMPLATE)
    trainer = trainer_class(SFTTrainer, cfg)(model=model, args=cfg, train_dataset=ds,
                                             processing_class=load_processor(mcfg))
    named = dict(trainer.model.named_parameters())
    projector = {n for n, p in named.items() if p.requires_grad and "multi_modal_projector" in n}
    assert projector and all("modules_to_save" in n for n in projector)
    name_of = {id(p): n for n, p in named.items()}
    groups = [({name_of[id(p)] for p in g["params"]}, g["lr"]) for g in trainer.create_optimizer().param_groups
              if g["params"]]
    assert set().union(*(names for names, lr in groups if lr == 2e-2)) == projector
    assert all(names.isdisjoint(projector) and all("lora_" in n for n in names) for names, lr in groups if lr == 1e-3)
    before = {n: named[n].detach().clone() for n in projector}
    trainer.train()
    assert max((named[n].detach() - before[n]).abs().max().item() for n in projector) == pytest.approx(2e-2, rel=0.05)

    # train_projector: false keeps the projector the stage-1 adapter trained as it is
    frozen, _ = load_model_for_training(Recipe(model=mcfg,
                                               infuse_sft=stage2_cfg(tmp_path, llava_mix, tmp_path / "stage1")))
    assert not any(p.requires_grad and "multi_modal_projector" in n for n, p in frozen.named_parameters())
    # and a stage-1 adapter without a projector cannot train one
    plain = make_adapter(tmp_path / "plain")
    with pytest.raises(TrainingSetupError, match="holds no trainable projector"):
        load_model_for_training(Recipe(model=mcfg, infuse_sft=stage2_cfg(tmp_path, llava_mix, plain,
                                                                        train_projector=True)))


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl", "idefics3"])
def test_stage2_continue_keeps_training_the_stage1_vision_lora(tmp_path, llava_mix, family):
    from peft import get_peft_model
    from trl import SFTTrainer

    from stic.infuse import build_training_set, load_model_for_training
    from stic.models import LoraOptions, lora_config
    from stic.training import TrainingSetupError, trainer_class
    from tests.test_training import vision_parts

    mcfg = ModelSpec(name_or_path=f"tiny:{family}", dtype="float32")
    model = load_model(mcfg)  # a stage 1 that ran with lora_vision
    options = LoraOptions(lora_r=4, lora_alpha=8, lora_vision=True, lora_vision_r=2, lora_vision_alpha=4)
    get_peft_model(model, lora_config(options, model)).save_pretrained(tmp_path / "stage1")
    cfg = stage2_cfg(tmp_path, llava_mix, tmp_path / "stage1", lora_vision=True, max_steps=1, lora_dropout=0.0)
    model, peft_config = load_model_for_training(Recipe(model=mcfg, infuse_sft=cfg))
    lora, own = vision_parts(model)
    assert peft_config is None and lora and all(p.requires_grad for p in lora.values())
    assert not any(p.requires_grad for p in own.values())
    records, _ = load_instructions(llava_mix)
    ds, _ = build_training_set(records[:2], {"coco/0.jpg": "A block.", "coco/1.jpg": "Two blocks."}, DEFAULT_TEMPLATE)
    trainer = trainer_class(SFTTrainer, cfg)(model=model, args=cfg, train_dataset=ds,
                                             processing_class=load_processor(mcfg))
    lora_b = {n: p.detach().clone() for n, p in lora.items() if "lora_B" in n}
    trainer.train()
    assert lora_b and [n for n in lora_b if torch.equal(lora[n].detach(), lora_b[n])] == []

    # lora_vision: false keeps the vision deltas as stage 1 left them; an adapter without any cannot train them
    frozen, _ = vision_parts(load_model_for_training(
        Recipe(model=mcfg, infuse_sft=stage2_cfg(tmp_path, llava_mix, tmp_path / "stage1")))[0])
    assert frozen and not any(p.requires_grad for p in frozen.values())
    with pytest.raises(TrainingSetupError, match="holds no vision LoRA .* dpo.lora_vision: true"):
        load_model_for_training(Recipe(model=mcfg, infuse_sft=stage2_cfg(
            tmp_path, llava_mix, make_adapter(tmp_path / "plain", family), lora_vision=True)))


def test_stage2_reports_the_yes_no_balance_of_its_subset(tmp_path, llava_mix):
    """subset.yes_no_ratio: the subset stage 2 trains on is re-sampled, and the run summary and the data report
    (subset.json, written before training) give its yes/no records before and after."""
    from stic.instructions import select_subset
    from stic.shapes.demo import achieved_yes_no

    answers = ["Yes."] * 9 + ["No, it is blue."] * 3 + ["It is red."] * 4
    records = [{"id": f"q{i}", "image": f"coco/{i % 4}.jpg", "conversations": conv(f"<image>\nIs block {i} red?", a)}
               for i, a in enumerate(answers)]
    Path(llava_mix.path).write_text(json.dumps(records))
    subset = SubsetConfig(size=8, seed=3, yes_no_ratio=1.0)  # its random 8 hold 5 yes, 1 no
    cfg = stage2_cfg(tmp_path, llava_mix, make_adapter(tmp_path / "stage1"), subset=subset, max_steps=1)
    summary = run_infuse_sft(Recipe(model=ModelSpec(name_or_path="tiny:llava", dtype="float32"), infuse_sft=cfg))
    chosen, expected = select_subset(load_instructions(llava_mix)[0], subset)
    assert summary["subset"]["yes_no"] == expected and summary["trained_records"] == 8
    assert achieved_yes_no(cfg.output_dir) == expected  # what `make demo-beyond` reports of its stage-2 arms
    assert expected["before"]["yes"] > expected["before"]["no"]
    assert expected["after"]["yes"] == expected["after"]["no"] and expected["after"]["ratio"] == 1.0
    report = json.loads((Path(cfg.output_dir) / "subset.json").read_text())
    assert report["yes_no"] == expected and report["composition"]["records"] == 8
    samples = (Path(cfg.output_dir) / "infused_samples.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in samples] == [r["id"] for r in chosen]


def test_stage2_global_batch_and_max_length(tmp_path, llava_mix, monkeypatch):
    import re

    from stic.training import TrainingSetupError, apply_global_batch

    assert InfuseSFTConfig(output_dir="x", report_to=[]).max_length is None  # not TRL's 1024
    for world, steps in ((1, 32), (8, 4)):  # one GPU and eight GPUs train the same recipe
        cfg = InfuseSFTConfig(output_dir="x", report_to=[], global_batch_size=32, per_device_train_batch_size=1)
        monkeypatch.setenv("WORLD_SIZE", str(world))
        apply_global_batch(cfg)
        monkeypatch.delenv("WORLD_SIZE")
        assert cfg.gradient_accumulation_steps == steps
    with pytest.raises(ValueError, match="global_batch_size 5 is not a multiple of per_device_train_batch_size 2"):
        InfuseSFTConfig(output_dir="x", report_to=[], global_batch_size=5, per_device_train_batch_size=2)

    adapter = make_adapter(tmp_path / "stage1")
    mcfg = ModelSpec(name_or_path="tiny:llava", dtype="float32")
    processor = load_processor(mcfg)
    image = processor(text=["<image>"], images=[[photo(0, size=(56, 48))]], return_tensors="pt")["input_ids"][0]
    image_tokens = int((image == processor.image_token_id).sum())
    answer = max(len(processor.tokenizer(a, add_special_tokens=False)["input_ids"])
                 for a in [f"Block {i} is red." for i in range(6)] + ["A gradient.", "Apple."])
    with pytest.raises(TrainingSetupError) as err:
        run_infuse_sft(Recipe(model=mcfg, infuse_sft=stage2_cfg(tmp_path, llava_mix, adapter, max_length=20,
                                                                global_batch_size=4)))
    found = re.search(r"infuse_sft.max_length 20 is below the longest training sequence: (\d+) image tokens \+ "
                      r"(\d+) prompt tokens \+ (\d+) answer tokens \(longest assistant answer\) = (\d+)",
                      str(err.value))
    assert found, str(err.value)
    n_image, n_prompt, n_answer, total = map(int, found.groups())
    assert (n_image, n_answer) == (image_tokens, answer) and n_prompt > 0 and total == n_image + n_prompt + n_answer
    assert not (tmp_path / "s2" / "adapter_model.safetensors").exists()  # refused before training
    summary = run_infuse_sft(Recipe(model=mcfg, infuse_sft=stage2_cfg(tmp_path, llava_mix, adapter, max_length=total,
                                                                      global_batch_size=4)))
    assert summary["max_length_check"]["total"] == total
    assert summary["batch"]["gradient_accumulation_steps"] == 2 and summary["batch"]["sequences_per_step"] == 4
    assert summary["global_step"] == 2  # 7 records, 4 per step
