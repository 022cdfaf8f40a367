import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from stic.config import ModelConfig, RecipeError, load_recipe_dict
from stic.dpo import (
    DatasetError,
    DPOStageConfig,
    Recipe,
    load_preference_dataset,
    merge_adapter,
    paper_alpha_to_sft_weight,
    parse_recipe,
    run_dpo,
)
from tests.conftest import photo

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
                report_to=[], gradient_checkpointing=False, max_length=None, seed=0, plot=False, beta=0.5)
    base.update(kw)
    return DPOStageConfig(**base)


def recipe(family, cfg):
    return Recipe(model=ModelConfig(name_or_path=f"tiny:{family}", dtype="float32"), dpo=cfg)


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
    mcfg = ModelConfig(name_or_path="tiny:llava", dtype="float32")
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
    trainer.train()


def test_full_finetune_uses_an_explicit_frozen_reference(tmp_path):
    data = make_dataset(tmp_path / "data", n=4)
    cfg = dpo_cfg(tmp_path, data, use_peft=False, max_steps=2, learning_rate=1e-3, train_projector=True)
    from stic.models import load_model

    before = {n: p.detach().clone() for n, p in load_model(ModelConfig(name_or_path="tiny:llava")).named_parameters()}
    run_dpo(recipe("llava", cfg))
    from transformers import AutoModelForImageTextToText

    after = dict(AutoModelForImageTextToText.from_pretrained(tmp_path / "run").named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert any("language_model" in n for n in changed)
    assert any("multi_modal_projector" in n for n in changed)
    assert not any("vision_tower" in n for n in changed)


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


def test_merged_model_matches_base_plus_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from stic.generation import BatchGenerator, Request
    from stic.models import load_model

    data = make_dataset(tmp_path / "data", n=4)
    run_dpo(recipe("llava", dpo_cfg(tmp_path, data, max_steps=3, learning_rate=2e-2)))
    mcfg = ModelConfig(name_or_path="tiny:llava", dtype="float32")
    merged_dir = merge_adapter(mcfg, str(tmp_path / "run"), str(tmp_path / "merged"))
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
    processor = AutoProcessor.from_pretrained(merged_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with_adapter = PeftModel.from_pretrained(load_model(mcfg), str(tmp_path / "run")).eval()
    base = load_model(mcfg).eval()
    inputs = BatchGenerator(merged, processor).encode([Request(photo(1), "Describe the image.")])
    with torch.no_grad():
        m, a, b = (mod(**inputs).logits for mod in (merged, with_adapter, base))
    assert torch.allclose(m, a, atol=1e-4)
    assert not torch.allclose(m, b, atol=1e-3)  # the adapter really changed the model


def test_sft_positive_mode_trains_on_preferred_answers(tmp_path):
    data = make_dataset(tmp_path / "data", n=4)
    summary = run_dpo(recipe("llava", dpo_cfg(tmp_path, data, mode="sft_positive", max_steps=3)))
    assert summary["mode"] == "sft_positive" and summary["global_step"] == 3
    logs = summary_logs(tmp_path / "run")
    assert logs and not any("rewards/margins" in h for h in logs)
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_qlora_needs_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU error")
    data = make_dataset(tmp_path / "data", n=2)
    r = Recipe(model=ModelConfig(name_or_path="tiny:llava", load_in_4bit=True), dpo=dpo_cfg(tmp_path, data))
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        run_dpo(r)


def test_two_process_run_trains_and_saves_an_adapter(tmp_path):
    from tests.test_selfgen import free_port

    data = make_dataset(tmp_path / "data")
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"model": {"name_or_path": "tiny:llava", "dtype": "float32"},
                                 "dpo": {"dataset": str(data), "output_dir": str(tmp_path / "run"), "lora_r": 4,
                                         "lora_alpha": 8, "per_device_train_batch_size": 2, "max_steps": 2,
                                         "report_to": [], "gradient_checkpointing": False, "max_length": None,
                                         "save_strategy": "no", "learning_rate": 1e-3}}))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes/accelerate/ddp.yaml"), "--num_processes", "2", "--main_process_port",
           str(free_port()), "-m", "stic", "dpo", "--recipe", str(r)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["global_step"] == 2
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()
    assert summary["processes"] == 2
