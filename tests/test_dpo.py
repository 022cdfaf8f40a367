import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from stic.config import ModelSpec, RecipeError, load_recipe_dict
from stic.dpo import (
    DatasetError,
    DPOStageConfig,
    Recipe,
    load_preference_dataset,
    paper_alpha_to_sft_weight,
    parse_recipe,
    run_dpo,
)
from stic.tiny import FAMILIES
from tests.conftest import free_port, photo

REPO = Path(__file__).resolve().parent.parent
WORDS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]


def make_dataset(root: Path, n: int = 8) -> Path:
    """A fixed preference set in selfgen's format: each image's chosen and rejected answers differ."""
    import datasets

    rows = [{"prompt": [{"role": "user", "content": "Describe the image."}],
             "chosen": [{"role": "assistant", "content": f"a {WORDS[i % 8]} square on the left"}],
             "rejected": [{"role": "assistant", "content": f"two {WORDS[(i + 3) % 8]} dogs running in a park"}],
             "images": [photo(i, size=(48, 40))]} for i in range(n)]
    (root / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows).cast_column("images", datasets.List(datasets.Image())).to_parquet(
        str(root / "data" / "train-0.parquet"))
    return root


def dpo_cfg(tmp_path, data, **kw) -> DPOStageConfig:
    base = dict(output_dir=str(tmp_path / "run"), dataset=str(data), lora_r=8, lora_alpha=16, learning_rate=5e-3,
                per_device_train_batch_size=4, max_steps=12, logging_steps=1, save_strategy="no",
                report_to=[], activation_checkpointing=False, max_length=None, seed=0, plot=False, beta=0.5)
    base.update(kw)
    return DPOStageConfig(**base)


def recipe(family, cfg):
    return Recipe(model=ModelSpec(name_or_path=f"tiny:{family}", dtype="float32"), dpo=cfg)


def test_sft_weight_maps_to_trl_loss_types():
    c = DPOStageConfig(output_dir="x", sft_weight=0.25, report_to=[])
    assert c.loss_type == ["sigmoid", "sft"] and c.loss_weights == [1.0, 0.25]
    assert DPOStageConfig(output_dir="x", sft_weight=0.0, report_to=[]).loss_type == ["sigmoid"]
    c = DPOStageConfig(output_dir="x", sft_weight=None, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 2.0],
                       report_to=[])
    assert c.loss_weights == [1.0, 2.0]
    with pytest.raises(ValueError, match="either sft_weight"):
        DPOStageConfig(output_dir="x", loss_type=["sigmoid", "sft"], report_to=[])
    assert paper_alpha_to_sft_weight(1.0, 256) == 0.25


def test_recipe_section_takes_every_trl_option(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"dpo": {"beta": 0.2, "lr_scheduler_type": "cosine", "warmup_steps": 0.03,
                                            "ld_alpha": 0.5, "sft_weight": 0.5, "report_to": "none"}}))
    r = parse_recipe(load_recipe_dict(path))
    assert r.dpo.beta == 0.2 and r.dpo.ld_alpha == 0.5 and r.dpo.loss_weights == [1.0, 0.5]
    assert r.dpo.lr_scheduler_type.value == "cosine"
    path.write_text(yaml.safe_dump({"dpo": {"betta": 0.2}}))
    with pytest.raises(RecipeError, match=r"dpo\.betta \(did you mean dpo\.beta"):
        parse_recipe(load_recipe_dict(path))
    path.write_text(yaml.safe_dump({"dpo": {"beta": "high"}}))
    with pytest.raises(RecipeError, match="dpo.beta"):
        parse_recipe(load_recipe_dict(path))


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_training_improves_the_preference(tmp_path, family):
    data = make_dataset(tmp_path / "data")
    summary = run_dpo(recipe(family, dpo_cfg(tmp_path, data, plot=True)))
    logs = summary_logs(tmp_path / "run")
    assert len(logs) == 12
    first, last = logs[:3], logs[-3:]
    mean = lambda hs, k: float(np.mean([h[k] for h in hs]))
    assert mean(last, "loss") < mean(first, "loss") - 0.05
    assert mean(last, "rewards/margins") > mean(first, "rewards/margins") + 0.05
    assert mean(last, "rewards/accuracies") > mean(first, "rewards/accuracies")
    assert mean(last, "rewards/accuracies") >= 0.75
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()
    assert (tmp_path / "run" / "training_curves.png").stat().st_size > 10_000
    assert summary["global_step"] == 12 and summary["loss"]["loss_type"] == ["sigmoid", "sft"]


def summary_logs(run_dir):
    """The per-step training logs the stage saved."""
    return [h for h in json.loads((Path(run_dir) / "log_history.json").read_text()) if "loss" in h]


def test_lora_keeps_one_copy_of_the_base_weights(tmp_path):
    from trl import DPOTrainer

    from stic.dpo import lora_config
    from stic.models import load_model, load_processor

    data = make_dataset(tmp_path / "data", n=4)
    cfg = dpo_cfg(tmp_path, data, max_steps=1)
    mcfg = ModelSpec(name_or_path="tiny:llava", dtype="float32")
    model = load_model(mcfg)
    base_numel = sum(p.numel() for p in model.parameters())
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=load_preference_dataset(cfg),
                         processing_class=load_processor(mcfg), peft_config=lora_config(cfg, model))
    assert trainer.ref_model is None  # the reference is the base with the adapter switched off
    params = dict(trainer.model.named_parameters())
    frozen = sum(p.numel() for n, p in params.items() if "lora_" not in n)
    assert frozen == base_numel  # every base weight exists once, none copied
    assert len({p.data_ptr() for p in params.values()}) == len(params)
    trainable = [n for n, p in params.items() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    base = {n: p.detach().clone() for n, p in params.items() if "lora_" not in n}
    result = trainer.train()
    assert result.global_step == 1 and np.isfinite(result.training_loss)
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(after[n], base[n]) for n in base)  # the base, hence the reference, is untouched
    assert any(after[n].abs().sum() > 0 for n in trainable if "lora_B" in n)  # the adapter (B starts at 0) moved


def test_full_finetune_uses_an_explicit_frozen_reference(tmp_path):
    data = make_dataset(tmp_path / "data", n=4)
    cfg = dpo_cfg(tmp_path, data, use_peft=False, max_steps=2, learning_rate=1e-3, train_projector=True)
    from stic.models import load_model

    before = {n: p.detach().clone() for n, p in load_model(ModelSpec(name_or_path="tiny:llava")).named_parameters()}
    run_dpo(recipe("llava", cfg))
    from transformers import AutoModelForImageTextToText

    after = dict(AutoModelForImageTextToText.from_pretrained(tmp_path / "run").named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert any("language_model" in n for n in changed)
    assert any("multi_modal_projector" in n for n in changed)
    assert not any("vision_tower" in n for n in changed)


# Each family's text model, projector and vision tower, by qualified name
PARTS = {"llava": ("model.language_model", "model.multi_modal_projector", "model.vision_tower"),
         "llava_next": ("model.language_model", "model.multi_modal_projector", "model.vision_tower"),
         "qwen2_5_vl": ("model.language_model", "model.visual.merger", "model.visual"),
         "idefics3": ("model.text_model", "model.connector", "model.vision_model")}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("train_projector", [False, True])
def test_full_finetune_trains_the_text_model_and_head_of_every_family(family, train_projector):
    from stic.dpo import freeze_for_full_finetune
    from stic.models import projector_module
    from stic.tiny import build_tiny_model

    model = build_tiny_model(family)[0]
    text, projector, vision = PARTS[family]
    assert projector_module(model) == projector
    freeze_for_full_finetune(model, train_projector=train_projector)
    for name, p in model.named_parameters():
        if name.startswith((text + ".", "lm_head.")):
            assert p.requires_grad, name
        elif name.startswith(projector + "."):
            assert p.requires_grad == train_projector, name
        else:  # the vision tower (and LLaVA-NeXT's image_newline, as with LoRA)
            assert not p.requires_grad, name
    assert any(n.startswith(vision + ".") for n, _ in model.named_parameters())


def test_train_projector_with_lora_saves_the_projector(tmp_path):
    from safetensors.torch import load_file

    data = make_dataset(tmp_path / "data", n=4)
    run_dpo(recipe("llava", dpo_cfg(tmp_path, data, max_steps=1, train_projector=True)))
    keys = load_file(str(tmp_path / "run" / "adapter_model.safetensors")).keys()
    assert any("multi_modal_projector" in k for k in keys) and any("lora_A" in k for k in keys)


def test_bad_datasets_are_refused_before_training(tmp_path):
    import datasets

    def cfg_for(path):
        return dpo_cfg(tmp_path, path)

    # missing column
    d = tmp_path / "nocol"
    (d / "data").mkdir(parents=True)
    datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": "x"}],
                                 "chosen": [{"role": "assistant", "content": "y"}]}]).to_parquet(
        str(d / "data" / "train-0.parquet"))
    with pytest.raises(DatasetError, match="lacks column rejected"):
        load_preference_dataset(cfg_for(d))
    # empty
    e = tmp_path / "empty.jsonl"
    e.write_text("")
    with pytest.raises(DatasetError, match="empty"):
        load_preference_dataset(cfg_for(e))
    # missing image file, in STIC's released record format
    s = tmp_path / "stic.json"
    photo(0).save(tmp_path / "ok.jpg")
    rec = lambda img: {"image": img, "image_corruption": False, "hallu_prompt": "",
                       "chosen": [{"role": "user", "content": "<image>\nDescribe."},
                                  {"role": "assistant", "content": "A car."}],
                       "rejected": [{"role": "user", "content": "<image>\nDescribe."},
                                    {"role": "assistant", "content": "A boat."}]}
    s.write_text(json.dumps([rec("ok.jpg"), rec("gone.jpg")]))
    with pytest.raises(DatasetError, match="row 1 refers to a missing image file .*gone.jpg"):
        load_preference_dataset(cfg_for(s))
    with pytest.raises(DatasetError, match="does not exist"):
        load_preference_dataset(cfg_for(tmp_path / "nothing-here"))
    # and through the command: a clear message, exit code 2, no traceback
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"model": {"name_or_path": "tiny:llava"},
                                 "dpo": {"dataset": str(s), "output_dir": str(tmp_path / "o"), "report_to": []}}))
    res = subprocess.run([sys.executable, "-m", "stic", "dpo", "--recipe", str(r)], cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 2 and "gone.jpg" in res.stderr and "Traceback" not in res.stderr


def test_stic_released_records_are_read(tmp_path):
    s = tmp_path / "pref.jsonl"
    photo(0).save(tmp_path / "a.jpg")
    s.write_text(json.dumps({"image": "a.jpg", "image_corruption": True, "hallu_prompt": "",
                             "chosen": [{"role": "user", "content": "Describe the scene."},
                                        {"role": "assistant", "content": "A cyclist waits."}],
                             "rejected": [{"role": "user", "content": "Describe the scene."},
                                          {"role": "assistant", "content": "A blurry street."}]}) + "\n")
    ds = load_preference_dataset(dpo_cfg(tmp_path, s))
    row = ds[0]
    assert row["prompt"] == [{"role": "user", "content": "Describe the scene."}]
    assert row["chosen"] == [{"role": "assistant", "content": "A cyclist waits."}]
    assert row["rejected"][0]["content"] == "A blurry street." and row["images"][0].size == (72, 56)


def test_a_list_of_datasets_trains_on_all_their_rows(tmp_path):
    """dpo.dataset as a list (two pair constructions' folders, a released JSONL file): each source is read and
    checked as it is alone, the rows are concatenated, max_samples cuts the whole; a source named twice, even by
    another spelling of its path, and an empty list are refused."""
    from stic.dpo import DatasetError

    a, b = make_dataset(tmp_path / "a", n=3), make_dataset(tmp_path / "b", n=2)
    s = tmp_path / "pref.jsonl"
    photo(0).save(tmp_path / "x.jpg")
    s.write_text(json.dumps({"image": "x.jpg", "chosen": [{"role": "user", "content": "What is it?"},
                                                          {"role": "assistant", "content": "A block."}],
                             "rejected": [{"role": "user", "content": "What is it?"},
                                          {"role": "assistant", "content": "A dog."}]}) + "\n")
    ds = load_preference_dataset(dpo_cfg(tmp_path, a, dataset=[str(a), str(b), str(s)]))
    assert len(ds) == 6 and ds.column_names == ["prompt", "chosen", "rejected", "images"]
    assert [r["chosen"][0]["content"] for r in ds] == [f"a {WORDS[i]} square on the left" for i in (0, 1, 2, 0, 1)] + [
        "A block."]
    assert ds[5]["images"][0].size == (72, 56) and ds[5]["prompt"][0]["content"] == "What is it?"
    # max_samples draws from every source (a seeded shuffle), not the first one's rows alone
    cut = load_preference_dataset(dpo_cfg(tmp_path, a, dataset=[str(a), str(s), str(b)], max_samples=3))
    sizes = [r["images"][0].size for r in cut]
    assert len(cut) == 3 and sizes != [(48, 40)] * 3, sizes  # a's images are 48x40, the JSONL's 72x56
    text_only = tmp_path / "text.jsonl"
    text_only.write_text(json.dumps({"prompt": [{"role": "user", "content": "Hi"}],
                                     "chosen": [{"role": "assistant", "content": "Hello."}],
                                     "rejected": [{"role": "assistant", "content": "Go."}]}) + "\n")
    with pytest.raises(DatasetError, match=r"mixes pairs with images .*a\) and without .*text.jsonl"):
        load_preference_dataset(dpo_cfg(tmp_path, a, dataset=[str(a), str(text_only)]))
    plain = tmp_path / "plain.jsonl"  # answers as plain strings, not conversations
    plain.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello.", "rejected": "Go."}) + "\n")
    with pytest.raises(DatasetError, match=r"plain.jsonl's rows are not shaped as .*text.jsonl's"):
        load_preference_dataset(dpo_cfg(tmp_path, a, dataset=[str(text_only), str(plain)]))
    with pytest.raises(DatasetError, match=r"names .*a/ twice .* trained on twice"):
        load_preference_dataset(dpo_cfg(tmp_path, a, dataset=[str(a), str(b), str(a) + "/"]))
    with pytest.raises(DatasetError, match="empty list"):
        load_preference_dataset(dpo_cfg(tmp_path, a, dataset=[]))
    with pytest.raises(DatasetError, match="missing.* does not exist"):  # each source's own checks still apply
        load_preference_dataset(dpo_cfg(tmp_path, a, dataset=[str(a), str(tmp_path / "missing")]))


def test_resume_continues_at_the_same_step(tmp_path, monkeypatch):
    import trl
    from transformers import TrainerCallback

    data = make_dataset(tmp_path / "data")
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, learning_rate=1e-3, lora_dropout=0.0)
    run_dpo(recipe("llava", dpo_cfg(tmp_path / "a", data, **kw)))  # the uninterrupted reference run

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise KeyboardInterrupt("killed after step 3, checkpoint-2 on disk")

    class KilledTrainer(trl.DPOTrainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.add_callback(Kill())

    with monkeypatch.context() as m:
        m.setattr(trl, "DPOTrainer", KilledTrainer)
        with pytest.raises(KeyboardInterrupt):
            run_dpo(recipe("llava", dpo_cfg(tmp_path / "b", data, **kw)))
    assert (tmp_path / "b" / "run" / "checkpoint-2").is_dir()
    assert not (tmp_path / "b" / "run" / "checkpoint-4").exists()
    summary = run_dpo(recipe("llava", dpo_cfg(tmp_path / "b", data, resume=True, **kw)))
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 4
    steps = [h["step"] for h in summary_logs(tmp_path / "b" / "run")]
    assert steps == [1, 2, 3, 4]  # the history carries on from the checkpoint: no step repeated or skipped
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "run" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k  # same weights as the uninterrupted run


def test_every_training_log_records_the_image_use_margin_of_a_fixed_probe(tmp_path, monkeypatch):
    """log p(answer | image) - log p(answer | blank image) on the probe rows, chosen and rejected, at each log:
    in log_history.json (TensorBoard gets the same record) and as a panel of the curves PNG."""
    import stic.dpo
    from stic.dpo import collate, image_margin

    seen = {}
    real = stic.dpo.build_trainer

    def keep(*a, **k):
        seen["trainer"], dtype = real(*a, **k)
        return seen["trainer"], dtype

    monkeypatch.setattr(stic.dpo, "build_trainer", keep)
    data = make_dataset(tmp_path / "data", n=4)
    run_dpo(recipe("llava", dpo_cfg(tmp_path, data, max_steps=3, image_margin_probe=2, plot=True)))
    logs = summary_logs(tmp_path / "run")
    assert len(logs) == 3 and all({"image_margin/chosen", "image_margin/rejected"} <= set(h) for h in logs)
    trainer = seen["trainer"]
    assert len(trainer.margin_probe) == 2
    margin = image_margin(trainer, trainer.margin_probe, collate(trainer, trainer.margin_probe))  # after step 3
    assert logs[-1]["image_margin/chosen"] == pytest.approx(float(margin[:2].mean()), abs=1e-3)
    assert (tmp_path / "run" / "training_curves.png").exists()
    # 0 turns it off
    data2 = make_dataset(tmp_path / "data2", n=2)
    run_dpo(recipe("llava", dpo_cfg(tmp_path / "off", data2, max_steps=1, image_margin_probe=0)))
    assert not any("image_margin/chosen" in h for h in summary_logs(tmp_path / "off" / "run"))


def test_sft_positive_mode_trains_on_preferred_answers(tmp_path):
    data = make_dataset(tmp_path / "data", n=4)
    summary = run_dpo(recipe("llava", dpo_cfg(tmp_path, data, mode="sft_positive", max_steps=3)))
    assert summary["mode"] == "sft_positive" and summary["global_step"] == 3
    logs = summary_logs(tmp_path / "run")
    assert logs and not any("rewards/margins" in h for h in logs)
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_sft_positive_full_finetune_keeps_the_vision_tower_frozen(tmp_path, monkeypatch):
    import stic.dpo

    seen = {}
    real = stic.dpo._sft_positive_trainer

    def spying(cfg, model, *a, **k):
        seen["trainable"] = [n for n, p in model.named_parameters() if p.requires_grad]
        return real(cfg, model, *a, **k)

    monkeypatch.setattr(stic.dpo, "_sft_positive_trainer", spying)
    data = make_dataset(tmp_path / "data", n=2)
    run_dpo(recipe("llava", dpo_cfg(tmp_path, data, mode="sft_positive", use_peft=False, max_steps=1)))
    assert seen["trainable"] and not any("vision_tower" in n for n in seen["trainable"])


def test_qlora_trains_on_a_gpu_and_is_refused_on_a_cpu(tmp_path):
    """On a CPU the 4-bit recipe stops with a clear error; on a GPU it trains (NF4 base, LoRA adapter)."""
    data = make_dataset(tmp_path / "data", n=8)
    r = Recipe(model=ModelSpec(name_or_path="tiny:llava", load_in_4bit=True),
               dpo=dpo_cfg(tmp_path, data, max_steps=4, activation_checkpointing=True, train_projector=True,
                           mm_projector_lr=1e-3))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):  # ModelSetupError, a RuntimeError
            run_dpo(r)
        return
    summary = run_dpo(r)
    assert summary["global_step"] == 4 and (tmp_path / "run" / "adapter_model.safetensors").exists()
    logs = summary_logs(tmp_path / "run")
    assert logs[-1]["loss"] < logs[0]["loss"]


def test_two_process_run_trains_and_saves_an_adapter(tmp_path):

    data = make_dataset(tmp_path / "data")
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"model": {"name_or_path": "tiny:llava", "dtype": "float32"},
                                 "dpo": {"dataset": str(data), "output_dir": str(tmp_path / "run"), "lora_r": 4,
                                         "lora_alpha": 8, "per_device_train_batch_size": 2, "max_steps": 2,
                                         "report_to": [], "activation_checkpointing": False, "max_length": None,
                                         "save_strategy": "no", "learning_rate": 1e-3, "global_batch_size": 8}}))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes/accelerate/ddp.yaml"), "--num_processes", "2", "--main_process_port",
           str(free_port()), "-m", "stic", "dpo", "--recipe", str(r)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["global_step"] == 2
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()
    assert summary["processes"] == 2
    # global batch 8 = 2 processes x 2 per device x 2 accumulation steps (one process would accumulate 4)
    assert summary["batch"]["processes"] == 2 and summary["batch"]["gradient_accumulation_steps"] == 2
    # DDP over gloo ran, and LoRA on the language model with an image in every row skips the unused search
    assert summary["distributed"] == {"distributed_type": "MULTI_CPU", "processes": 2,
                                      "ddp_find_unused_parameters": False, "find_unused_from": "stic"}


# ---------------------------------------------------------------------------------------------------------
# Multi-process settings: DDP's find_unused_parameters, and FSDP/DeepSpeed refused without GPUs


def model_to_train(family="llava", use_peft=True, train_projector=False, vision=False):
    from peft import get_peft_model

    from stic.dpo import freeze_for_full_finetune
    from stic.models import LoraOptions, load_model, lora_config

    model = load_model(ModelSpec(name_or_path=f"tiny:{family}", dtype="float32"))
    if use_peft:
        model = get_peft_model(model, lora_config(LoraOptions(lora_r=4, train_projector=train_projector), model))
    else:
        freeze_for_full_finetune(model, train_projector)
    for n, p in model.named_parameters():
        p.requires_grad |= vision and ("vision_tower" in n or "vision_model" in n)
    return model


@pytest.mark.parametrize("family", ["llava", "idefics3"])  # idefics3's language model is `text_model`
@pytest.mark.parametrize("setup, text_only_rows, needed", [
    ({}, True, False),  # LoRA on the language model: every trainable weight is used by every row
    ({"use_peft": False}, True, False),  # full fine-tuning, vision tower frozen
    ({"train_projector": True}, False, False),  # the projector, with an image in every row
    ({"train_projector": True}, True, True),  # ... but a text-only row leaves it without a gradient
    ({"use_peft": False, "train_projector": True}, True, True),
    ({"vision": True}, True, True),
    ({"vision": True}, False, False),
])
def test_ddp_searches_for_unused_parameters_only_when_a_row_can_leave_one_unused(family, setup, text_only_rows,
                                                                                 needed):
    from stic.training import find_unused_parameters

    assert find_unused_parameters(model_to_train(family, **setup), text_only_rows) is needed


def test_find_unused_parameters_set_in_the_recipe_wins_and_text_only_rows_are_found(tmp_path):
    import datasets
    from types import SimpleNamespace

    from stic.training import has_text_only_rows, trainer_class

    class Base:  # stands in for TRL's trainer: what Trainer.__init__ would hand the Accelerator
        def __init__(self, model, args):
            self.model, self.args = model, args
            self.accelerator_args = self._build_accelerator_args()

        def _build_accelerator_args(self, **kwargs):
            return {"find_unused_parameters": self.args.ddp_find_unused_parameters}

    model = torch.nn.Module()
    model.multi_modal_projector = torch.nn.Linear(2, 2)  # trainable, outside the language model
    for recipe_value, text_only, expected, source in [(None, True, True, "stic"), (None, False, False, "stic"),
                                                      (False, True, False, "recipe"), (True, False, True, "recipe")]:
        cfg = SimpleNamespace(ddp_find_unused_parameters=recipe_value, train_projector=False)
        args = SimpleNamespace(ddp_find_unused_parameters=True, gradient_checkpointing_kwargs=None)  # TRL's, for a VLM
        trainer = trainer_class(Base, cfg, text_only)(model, args)
        assert trainer.accelerator_args == {"find_unused_parameters": expected}, (recipe_value, text_only)
        assert trainer.find_unused_source == source
    # reentrant activation checkpointing fails with the search: it stays off, as TRL keeps it
    args = SimpleNamespace(ddp_find_unused_parameters=None, gradient_checkpointing_kwargs={"use_reentrant": True})
    cfg = SimpleNamespace(ddp_find_unused_parameters=None, train_projector=False)
    assert trainer_class(Base, cfg, True)(model, args).accelerator_args == {"find_unused_parameters": False}
    with_images = datasets.Dataset.from_list([{"images": [photo(0, (8, 8))]}, {"images": [photo(1, (8, 8))]}])
    mixed = datasets.Dataset.from_list([{"images": [photo(0, (8, 8))]}, {"images": []}])
    assert not has_text_only_rows(with_images.cast_column("images", datasets.List(datasets.Image())))
    assert has_text_only_rows(mixed.cast_column("images", datasets.List(datasets.Image())))
    assert has_text_only_rows(datasets.Dataset.from_list([{"prompt": "x"}]))  # no image column at all


def test_fsdp_or_deepspeed_without_cuda_is_refused_in_one_line_before_loading(tmp_path, monkeypatch, capsys):
    """accelerate runs fsdp.yaml/zero*.yaml with use_cpu as plain DDP: refused rather than silently replaced. The
    command runs in this process, with the environment accelerate sets and no CUDA device."""
    import os

    import torch

    from stic.cli import main

    data = make_dataset(tmp_path / "data", n=2)
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"model": {"name_or_path": "tiny:llava@987", "dtype": "float32"},
                                 "dpo": {"dataset": str(data), "output_dir": str(tmp_path / "o"),
                                         "report_to": []}}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for env, name in [({"ACCELERATE_USE_FSDP": "true"}, "FSDP"),
                      ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "DeepSpeed")]:
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            with pytest.raises(SystemExit) as exit_info:
                main(["dpo", "--recipe", str(r)])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("stic: ")]
        assert exit_info.value.code == 2 and "Traceback" not in err, err[-2000:]
        assert lines == [f"stic: error: {name} needs CUDA GPUs: without them accelerate would run plain DDP over "
                         "gloo instead; launch with recipes/accelerate/ddp.yaml on this machine"]
    assert not list(Path(os.environ["STIC_CACHE"]).rglob("*seed987*"))  # refused before the model was even built


# ---------------------------------------------------------------------------------------------------------
# The paper's alpha, the projector's learning rate, the global batch, the max_length check


def chosen_lengths(n):
    from stic.models import load_processor

    tok = load_processor(ModelSpec(name_or_path="tiny:llava")).tokenizer
    return [len(tok(f"a {WORDS[i % 8]} square on the left", add_special_tokens=False)["input_ids"]) for i in range(n)]


def test_paper_alpha_and_sft_weight_are_exclusive(tmp_path):
    assert DPOStageConfig(output_dir="x", report_to=[]).sft_weight == 1.0  # the default is unchanged
    c = DPOStageConfig(output_dir="x", paper_alpha=1.0, report_to=[])
    assert c.sft_weight is None and c.loss_type == ["sigmoid"]  # the weight waits for the dataset
    with pytest.raises(ValueError, match=r"either paper_alpha \(1.0\) or sft_weight \(0.5\), not both"):
        DPOStageConfig(output_dir="x", paper_alpha=1.0, sft_weight=0.5, report_to=[])
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"dpo": {"paper_alpha": 1.0, "sft_weight": 1.0, "report_to": []}}))
    with pytest.raises(RecipeError, match="either paper_alpha"):
        parse_recipe(load_recipe_dict(path))


def test_paper_alpha_weight_is_measured_on_the_dataset(tmp_path, monkeypatch):
    import trl

    seen = {}

    class Recording(trl.DPOTrainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen["loss_types"], seen["loss_weights"] = list(self.loss_types), list(self.loss_weights)

    monkeypatch.setattr(trl, "DPOTrainer", Recording)
    data = make_dataset(tmp_path / "data", n=6)
    summary = run_dpo(recipe("llava", dpo_cfg(tmp_path, data, max_steps=1, paper_alpha=2.0)))
    mean_len = sum(chosen_lengths(6)) / 6
    weight = 2.0 * mean_len / 1024  # alpha * L / 1024
    assert seen["loss_types"] == ["sigmoid", "sft"] and seen["loss_weights"] == [1.0, pytest.approx(weight)]
    on_disk = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    for s in (summary, on_disk):
        assert s["paper_alpha"]["paper_alpha"] == 2.0
        assert s["paper_alpha"]["mean_chosen_tokens"] == pytest.approx(mean_len, abs=0.01)
        assert s["paper_alpha"]["sft_weight"] == pytest.approx(weight)
        assert s["loss"]["sft_weight"] == pytest.approx(weight) and s["loss"]["paper_alpha"] == 2.0
        assert s["loss"]["paper_alpha_equivalent"] == pytest.approx(2.0, rel=1e-3)


def test_projector_trains_in_its_own_group_at_mm_projector_lr(tmp_path):
    from trl import DPOTrainer

    from stic.dpo import lora_config
    from stic.models import load_model, load_processor
    from stic.training import trainer_class

    data = make_dataset(tmp_path / "data", n=4)
    cfg = dpo_cfg(tmp_path, data, max_steps=1, train_projector=True, mm_projector_lr=3e-2, learning_rate=1e-3,
                  weight_decay=0.1, lr_scheduler_type="constant", warmup_steps=0, lora_dropout=0.0)
    mcfg = ModelSpec(name_or_path="tiny:llava", dtype="float32")
    model = load_model(mcfg)
    trainer = trainer_class(DPOTrainer, cfg)(model=model, args=cfg, train_dataset=load_preference_dataset(cfg),
                                             processing_class=load_processor(mcfg),
                                             peft_config=lora_config(cfg, model))
    named = dict(trainer.model.named_parameters())
    projector = {n for n, p in named.items() if p.requires_grad and "multi_modal_projector" in n}
    lora = {n for n, p in named.items() if p.requires_grad} - projector
    assert projector and all("modules_to_save" in n for n in projector)  # the trainable copy PEFT saves
    assert lora and all("lora_" in n for n in lora)
    optimizer = trainer.create_optimizer()
    name_of = {id(p): n for n, p in named.items()}
    groups = [({name_of[id(p)] for p in g["params"]}, g["lr"], g["weight_decay"])
              for g in optimizer.param_groups if g["params"]]
    projector_groups = [g for g in groups if g[0] & projector]
    other_groups = [g for g in groups if not g[0] & projector]
    # exactly the projector's trainable parameters, at mm_projector_lr, still split by weight decay
    assert set().union(*(g[0] for g in projector_groups)) == projector
    assert all(g[0] <= projector and g[1] == 3e-2 for g in projector_groups)
    assert {g[2] for g in projector_groups} == {0.1, 0.0}  # weights decay, biases do not
    assert all(n.endswith("bias") for g in projector_groups if g[2] == 0.0 for n in g[0])
    # and the LoRA parameters at learning_rate
    assert set().union(*(g[0] for g in other_groups)) == lora and all(g[1] == 1e-3 for g in other_groups)

    before = {n: named[n].detach().clone() for n in projector | lora}
    trainer.train()  # one real step
    moved = {n: (named[n].detach() - before[n]).abs().max().item() for n in before}
    # Adam's first step moves a parameter by about its group's lr
    assert all(moved[n] > 0 for n in projector)
    assert max(moved[n] for n in projector) == pytest.approx(3e-2, rel=0.05)
    assert max(moved[n] for n in lora) == pytest.approx(1e-3, rel=0.05)


def test_global_batch_size_gives_the_same_batch_on_one_and_eight_gpus(tmp_path, monkeypatch):
    from stic.training import TrainingSetupError, apply_global_batch, gradient_accumulation_for

    assert gradient_accumulation_for(8, 1, 1) == 8 and gradient_accumulation_for(8, 1, 8) == 1
    assert gradient_accumulation_for(32, 2, 4) == 4
    with pytest.raises(TrainingSetupError, match=r"global_batch_size 8 is not a multiple of "
                                                 r"per_device_train_batch_size 1 x 16 processes = 16"):
        gradient_accumulation_for(8, 1, 16)
    for world, steps in ((1, 8), (8, 1)):  # the same recipe under WORLD_SIZE 1 and 8
        cfg = DPOStageConfig(output_dir="x", global_batch_size=8, per_device_train_batch_size=1, report_to=[])
        monkeypatch.setenv("WORLD_SIZE", str(world))
        record = apply_global_batch(cfg)
        monkeypatch.delenv("WORLD_SIZE")
        assert cfg.gradient_accumulation_steps == steps
        assert record == {"global_batch_size": 8, "processes": world, "per_device_train_batch_size": 1,
                          "gradient_accumulation_steps": steps, "sequences_per_step": 8}
    cfg = DPOStageConfig(output_dir="x", global_batch_size=8, per_device_train_batch_size=1,
                         gradient_accumulation_steps=2, report_to=[])
    with pytest.raises(TrainingSetupError, match="needs gradient_accumulation_steps 8 on 1 process, but the recipe "
                                                 "sets 2"):
        apply_global_batch(cfg, processes=1)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"dpo": {"global_batch_size": 6, "per_device_train_batch_size": 4,
                                            "report_to": []}}))
    with pytest.raises(RecipeError, match="global_batch_size 6 is not a multiple"):
        parse_recipe(load_recipe_dict(path))
    # a run sets and records it
    data = make_dataset(tmp_path / "data", n=8)
    summary = run_dpo(recipe("llava", dpo_cfg(tmp_path, data, max_steps=1, per_device_train_batch_size=2,
                                              global_batch_size=8)))
    assert summary["batch"] == {"global_batch_size": 8, "processes": 1, "per_device_train_batch_size": 2,
                                "gradient_accumulation_steps": 4, "sequences_per_step": 8}
    assert json.loads((tmp_path / "run" / "run_summary.json").read_text())["batch"] == summary["batch"]


def test_max_length_below_image_prompt_and_answer_is_refused(tmp_path):
    import datasets

    from stic.dpo import preference_sequence_need
    from stic.generation import BatchGenerator, Request
    from stic.models import load_model, load_processor
    from stic.training import TrainingSetupError, check_max_length

    assert DPOStageConfig(output_dir="x", report_to=[]).max_length is None  # not TRL's 1024
    data = make_dataset(tmp_path / "data", n=4)
    mcfg = ModelSpec(name_or_path="tiny:llava", dtype="float32")
    processor = load_processor(mcfg)
    # the numbers as generation sees a prompt, and the longest answer of the data
    ids = BatchGenerator(load_model(mcfg), processor).encode([Request(photo(0, size=(48, 40)), "Describe the image.")])
    ids = ids["input_ids"][0].tolist()
    image = sum(1 for t in ids if t == processor.image_token_id)
    prompt = len(ids) - image
    tok = processor.tokenizer
    answer = max(len(tok(f"two {WORDS[(i + 3) % 8]} dogs running in a park", add_special_tokens=False)["input_ids"])
                 for i in range(4))
    total = image + prompt + answer
    assert image > 0 and prompt > 0
    need = preference_sequence_need(load_preference_dataset(dpo_cfg(tmp_path, data)), processor)
    assert (need["image_tokens"], need["prompt_tokens"], need["answer_tokens"]) == (image, prompt, answer)
    message = (rf"dpo.max_length {total - 1} is below the longest training sequence: {image} image tokens \+ "
               rf"{prompt} prompt tokens \+ {answer} answer tokens \(longest chosen/rejected\) = {total}")
    with pytest.raises(TrainingSetupError, match=message):
        run_dpo(recipe("llava", dpo_cfg(tmp_path, data, max_steps=1, max_length=total - 1)))
    assert not (tmp_path / "run").exists()  # refused before training
    assert check_max_length("dpo", None, need)["total"] == total  # None: no limit, nothing refused
    summary = run_dpo(recipe("llava", dpo_cfg(tmp_path, data, max_steps=1, max_length=total)))
    assert summary["max_length_check"]["total"] == total and summary["max_length_check"]["max_length"] == total
    # selfgen's answer budget, where the dataset records it, is the answer part
    table = datasets.load_dataset("parquet", data_dir=str(data), split="train")
    gen = json.dumps({"chosen": {"max_new_tokens": 300}, "rejected": {"max_new_tokens": 200}})
    table.add_column("generation", [gen] * len(table)).to_parquet(str(data / "data" / "train-0.parquet"))
    ds = load_preference_dataset(dpo_cfg(tmp_path, data), extra_columns=("generation",))
    need = preference_sequence_need(ds, processor)
    assert need["answer_tokens"] == 300 and need["answer_source"] == "selfgen max_new_tokens"
    with pytest.raises(TrainingSetupError,
                       match=rf"\+ 300 answer tokens \(selfgen max_new_tokens\) = {image + prompt + 300}"):
        run_dpo(recipe("llava", dpo_cfg(tmp_path / "b", data, max_steps=1, max_length=image + prompt + 299)))


# ---------------------------------------------------------------------------------------------------------
# mDPO: the chosen answer preferred with its image over a corrupted one (conditional_weight), the reward anchor


def mdpo_trainer(tmp_path, family, n=2, **kw):
    """A tiny fp32 trainer as the stage builds it, its adapter moved off zero so policy and reference differ."""
    from stic.dpo import build_trainer
    from stic.models import load_processor

    data = make_dataset(tmp_path / "data", n=n)
    cfg = dpo_cfg(tmp_path, data, per_device_train_batch_size=n, **kw)
    r = recipe(family, cfg)
    dataset = load_preference_dataset(cfg)
    processor = load_processor(r.model)
    trainer = build_trainer(r, processor, dataset)[0]
    gen = torch.Generator().manual_seed(0)
    for name, p in trainer.model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.05
    return trainer, processor, [dataset[i] for i in range(n)]


def answer_logp(model, processor, example, image) -> torch.Tensor:
    """log p(chosen answer | prompt, image) by hand: the chat template, the processor, the model's own logits and a
    log-softmax, summed over the answer's tokens (no TRL code)."""
    prompt = [{"role": "user", "content": [{"type": "image"},
                                           {"type": "text", "text": example["prompt"][0]["content"]}]}]
    answer = [{"role": "assistant", "content": [{"type": "text", "text": example["chosen"][0]["content"]}]}]
    prompt_text = processor.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full_text = processor.apply_chat_template(prompt + answer, tokenize=False)
    assert full_text.startswith(prompt_text)
    inputs = processor(images=[[image]], text=[prompt_text], add_special_tokens=False, return_tensors="pt")
    answer_ids = processor.tokenizer(full_text[len(prompt_text):], add_special_tokens=False,
                                     return_tensors="pt")["input_ids"]
    start, shape = inputs["input_ids"].size(1), inputs["input_ids"].shape
    for key, value in list(inputs.items()):  # token-aligned inputs grow by the answer
        if value.shape == shape:
            fill = {"input_ids": answer_ids, "attention_mask": torch.ones_like(answer_ids)}.get(
                key, torch.zeros_like(answer_ids))
            inputs[key] = torch.cat([value, fill], dim=1)
    logits = model(**inputs).logits[0].float()
    ids = inputs["input_ids"][0]
    return torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[1:, None])[start - 1:, 0].sum()


def by_hand(trainer, processor, examples, corrupted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(policy, reference) answer log-probs of each example, on its image or its mDPO-corrupted image."""
    from corruptions import corrupt
    from stic.dpo import conditional_seed

    images = [corrupt(e["images"][0], "random_crop", seed=conditional_seed(0, e))[0] if corrupted
              else e["images"][0] for e in examples]
    with torch.no_grad():
        policy = torch.stack([answer_logp(trainer.model, processor, e, im) for e, im in zip(examples, images)])
        with trainer.model.disable_adapter():
            reference = torch.stack([answer_logp(trainer.model, processor, e, im) for e, im in zip(examples, images)])
    return policy, reference


@pytest.mark.parametrize("family", FAMILIES)
def test_conditional_log_probs_equal_a_manual_forward_on_the_corrupted_image(tmp_path, family):
    from stic.dpo import CONDITIONAL, conditional_logps

    trainer, processor, examples = mdpo_trainer(tmp_path, family, conditional_weight=1.0)
    batch = trainer.data_collator([dict(e) for e in examples])  # TRL's batch plus the conditional one
    with torch.no_grad():
        policy, reference = conditional_logps(trainer, trainer.model, batch[CONDITIONAL])
    hand_policy, hand_reference = by_hand(trainer, processor, examples, corrupted=True)
    assert torch.allclose(policy, hand_policy, atol=1e-4), (policy, hand_policy)
    assert torch.allclose(reference, hand_reference, atol=1e-4), (reference, hand_reference)  # adapter disabled
    assert (policy - reference).abs().min() > 1e-3  # the two are different models
    clean_policy, _ = by_hand(trainer, processor, examples, corrupted=False)
    assert (policy - clean_policy).abs().min() > 1e-3  # and the image is the corrupted one


def test_anchor_and_conditional_terms_add_to_trls_loss_as_computed_by_hand(tmp_path):
    from trl import DPOTrainer

    from stic.dpo import CONDITIONAL

    beta, wc, wa = 0.5, 0.7, 0.3
    trainer, processor, examples = mdpo_trainer(tmp_path, "llava", conditional_weight=wc, anchor_weight=wa, beta=beta)
    batch = trainer.data_collator([dict(e) for e in examples])
    total = trainer.compute_loss(trainer.model, batch)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    trl_loss = DPOTrainer.compute_loss(trainer, trainer.model, {k: v for k, v in batch.items() if k != CONDITIONAL})
    clean, clean_ref = by_hand(trainer, processor, examples, corrupted=False)
    corrupted, corrupted_ref = by_hand(trainer, processor, examples, corrupted=True)
    reward, corrupted_reward = beta * (clean - clean_ref), beta * (corrupted - corrupted_ref)
    conditional = -torch.nn.functional.logsigmoid(reward - corrupted_reward).mean()
    anchor = -torch.nn.functional.logsigmoid(reward).mean()
    assert float(total.detach()) == pytest.approx(float(trl_loss + wc * conditional + wa * anchor), abs=1e-4)
    assert (reward - corrupted_reward).abs().min() > 1e-3 and reward.abs().min() > 1e-3  # neither term is trivial
    assert logged["conditional/loss"] == pytest.approx(float(conditional), abs=1e-4)
    assert logged["conditional/margin"] == pytest.approx(float((reward - corrupted_reward).mean()), abs=1e-4)
    assert logged["conditional/logps"] == pytest.approx(float(corrupted.mean()), abs=1e-4)
    assert logged["anchor/loss"] == pytest.approx(float(anchor), abs=1e-4)
    (total - trl_loss).backward()  # the two terms train the adapter
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainer.model.named_parameters()
               if "lora_" in n)


def test_weights_zero_train_with_trls_loss_exactly(tmp_path):
    from trl import DPOTrainer

    from stic.dpo import CONDITIONAL, ConditionalPreferenceMixin

    cfg = DPOStageConfig(output_dir="x", report_to=[])
    assert cfg.conditional_weight == 0 and cfg.anchor_weight == 0  # off by default
    trainer, _, examples = mdpo_trainer(tmp_path, "llava")
    assert not isinstance(trainer, ConditionalPreferenceMixin)
    batch = trainer.data_collator([dict(e) for e in examples])
    assert CONDITIONAL not in batch  # TRL's collator, no extra image
    assert torch.equal(trainer.compute_loss(trainer.model, batch), DPOTrainer.compute_loss(trainer, trainer.model, batch))


def test_conditional_corruption_is_seeded_per_row(tmp_path):
    from stic.dpo import corrupted_copy

    rows = [{"prompt": [{"role": "user", "content": "Describe the image."}],
             "chosen": [{"role": "assistant", "content": f"a {WORDS[i]} square"}],
             "rejected": [{"role": "assistant", "content": "a dog"}], "images": [photo(i, size=(64, 48))]}
            for i in range(3)]
    spec = {"kind": "random_crop"}
    pixels = lambda row, seed=0: np.asarray(corrupted_copy(row, spec, seed)["images"][0])
    first = [pixels(r) for r in rows]
    again = [pixels(r) for r in reversed(rows)][::-1]  # another call, another order: the same images
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], np.asarray(rows[0]["images"][0]))  # corrupted
    twin = {**rows[0], "images": [photo(1, size=(64, 48))]}  # row 0's text with row 1's image: another crop
    assert not np.array_equal(pixels(twin), first[1]) and not np.array_equal(pixels(twin), first[0])
    assert not np.array_equal(pixels(rows[0], seed=1), first[0])  # the run's seed changes it
    assert rows[0]["images"][0].size == (64, 48) and corrupted_copy(rows[0], spec, 0)["chosen"] == rows[0]["chosen"]
    # the keys: checked when the recipe is read
    path = tmp_path / "r.yaml"
    for dpo, message in [({"conditional_weight": -1}, "conditional_weight must be 0 .off. or positive"),
                         ({"conditional_weight": 1, "conditional_corruption": "sepia"},
                          "conditional_corruption: unknown corruption 'sepia'"),
                         ({"conditional_weight": 1, "conditional_corruption": {"kind": "random_crop", "area": 1}},
                          "conditional_corruption: corruption 'random_crop' has no setting area"),
                         ({"anchor_weight": 1, "ld_alpha": 0.5}, "set ld_alpha to null"),
                         ({"anchor_weight": 1, "mode": "sft_positive"}, "no use in mode sft_positive")]:
        path.write_text(yaml.safe_dump({"dpo": {**dpo, "report_to": []}}))
        with pytest.raises(RecipeError, match=message):
            parse_recipe(load_recipe_dict(path))
    path.write_text(yaml.safe_dump({"dpo": {"conditional_weight": 1, "report_to": [],
                                            "conditional_corruption": {"kind": "patch_mask", "ratio": 0.8}}}))
    assert parse_recipe(load_recipe_dict(path)).dpo.conditional_corruption_spec() == {"kind": "patch_mask",
                                                                                      "ratio": 0.8}


def test_run_with_conditional_preference_and_anchor_trains_and_logs_both(tmp_path):
    data = make_dataset(tmp_path / "data", n=4)
    cfg = dpo_cfg(tmp_path, data, max_steps=2, per_device_train_batch_size=1, gradient_accumulation_steps=2,
                  conditional_weight=1.0, anchor_weight=0.5, report_to=["tensorboard"])
    summary = run_dpo(recipe("llava", cfg))
    logs = summary_logs(tmp_path / "run")
    assert summary["global_step"] == 2 and len(logs) == 2
    keys = ("conditional/loss", "conditional/margin", "anchor/loss")
    assert all(np.isfinite(h[k]) for h in logs for k in keys)
    assert summary["conditional_preference"] == {"conditional_weight": 1.0, "anchor_weight": 0.5,
                                                 "conditional_corruption": {"kind": "random_crop"}}
    events = b"".join(p.read_bytes() for p in (tmp_path / "run").rglob("events.out.tfevents*"))
    assert all(k.encode() in events for k in keys)  # in TensorBoard too
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # trained (B starts at 0)
