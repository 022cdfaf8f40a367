"""stic/training.py: float32 master weights for every trained parameter, whatever the checkpoint's dtype.

Hub checkpoints are bf16 or fp16. The paper recipes train the projector at 2e-5 and LoRA at 1e-7: steps below
half an ulp of most bf16 weights, so a parameter updated in its stored dtype mostly never moves. These tests
store tiny models as the hub does (`stored_like_the_hub`: std-0.02 weights in bf16/fp16, real module names).
"""

import dataclasses

import pytest
import torch

from stic.config import ModelSpec
from stic.dpo import Recipe, load_preference_dataset, run_dpo
from stic.models import load_model, load_processor, lora_config, projector_module
from stic.tiny import FAMILIES
from stic.training import keep_trainable_in_float32, trainer_class
from tests.conftest import stored_like_the_hub
from tests.test_dpo import dpo_cfg, make_dataset

# the paper recipes' rates (recipes/llava-v1.6-mistral-7b.yaml)
LORA_LR, PROJECTOR_LR = 1e-7, 2e-5


@pytest.fixture(scope="module")
def hub_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return lambda family, dtype: stored_like_the_hub(root, family, dtype)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("pairs"), n=4)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def spy_on_training(monkeypatch) -> dict:
    """Record run_dpo's trainable parameters before and after training (and the reference's dtypes)."""
    import stic.dpo

    seen = {}
    real = stic.dpo.trainer_class

    def spying(cls, cfg, *rest):
        class Spy(real(cls, cfg, *rest)):
            def train(self, *a, **k):
                params = trainable(self.model)
                seen["before"] = {n: p.detach().float().clone() for n, p in params.items()}
                if self.ref_model is not None:
                    seen["ref"] = {p.dtype for p in self.ref_model.parameters()}
                out = super().train(*a, **k)
                seen["after"] = {n: p.detach().clone() for n, p in params.items()}
                return out
        return Spy

    monkeypatch.setattr(stic.dpo, "trainer_class", spying)
    return seen


def share_moved(before: dict, after: dict, names) -> float:
    moved = sum(int((after[n].float() != before[n]).sum()) for n in names)
    return moved / sum(before[n].numel() for n in names)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_stage1_setup_holds_every_trainable_tensor_in_float32(hub_models, pairs, tmp_path, family, dtype):
    from trl import DPOTrainer

    mcfg = ModelSpec(name_or_path=str(hub_models(family, dtype)), dtype=dtype)
    cfg = dpo_cfg(tmp_path, pairs, train_projector=True, mm_projector_lr=PROJECTOR_LR, learning_rate=LORA_LR,
                  lora_r=4, lora_alpha=8)
    model = load_model(mcfg)
    trainer = trainer_class(DPOTrainer, cfg)(model=model, args=cfg, train_dataset=load_preference_dataset(cfg),
                                             processing_class=load_processor(mcfg),
                                             peft_config=lora_config(cfg, model))
    params = trainable(trainer.model)
    projector = [n for n in params if projector_module(model) + "." in n]
    assert projector and any("lora_" in n for n in params)
    assert {n: p.dtype for n, p in params.items() if p.dtype != torch.float32} == {}
    # the frozen base (the reference, with the adapter disabled) keeps the checkpoint's dtype
    assert {p.dtype for p in trainer.model.parameters() if not p.requires_grad} == {getattr(torch, dtype)}
    assert trainer.master_weights["by"] == "stic" and trainer.master_weights["cast_to_float32"] > 0


def test_a_qlora_adapter_that_trl_casts_to_bf16_trains_in_float32(hub_models, pairs, tmp_path):
    """TRL casts the trainable parameters of a 4-bit model to bf16 (QLoRA's recommendation), where a LoRA weight of
    ~0.01 cannot take a step of 1e-7. 4-bit loading needs a GPU; TRL reads `is_loaded_in_4bit`, so the flag on a
    bf16 model shows what it does."""
    from trl import DPOTrainer

    mcfg = ModelSpec(name_or_path=str(hub_models("llava", "bfloat16")), dtype="bfloat16")
    cfg = dpo_cfg(tmp_path, pairs, lora_r=4, lora_alpha=8, learning_rate=LORA_LR)
    dtypes = {}
    for name, cls in (("trl", DPOTrainer), ("stic", trainer_class(DPOTrainer, cfg))):
        model = load_model(mcfg)
        model.is_loaded_in_4bit = True
        trainer = cls(model=model, args=cfg, train_dataset=load_preference_dataset(cfg),
                      processing_class=load_processor(mcfg), peft_config=lora_config(cfg, model))
        dtypes[name] = {p.dtype for p in trainable(trainer.model).values()}
    assert dtypes == {"trl": {torch.bfloat16}, "stic": {torch.float32}}


@pytest.mark.parametrize("dtype,autocast", [("bfloat16", True), ("float16", False)])
def test_stage1_steps_at_the_recipe_rates_move_the_whole_projector(hub_models, pairs, tmp_path, monkeypatch,
                                                                   dtype, autocast):
    """3 steps of run_dpo at the paper's rates: in the stored dtype only ~30% of the projector's elements move."""
    seen = spy_on_training(monkeypatch)
    cfg = dpo_cfg(tmp_path, pairs, max_steps=3, per_device_train_batch_size=2, train_projector=True,
                  mm_projector_lr=PROJECTOR_LR, learning_rate=LORA_LR, lora_dropout=0.0, bf16=autocast,
                  lr_scheduler_type="constant", warmup_steps=0)
    summary = run_dpo(Recipe(model=ModelSpec(name_or_path=str(hub_models("llava", dtype)), dtype=dtype), dpo=cfg))
    projector = [n for n in seen["before"] if "multi_modal_projector" in n and n.endswith("weight")]
    lora_b = [n for n in seen["before"] if "lora_B" in n]
    assert share_moved(seen["before"], seen["after"], projector) >= 0.99
    assert share_moved(seen["before"], seen["after"], lora_b) >= 0.99
    assert summary["precision"]["loaded"] == dtype and summary["precision"]["model_dtype"] == dtype
    assert summary["precision"]["master_weights"]["trainable"].keys() == {"float32"}
    assert summary["precision"]["mixed_precision"] == ("bf16" if autocast else "no")


def test_full_finetune_at_lr_1e7_moves_the_language_model(hub_models, pairs, tmp_path, monkeypatch):
    """A full fine-tune of bf16 weights at lr 1e-7 moved 0.11% of them in 3 steps before master weights."""
    seen = spy_on_training(monkeypatch)
    cfg = dpo_cfg(tmp_path, pairs, max_steps=3, per_device_train_batch_size=2, use_peft=False, learning_rate=1e-7,
                  bf16=True, lr_scheduler_type="constant", warmup_steps=0)
    base = hub_models("llava", "bfloat16")
    run_dpo(Recipe(model=ModelSpec(name_or_path=str(base), dtype="bfloat16"), dpo=cfg))
    linears = [n for n in seen["before"] if ".layers." in n and n.endswith("proj.weight")]
    assert linears and all(seen["after"][n].dtype == torch.float32 for n in seen["after"])
    assert share_moved(seen["before"], seen["after"], linears) >= 0.99
    assert seen["ref"] == {torch.bfloat16}  # the frozen reference stays as stored

    # the saved folder (config.json says bf16: the vision tower's dtype) is evaluated in float32, update and all
    from stic.evaluate import parse_recipe, resolve_model

    model_cfg, _, _ = resolve_model(parse_recipe({"model": {"name_or_path": str(base), "dtype": "bfloat16"}}, "base",
                                                 dar=False), cfg.output_dir)
    assert model_cfg.dtype == "float32"
    trained = dict(load_model(model_cfg).named_parameters())
    assert share_moved(seen["before"], {n: trained[n] for n in linears}, linears) >= 0.99


def test_upcast_modules_compute_with_the_frozen_half_precision_modules_around_them():
    """Without autocast, an upcast module casts its inputs up and its output back to the caller's dtype."""
    lin = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU(), torch.nn.Linear(4, 4)).to(torch.bfloat16)
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    expected = lin.float()(x.float())
    lin.to(torch.bfloat16)
    assert len(keep_trainable_in_float32(lin)) == 4
    out = lin(x)
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), expected, atol=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast the hooks leave the inputs alone
        assert lin(x).dtype == torch.bfloat16

    from transformers.modeling_outputs import BaseModelOutput

    class Returns(torch.nn.Linear):  # a module whose output is a ModelOutput keeps its type
        def forward(self, x):
            return BaseModelOutput(last_hidden_state=super().forward(x))

    wrapped = Returns(4, 4).to(torch.bfloat16)
    keep_trainable_in_float32(wrapped)
    out = wrapped(x)
    assert isinstance(out, BaseModelOutput) and out.last_hidden_state.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_stage2_continues_the_stage1_projector_in_float32(hub_models, tmp_path, dtype):
    """Stage 2's continue mode: the projector stage 1 saved (float32, off the bf16 grid) reloads exactly, every
    trainable tensor is float32, and a few steps at the recipe's rates move all of the projector."""
    from peft import get_peft_model
    from safetensors.torch import load_file
    from trl import SFTTrainer

    from stic.infuse import build_training_set, load_model_for_training
    from stic.instructions import load_instructions
    from stic.models import LoraOptions
    from tests.test_infuse import stage2_cfg

    base = hub_models("llava", dtype)
    stage1 = load_model(ModelSpec(name_or_path=str(base), dtype="float32"))
    peft_model = get_peft_model(stage1, lora_config(LoraOptions(lora_r=4, lora_alpha=8, train_projector=True), stage1))
    with torch.no_grad():  # a stage-1 projector update of ~1e-5, as 3 steps at 2e-5 leave it
        for n, p in peft_model.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.full_like(p, 1e-5))
    peft_model.save_pretrained(tmp_path / "stage1")
    saved = {k: v for k, v in load_file(str(tmp_path / "stage1" / "adapter_model.safetensors")).items()
             if "multi_modal_projector" in k}
    assert saved and all(v.dtype == torch.float32 for v in saved.values())

    data = _mix(tmp_path)
    mcfg = ModelSpec(name_or_path=str(base), dtype=dtype)
    cfg = stage2_cfg(tmp_path, data, tmp_path / "stage1", train_projector=True, mm_projector_lr=PROJECTOR_LR,
                     learning_rate=2e-5, lr_scheduler_type="constant", max_steps=2, lora_dropout=0.0)
    model, _ = load_model_for_training(Recipe(model=mcfg, infuse_sft=cfg))
    records, _ = load_instructions(data)
    ds, _ = build_training_set(records[:4], {f"coco/{i}.jpg": "A block." for i in range(4)}, "{description}\n{instruction}")
    trainer = trainer_class(SFTTrainer, cfg)(model=model, args=cfg, train_dataset=ds,
                                             processing_class=load_processor(mcfg))
    params = trainable(trainer.model)
    assert {n: p.dtype for n, p in params.items() if p.dtype != torch.float32} == {}
    projector = {n: p for n, p in params.items() if "multi_modal_projector" in n}
    for key, value in saved.items():  # reloaded exactly, not rounded to the base's dtype
        name = next(n for n in projector if n.endswith(key.removeprefix("base_model.model.").replace(
            "multi_modal_projector.", "multi_modal_projector.modules_to_save.default.")))
        assert torch.equal(projector[name].detach(), value)
    before = {n: p.detach().clone() for n, p in projector.items()}
    trainer.train()
    weights = [n for n in projector if n.endswith("weight")]
    assert share_moved(before, {n: p.detach() for n, p in projector.items()}, weights) >= 0.99


def _mix(tmp_path):
    import json

    from stic.instructions import InstructionDataConfig
    from tests.conftest import conv, photo

    (tmp_path / "img" / "coco").mkdir(parents=True)
    for i in range(4):
        photo(20 + i, size=(56, 48)).save(tmp_path / "img" / "coco" / f"{i}.jpg")
    records = [{"id": f"r{i}", "image": f"coco/{i}.jpg",
                "conversations": conv(f"<image>\nWhat color is the block {i}?", f"Block {i} is red.")}
               for i in range(4)]
    (tmp_path / "mix.json").write_text(json.dumps(records))
    return InstructionDataConfig(path=str(tmp_path / "mix.json"), image_folder=str(tmp_path / "img"))


# ---------------------------------------------------------------------------------------------------------
# lora_vision: LoRA on the vision encoder (SQ-LLaVA), the encoder's own weights frozen


def vision_parts(model) -> tuple[dict, dict]:
    """({name: vision LoRA tensor}, {name: the vision encoder's own tensor}) of a PEFT model."""
    from stic.models import vision_tower_name

    prefix = vision_tower_name(model) + "."
    named = [(n, p) for n, p in model.named_parameters() if n.startswith(prefix)]
    return {n: p for n, p in named if ".lora_" in n}, {n: p for n, p in named if ".lora_" not in n}


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_lora_trains_in_float32_on_a_frozen_vision_encoder(hub_models, pairs, tmp_path, family):
    """A bf16 hub checkpoint with lora_vision: once the trainer is built every trainable tensor (the vision LoRA
    too) is float32 and preflight's parameters check shows a float32 `vision` group; the encoder's own weights are
    frozen and stay bf16; one step moves every vision B matrix (B starts at 0: each one that moved got a gradient,
    so none is an unused layer that DDP would refuse) and leaves the encoder's own weights as they were."""
    from trl import DPOTrainer

    from stic.preflight import check_parameters

    mcfg = ModelSpec(name_or_path=str(hub_models(family, "bfloat16")), dtype="bfloat16")
    cfg = dpo_cfg(tmp_path, pairs, lora_r=4, lora_alpha=8, lora_vision=True, lora_vision_r=2, lora_vision_alpha=4,
                  max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3, lora_dropout=0.0)
    model = load_model(mcfg)
    trainer = trainer_class(DPOTrainer, cfg)(model=model, args=cfg, train_dataset=load_preference_dataset(cfg),
                                             processing_class=load_processor(mcfg),
                                             peft_config=lora_config(cfg, model))
    lora, own = vision_parts(trainer.model)
    assert lora and all(p.requires_grad and p.dtype == torch.float32 for p in lora.values())
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in own.values())
    assert {p.dtype for p in trainable(trainer.model).values()} == {torch.float32}
    check = check_parameters(trainer)
    assert check.status == "pass", check.detail
    assert set(check.numbers["trainable"]) == {"language_model float32", "vision float32"}
    assert check.numbers["trainable"]["vision float32"] == sum(p.numel() for p in lora.values())

    lora_b = {n: p.detach().clone() for n, p in lora.items() if "lora_B" in n}
    own_before = {n: p.detach().clone() for n, p in own.items()}
    trainer.train()
    assert [n for n in lora_b if torch.equal(lora[n].detach(), lora_b[n])] == []
    assert all(torch.equal(own[n], own_before[n]) for n in own)


def test_vision_lora_run_moves_the_vision_deltas_and_merge_keeps_them(hub_models, pairs, tmp_path, monkeypatch):
    """A step of run_dpo with lora_vision on a bf16 checkpoint moves every element of the vision B matrices; the
    adapter saves them in float32, the survival guard counts them, and `stic merge` (float32) writes the vision
    encoder as base + delta."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from stic.models import merge_adapter, vision_tower_name

    seen = spy_on_training(monkeypatch)
    base = hub_models("llava", "bfloat16")
    cfg = dpo_cfg(tmp_path, pairs, max_steps=1, per_device_train_batch_size=2, lora_r=4, lora_alpha=8,
                  lora_vision=True, lora_vision_r=2, lora_vision_alpha=4, learning_rate=1e-5, lora_dropout=0.0,
                  image_margin_probe=0)
    summary = run_dpo(Recipe(model=ModelSpec(name_or_path=str(base), dtype="bfloat16"), dpo=cfg))
    vision_b = [n for n in seen["before"] if "vision_tower" in n and "lora_B" in n]
    assert vision_b and share_moved(seen["before"], seen["after"], vision_b) == 1.0
    assert summary["vision_lora"] == {"trained": True, "r": 2, "alpha": 4,
                                      "target_modules": "every linear layer of the vision encoder"}
    saved = load_file(f"{cfg.output_dir}/adapter_model.safetensors")
    assert {k for k in saved if "vision_tower" in k and "lora_B" in k} and all(
        v.dtype == torch.float32 for v in saved.values())

    out, report = merge_adapter(ModelSpec(name_or_path=str(base), dtype="bfloat16"), cfg.output_dir,
                                str(tmp_path / "merged"), dtype="float32")
    stage1 = PeftModel.from_pretrained(load_model(ModelSpec(name_or_path=str(base), dtype="float32")), cfg.output_dir)
    prefix = vision_tower_name(stage1) + "."
    expected = {n.removeprefix("base_model.model."): (m.get_base_layer().weight + m.get_delta_weight("default"))
                for n, m in stage1.named_modules() if n.startswith(prefix) and hasattr(m, "lora_A")}
    merged = dict(load_model(ModelSpec(name_or_path=str(out), dtype="float32")).named_modules())
    assert expected and all(torch.allclose(merged[n].weight, w, atol=1e-7, rtol=0) for n, w in expected.items())
    assert any(not torch.equal(m.get_delta_weight("default"), torch.zeros_like(m.get_delta_weight("default")))
               for n, m in stage1.named_modules() if n.startswith(prefix) and hasattr(m, "lora_A"))
    assert report["tensors"] == sum(1 for _, m in stage1.named_modules() if hasattr(m, "lora_A")) > len(expected)


def test_fsdp_without_mixed_precision_is_refused_for_half_precision_weights(hub_models, pairs, tmp_path,
                                                                            monkeypatch):
    """Under FSDP/DeepSpeed the strategy keeps the float32 masters, but only with mixed precision on."""
    from trl import DPOTrainer

    from stic.training import Float32MasterWeightsMixin, MasterWeightsError

    mcfg = ModelSpec(name_or_path=str(hub_models("llava", "bfloat16")), dtype="bfloat16")
    cfg = dpo_cfg(tmp_path, pairs, lora_r=4, lora_alpha=8, train_projector=True)  # a bf16 projector copy trains
    model = load_model(mcfg)
    real_init = DPOTrainer.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        self.is_fsdp_enabled = True

    monkeypatch.setattr(DPOTrainer, "__init__", init)
    with pytest.raises(MasterWeightsError, match="FSDP without mixed precision"):
        trainer_class(DPOTrainer, cfg)(model=model, args=cfg, train_dataset=load_preference_dataset(cfg),
                                       processing_class=load_processor(mcfg), peft_config=lora_config(cfg, model))
    assert issubclass(trainer_class(DPOTrainer, cfg), Float32MasterWeightsMixin)


# ---------------------------------------------------------------------------------------------------------
# model.dtype: auto is the checkpoint's dtype wherever a GPU computes


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_auto_dtype_is_the_checkpoints_own_on_a_gpu_even_for_a_model_loaded_on_the_cpu(hub_models, monkeypatch,
                                                                                        dtype):
    from stic.models import torch_dtype

    cfg = ModelSpec(name_or_path=str(hub_models("llava", dtype)), dtype="auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    # a training stage loads on the CPU for the Trainer to place: it still computes on the GPU
    assert torch_dtype(cfg, torch.device("cpu")) == getattr(torch, dtype)
    assert torch_dtype(cfg, torch.device("cuda", 0)) == getattr(torch, dtype)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100
    assert torch_dtype(cfg, "cuda") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert torch_dtype(cfg, "cpu") == torch.float32  # CPU-only: bf16 matmuls are slow there
    assert torch_dtype(dataclasses.replace(cfg, dtype="bfloat16"), "cpu") == torch.bfloat16
