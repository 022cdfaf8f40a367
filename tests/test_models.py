"""stic/models.py: loading, devices and the CPU fallback, LoRA settings, and adapters applied or merged.

The precision tests reproduce a real stage 1's scale on a tiny LLaVA: real checkpoints hold bf16 weights of
magnitude ~0.02; STIC's stage 1 (LoRA, lr 1e-7) changes them by ~1e-5, below half a bf16 ulp. The `realistic`
fixture draws every Linear weight at std 0.02, stores them in bf16, and makes a LoRA adapter whose weight
delta has rms 1e-5.
"""

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
import yaml

from stic.config import ModelSpec
from stic.generation import BatchGenerator, Request
from stic.models import (ModelSetupError, MergeRefused, adapter_survival, load_adapted_model, load_for_inference,
                         load_model, load_processor, merge_adapter, merged_folder_config)
from stic.tiny import FAMILIES
from tests.conftest import make_adapter, photo

TINY = ModelSpec(name_or_path="tiny:llava", dtype="float32")
DELTA_RMS = 1e-5


def logits(model, processor):
    inputs = BatchGenerator(model, processor).encode([Request(photo(1), "Describe the image.")])
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.no_grad():
        return model(**inputs).logits.float()


def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# -------------------------------------------------------------------------------------------------------------
# Devices: CUDA where there is one, the CPU otherwise


def test_4bit_is_refused_without_cuda_before_anything_loads(monkeypatch):
    from stic.models import require_cuda_for_4bit, training_device

    no_cuda(monkeypatch)
    qlora = dataclasses.replace(TINY, load_in_4bit=True)
    with pytest.raises(ModelSetupError, match=r"QLoRA \(model.load_in_4bit: true\) needs a CUDA GPU"):
        require_cuda_for_4bit(qlora)
    with pytest.raises(ModelSetupError, match="needs a CUDA GPU"):
        training_device(qlora)
    with pytest.raises(ModelSetupError, match="load_in_4bit needs a CUDA GPU"):
        load_model(qlora, "cpu")
    require_cuda_for_4bit(TINY)  # no 4-bit: nothing to refuse
    assert training_device(TINY) == "cpu"  # the Trainer places it
    assert isinstance(ModelSetupError("x"), RuntimeError)


def test_without_cuda_training_runs_on_the_cpu_and_keeps_an_explicit_bf16(monkeypatch):
    from stic.models import process_state, train_on_cpu_without_cuda

    no_cuda(monkeypatch)
    args = SimpleNamespace(use_cpu=False, bf16=None)
    train_on_cpu_without_cuda(args)
    assert args.use_cpu is True and args.bf16 is False
    args = SimpleNamespace(use_cpu=False, bf16=True)  # the recipe set it: left alone
    train_on_cpu_without_cuda(args)
    assert args.use_cpu is True and args.bf16 is True
    assert process_state().device.type == "cpu"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = SimpleNamespace(use_cpu=False, bf16=None)
    train_on_cpu_without_cuda(args)
    assert args.use_cpu is False and args.bf16 is None  # with CUDA nothing changes


def test_process_group_timeout_comes_from_the_environment(monkeypatch):
    from datetime import timedelta

    from stic.models import dist_timeout_kwargs

    monkeypatch.delenv("STIC_DIST_TIMEOUT_S", raising=False)
    assert dist_timeout_kwargs() == {}  # torch's default
    monkeypatch.setenv("STIC_DIST_TIMEOUT_S", "5400")
    assert dist_timeout_kwargs() == {"timeout": timedelta(seconds=5400)}
    for bad in ("ten", "0", "-3"):
        monkeypatch.setenv("STIC_DIST_TIMEOUT_S", bad)
        with pytest.raises(ModelSetupError, match=f"STIC_DIST_TIMEOUT_S='{bad}': give a positive number"):
            dist_timeout_kwargs()


STRATEGY_ENV = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "WORLD_SIZE")


@pytest.mark.parametrize("env, args, strategy, on_gpu", [
    ({}, {}, "single", True),
    ({"WORLD_SIZE": "8"}, {}, "ddp", True),
    ({"WORLD_SIZE": "8", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, {},
     "deepspeed", True),
    ({"WORLD_SIZE": "8", "ACCELERATE_USE_FSDP": "true"}, {}, "fsdp", False),
    ({"WORLD_SIZE": "8", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, {},
     "zero3", False),
    ({"WORLD_SIZE": "8", "ACCELERATE_USE_DEEPSPEED": "true"}, {}, "zero3", False),  # stage in a config file
    ({"WORLD_SIZE": "8"}, {"fsdp": ["full_shard"]}, "fsdp", False),  # the recipe's own fsdp key
    ({"WORLD_SIZE": "8"}, {"hf_deepspeed_config": SimpleNamespace(is_zero3=lambda: True)}, "zero3", False),
    ({"WORLD_SIZE": "8"}, {"hf_deepspeed_config": SimpleNamespace(is_zero3=lambda: False)}, "deepspeed", True),
])
def test_a_model_to_train_loads_on_its_gpu_unless_fsdp_or_zero3_shard_it(monkeypatch, env, args, strategy, on_gpu):
    """Host memory: every DDP rank loading a CPU copy first costs a whole model of RAM per process."""
    from stic.models import distributed_strategy, training_device

    for key in STRATEGY_ENV:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    rank_gpu = torch.device("cuda", 3)
    trl_args = SimpleNamespace(**{"device": rank_gpu, "fsdp": [], **args})
    assert distributed_strategy(trl_args) == strategy
    assert training_device(TINY, trl_args) == (rank_gpu if on_gpu else "cpu")
    qlora = dataclasses.replace(TINY, load_in_4bit=True)
    assert training_device(qlora, trl_args) == rank_gpu  # quantised as it loads, whatever the strategy
    no_cuda(monkeypatch)
    assert training_device(TINY, trl_args) == "cpu"


def test_auto_dtype_is_float32_on_the_cpu():
    from stic.models import torch_dtype

    cpu = torch.device("cpu")
    assert torch_dtype(dataclasses.replace(TINY, dtype="auto"), cpu) == torch.float32
    assert torch_dtype(dataclasses.replace(TINY, dtype="bfloat16"), cpu) == torch.bfloat16
    model = load_model(dataclasses.replace(TINY, dtype="bfloat16"))
    assert model.dtype == torch.bfloat16 and not model.training


# -------------------------------------------------------------------------------------------------------------
# LoRA settings


def test_mm_projector_lr_needs_train_projector():
    from stic.dpo import DPOStageConfig
    from stic.models import LoraOptions

    with pytest.raises(ValueError, match="mm_projector_lr is set but train_projector is false"):
        DPOStageConfig(output_dir="x", mm_projector_lr=1e-5, report_to=[])
    with pytest.raises(ValueError, match="mm_projector_lr must be positive"):
        LoraOptions(train_projector=True, mm_projector_lr=0.0)
    assert LoraOptions(train_projector=True, mm_projector_lr=1e-5).mm_projector_lr == 1e-5


def test_lora_targets_the_language_model_only_and_names_what_is_missing():
    from stic.models import LoraOptions, language_model_linear_regex, lora_config, projector_module

    model = load_model(TINY)
    cfg = lora_config(LoraOptions(train_projector=True), model)
    assert cfg.r == 128 and cfg.lora_alpha == 256  # the paper's defaults
    assert cfg.modules_to_save == [projector_module(model)] and projector_module(model).endswith(
        "multi_modal_projector")
    import re

    regex = re.compile(language_model_linear_regex(model))
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    targeted = [n for n in linear if regex.fullmatch(n)]
    assert targeted and all("language_model" in n for n in targeted)
    assert not any(regex.fullmatch(n) for n in linear if "vision_tower" in n or "lm_head" in n)
    assert lora_config(LoraOptions(lora_target_modules=["q_proj"]), model).target_modules == {"q_proj"}

    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ModelSetupError, match="set lora_target_modules"):
        language_model_linear_regex(plain)
    from transformers import LlamaConfig, LlamaModel

    bare = LlamaModel(LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=2, vocab_size=32))  # get_decoder() is the model itself
    with pytest.raises(ModelSetupError, match="cannot find the language model .* set lora_target_modules"):
        language_model_linear_regex(bare)
    with pytest.raises(ModelSetupError, match="no projector module"):
        projector_module(plain)


# Each family's text model, and the modules beside it that must stay out of LoRA and 4-bit (by qualified name)
TEXT_MODEL = {"llava": "model.language_model", "llava_next": "model.language_model",
              "qwen2_5_vl": "model.language_model", "idefics3": "model.text_model"}
NOT_TEXT = {"llava": ("model.vision_tower", "model.multi_modal_projector", "lm_head"),
            "llava_next": ("model.vision_tower", "model.multi_modal_projector", "lm_head"),
            "qwen2_5_vl": ("model.visual", "lm_head"),  # the projector is model.visual.merger
            "idefics3": ("model.vision_model", "model.connector", "lm_head")}


def linears_under(model, prefixes) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and any(n == p or n.startswith(p + ".") for p in prefixes)}


@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_quantises_only_the_language_model(family, monkeypatch):
    """The skip list load_model gives bitsandbytes, run through transformers' own selection
    (`get_modules_to_not_convert`, then `should_convert_module` for each nn.Linear, as `replace_with_bnb_linear`
    does): exactly the text model's linears become 4-bit. Loading in 4-bit itself needs a GPU."""
    from transformers import AutoModelForImageTextToText
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    from stic.tiny import build_tiny_model

    model = build_tiny_model(family)[0]
    seen = {}

    def from_pretrained(path, **kwargs):  # load_model's arguments, without loading anything
        seen.update(kwargs)
        return model

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", from_pretrained)
    load_model(ModelSpec(name_or_path=f"tiny:{family}", dtype="float32", load_in_4bit=True), "cuda")
    skip = seen["quantization_config"].llm_int8_skip_modules
    not_converted = HfQuantizer.get_modules_to_not_convert(model, skip, model._keep_in_fp32_modules)
    converted = {n for n, m in model.named_modules()
                 if type(m) is torch.nn.Linear and should_convert_module(n, not_converted)}
    assert converted and converted == linears_under(model, [TEXT_MODEL[family]])
    assert not converted & linears_under(model, NOT_TEXT[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_default_lora_adapts_exactly_the_language_models_linears(family):
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    from stic.models import LoraOptions, lora_config, projector_module
    from stic.tiny import build_tiny_model

    model = build_tiny_model(family)[0]
    text_linears = linears_under(model, [TEXT_MODEL[family]])
    peft_model = get_peft_model(model, lora_config(LoraOptions(lora_r=4, lora_alpha=8), model))
    adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    assert adapted and adapted == text_linears
    assert not adapted & linears_under(peft_model.base_model.model, NOT_TEXT[family])
    if family == "qwen2_5_vl":
        assert projector_module(model) == "model.visual.merger"


# Each family's vision encoder, and the linears in it that lora_vision leaves alone: a projector inside it
# (Qwen2.5-VL's merger), or the layer after the hidden state LLaVA reads its image features from (-2)
VISION = {"llava": "model.vision_tower", "llava_next": "model.vision_tower", "qwen2_5_vl": "model.visual",
          "idefics3": "model.vision_model"}
VISION_UNUSED = {"llava": ["model.vision_tower.encoder.layers.1"],
                 "llava_next": ["model.vision_tower.encoder.layers.1"],
                 "qwen2_5_vl": ["model.visual.merger"], "idefics3": []}


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_lora_adapts_the_vision_encoders_used_linears_at_their_own_rank(family):
    """lora_vision (SQ-LLaVA): one adapter, the language model at lora_r/lora_alpha as before and every vision linear
    whose output reaches the loss at lora_vision_r/lora_vision_alpha (PEFT's rank_pattern/alpha_pattern)."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    from stic.models import LoraOptions, lora_config
    from stic.tiny import build_tiny_model

    model = build_tiny_model(family)[0]
    text_linears = linears_under(model, [TEXT_MODEL[family]])
    vision_linears = linears_under(model, [VISION[family]]) - linears_under(model, VISION_UNUSED[family])
    options = LoraOptions(lora_r=4, lora_alpha=8, lora_vision=True, lora_vision_r=2, lora_vision_alpha=6)
    peft_model = get_peft_model(model, lora_config(options, model))
    layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    vision = {n for n in layers if n.startswith(VISION[family] + ".")}
    assert vision and vision == vision_linears
    assert set(layers) - vision == text_linears
    assert {(layers[n].r["default"], layers[n].scaling["default"]) for n in vision} == {(2, 3.0)}
    assert {(layers[n].r["default"], layers[n].scaling["default"]) for n in text_linears} == {(4, 2.0)}


def test_vision_lora_target_modules_name_layers_inside_the_vision_encoder():
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    from stic.models import LoraOptions, lora_config
    from stic.tiny import build_tiny_model

    model = build_tiny_model("llava")[0]
    # q_proj is a layer name in the language model and in CLIP: lora_target_modules keeps to the language side
    options = LoraOptions(lora_target_modules=["q_proj"], lora_vision=True, lora_vision_target_modules=["fc1"])
    peft_model = get_peft_model(model, lora_config(options, model))
    adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    assert adapted == {f"model.language_model.layers.{i}.self_attn.q_proj" for i in (0, 1)} | {
        "model.vision_tower.encoder.layers.0.mlp.fc1"}
    with pytest.raises(ModelSetupError, match=r"no layer qkv in the vision encoder .*\(it has: fc1, fc2, k_proj"):
        lora_config(LoraOptions(lora_vision=True, lora_vision_target_modules=["qkv"]), build_tiny_model("llava")[0])
    with pytest.raises(ValueError, match="lora_vision needs use_peft: true"):
        LoraOptions(use_peft=False, lora_vision=True)
    with pytest.raises(ValueError, match="lora_vision_target_modules is set but lora_vision is false"):
        LoraOptions(lora_vision_target_modules=["fc1"])
    with pytest.raises(ValueError, match="lora_vision_r must be at least 1"):
        LoraOptions(lora_vision=True, lora_vision_r=0)


# -------------------------------------------------------------------------------------------------------------
# Adapters at inference and `stic merge`


def test_merged_model_matches_base_plus_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    adapter = make_adapter(tmp_path / "adapter")
    merged_dir, report = merge_adapter(TINY, str(adapter), str(tmp_path / "merged"))
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
    processor = AutoProcessor.from_pretrained(merged_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with_adapter = PeftModel.from_pretrained(load_model(TINY), str(adapter)).eval()
    base = load_model(TINY).eval()
    inputs = BatchGenerator(merged, processor).encode([Request(photo(1), "Describe the image.")])
    with torch.no_grad():
        m, a, b = (mod(**inputs).logits for mod in (merged, with_adapter, base))
    assert torch.allclose(m, a, atol=1e-4)
    assert not torch.allclose(m, b, atol=1e-3)  # the adapter really changed the model


def test_merged_weights_are_base_plus_the_lora_delta(tmp_path):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForImageTextToText

    adapter = make_adapter(tmp_path / "adapter")
    base = dict(load_model(TINY).named_parameters())
    peft_model = PeftModel.from_pretrained(load_model(TINY), str(adapter))
    expected = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
            key = name.removeprefix("base_model.model.") + ".weight"
            expected[key] = base[key] + (B @ A) * module.scaling["default"]
    assert expected

    # a 4-bit recipe merges into full-precision weights (so it works without a GPU)
    out, report = merge_adapter(dataclasses.replace(TINY, load_in_4bit=True), str(adapter), str(tmp_path / "m"))
    merged = dict(AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).named_parameters())
    assert merged.keys() == base.keys()
    for key, weight in merged.items():
        if key in expected:
            assert torch.allclose(weight, expected[key], atol=1e-6), key
            assert not torch.equal(weight, base[key]), key
        else:
            assert torch.equal(weight, base[key]), key  # vision tower, projector, lm_head: untouched
    saved = json.loads((out / "merge_report.json").read_text())
    assert saved["dtype"] == "float32" and saved["error"] < 1e-3 and saved["forced"] is False
    assert saved["tensors"] == len(expected) and saved["adapter"] == str(adapter)
    assert report["error"] < 1e-3
    # the processor is saved as published (the raw template), so the folder is a standard checkpoint
    from transformers import AutoProcessor

    assert AutoProcessor.from_pretrained(out).chat_template == load_processor(TINY, raw=True).chat_template


def test_merge_takes_the_checkpoints_dtype_when_auto_and_refuses_an_unknown_one(tmp_path):
    adapter = make_adapter(tmp_path / "adapter")
    _, report = merge_adapter(dataclasses.replace(TINY, dtype="auto"), str(adapter), str(tmp_path / "auto"))
    assert report["dtype"] == "float32"  # the tiny checkpoint is stored in float32
    with pytest.raises(MergeRefused, match="--dtype int8: choose float32, bfloat16 or float16"):
        merge_adapter(TINY, str(adapter), str(tmp_path / "int8"), dtype="int8")
    assert not (tmp_path / "int8").exists()
    assert isinstance(MergeRefused("x"), RuntimeError)


def test_merged_folder_is_loaded_in_its_stored_precision(tmp_path):
    qlora = ModelSpec(name_or_path="base", dtype="bfloat16", load_in_4bit=True)
    plain = merged_folder_config(qlora, str(tmp_path))  # a folder without a merge report: only the path changes
    assert plain.name_or_path == str(tmp_path) and plain.dtype == "bfloat16" and plain.load_in_4bit
    (tmp_path / "merge_report.json").write_text(json.dumps({"dtype": "float32"}))
    merged = merged_folder_config(qlora, str(tmp_path))
    assert merged.name_or_path == str(tmp_path) and merged.dtype == "float32" and not merged.load_in_4bit


def test_float32_base_drops_4bit_and_flash_attention(monkeypatch):
    import stic.models as models

    seen = []
    monkeypatch.setattr(models, "load_model", lambda cfg, device: seen.append((cfg, device)))
    models._float32_base(ModelSpec(name_or_path="m", dtype="bfloat16", load_in_4bit=True,
                                   attn_implementation="flash_attention_2"), "cpu")
    models._float32_base(ModelSpec(name_or_path="m", attn_implementation="eager"), "cpu")
    (fa2, _), (eager, _) = seen
    assert (fa2.dtype, fa2.load_in_4bit, fa2.attn_implementation) == ("float32", False, "sdpa")
    assert (eager.dtype, eager.attn_implementation) == ("float32", "eager")


def test_load_for_inference_with_an_adapter_gives_the_peft_models_logits(tmp_path):
    from peft import PeftModel

    adapter = make_adapter(tmp_path / "adapter")
    model, processor = load_for_inference(TINY, [str(adapter)], "cpu")
    assert not any("lora" in n for n, _ in model.named_parameters()) and not model.training
    assert processor.chat_template == load_processor(TINY).chat_template  # the trained template
    reference = PeftModel.from_pretrained(load_model(TINY), str(adapter)).eval()
    assert torch.allclose(logits(model, processor), logits(reference, processor), atol=1e-4)
    base, _ = load_for_inference(TINY, [], "cpu")
    assert not torch.allclose(logits(model, processor), logits(base, processor), atol=1e-3)


def test_adapters_merge_in_order_and_the_run_dtype_is_kept_when_the_update_survives(tmp_path):
    from peft import PeftModel

    first = make_adapter(tmp_path / "a1")
    second = make_adapter(tmp_path / "a2", scale=0.05)
    model, precision = load_adapted_model(TINY, [str(first), str(second)], "cpu")
    assert [r["adapter"] for r in precision["adapters"]] == [str(first), str(second)]
    processor = load_processor(TINY)
    stage1 = PeftModel.from_pretrained(load_model(TINY), str(first)).merge_and_unload()
    reference = PeftModel.from_pretrained(stage1, str(second)).eval()
    assert torch.allclose(logits(model, processor), logits(reference, processor), atol=1e-4)
    # an update of this size survives bf16: the adapted model runs in the recipe's bf16
    bf16, precision = load_adapted_model(dataclasses.replace(TINY, dtype="bfloat16"), [str(first)], "cpu")
    assert precision["adapters"][0]["error"] <= 0.03 and bf16.dtype == torch.bfloat16
    assert precision["dtype"] == "bfloat16"


def test_an_adapter_judged_for_the_comparison_leaves_the_base_as_stored(realistic, tmp_path):
    """The base's eval judges stage 1's adapter without applying it; an adapter that trained the projector
    (modules_to_save) must not leave its projector behind."""
    from peft import get_peft_model

    from stic.models import LoraOptions, lora_config

    base_dir, _ = realistic
    cfg32 = ModelSpec(name_or_path=str(base_dir), dtype="float32")
    model = load_model(cfg32)
    peft_model = get_peft_model(model, lora_config(LoraOptions(lora_r=4, lora_alpha=8, train_projector=True), model))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "modules_to_save" in n or "lora_B" in n:
                p.add_(0.01)
    peft_model.save_pretrained(tmp_path / "stage1")
    base = dict(load_model(cfg32).named_parameters())
    cfg16 = ModelSpec(name_or_path=str(base_dir), dtype="bfloat16")
    judged, precision = load_adapted_model(cfg16, [], "cpu", compared_with=[str(tmp_path / "stage1")])
    assert precision["adapters"][0]["applied"] is False and precision["dtype"] == "bfloat16"
    params = dict(judged.named_parameters())
    assert params.keys() == base.keys()
    assert all(torch.equal(params[n].float(), base[n]) for n in base)  # the stored bf16 values, exactly


def test_a_4bit_model_takes_one_adapter(tmp_path):
    qlora = dataclasses.replace(TINY, load_in_4bit=True)
    with pytest.raises(ModelSetupError, match="a 4-bit model takes one adapter"):
        load_adapted_model(qlora, ["a", "b"], "cpu")


# -------------------------------------------------------------------------------------------------------------
# Precision: a stage-1-sized update must survive the precision the adapted model is run and stored in


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    """(bf16 base folder, adapter folder) at real-model weight and update scale."""
    from tests.conftest import stage1_sized_adapter, stored_like_the_hub

    root = tmp_path_factory.mktemp("precision")
    base = stored_like_the_hub(root, "llava", "bfloat16")
    return base, stage1_sized_adapter(base, root / "adapter", delta_rms=DELTA_RMS)


def update_error(path_logits, base_logits, ref_delta) -> float:
    """Relative error of the logit change a path produces against the exact (fp32) change: 0 kept, ~1 lost."""
    return float((path_logits - base_logits - ref_delta).norm() / ref_delta.norm())


@pytest.fixture(scope="module")
def reference(realistic):
    """Exact logits of the base and of base + adapter, both in float32."""
    from peft import PeftModel

    base_dir, adapter = realistic
    cfg32 = ModelSpec(name_or_path=str(base_dir), dtype="float32")
    processor = load_processor(cfg32)
    base = logits(load_model(cfg32), processor)
    adapted = logits(PeftModel.from_pretrained(load_model(cfg32), str(adapter)).merge_and_unload(), processor)
    return processor, base, adapted - base


def test_survival_of_a_stage1_sized_update_per_dtype(realistic):
    from peft import PeftModel

    base_dir, adapter = realistic
    peft_model = PeftModel.from_pretrained(load_model(ModelSpec(name_or_path=str(base_dir), dtype="float32")),
                                           str(adapter))
    error = {dt: adapter_survival(peft_model, dt)["error"] for dt in (torch.bfloat16, torch.float16, torch.float32)}
    # a delta of rms 1e-5 on bf16-grid weights of std 0.02: bf16 rounds it away (about 28% of it would remain,
    # error ~0.9), fp16's finer grid distorts it by ~20%, fp32 keeps it exactly
    assert 0.7 < error[torch.bfloat16] < 1.2
    assert 0.05 < error[torch.float16] < 0.5
    assert error[torch.float32] < 1e-3  # only float32 rounding of the sum


def test_naive_bf16_merge_loses_the_update(realistic, reference):
    """The fault itself: merged into bf16 weights and run in bf16, the update is gone under rounding."""
    from peft import PeftModel

    base_dir, adapter = realistic
    processor, base32, ref_delta = reference
    cfg16 = ModelSpec(name_or_path=str(base_dir), dtype="bfloat16")
    base16 = logits(load_model(cfg16), processor)
    naive = logits(PeftModel.from_pretrained(load_model(cfg16), str(adapter)).merge_and_unload(), processor)
    assert update_error(naive, base16, ref_delta) > 0.5


def test_dar_eval_and_stage2_describe_models_keep_the_update(realistic, reference, tmp_path):
    """The models that eval, DaR and the stage-2 descriptions run, for a recipe in bf16."""
    from stic.infuse import load_stage1_for_inference, parse_recipe

    base_dir, adapter = realistic
    processor, base32, ref_delta = reference
    cfg16 = ModelSpec(name_or_path=str(base_dir), dtype="bfloat16")
    model, _ = load_for_inference(cfg16, [str(adapter)], "cpu")
    assert update_error(logits(model, processor), base32, ref_delta) < 1e-3
    assert model.dtype == torch.float32  # bf16 would keep ~28%, so the adapted model stays in fp32

    recipe = parse_recipe({"model": {"name_or_path": str(base_dir), "dtype": "bfloat16"},
                           "infuse_sft": {"stage1_adapter": str(adapter), "output_dir": str(tmp_path / "s2")}})
    model, _ = load_stage1_for_inference(recipe, "cpu")
    assert update_error(logits(model, processor), base32, ref_delta) < 1e-3

    # model.merged_dtype forces the precision (here one that erases most of the update)
    forced, _ = load_for_inference(ModelSpec(name_or_path=str(base_dir), dtype="bfloat16", merged_dtype="bfloat16"),
                                   [str(adapter)], "cpu")
    assert forced.dtype == torch.bfloat16


def test_merge_refuses_a_dtype_that_erases_the_update(realistic, tmp_path):
    base_dir, adapter = realistic
    cfg16 = ModelSpec(name_or_path=str(base_dir), dtype="bfloat16")
    with pytest.raises(MergeRefused, match=r"bfloat16 would change the adapter's update by \d+% .*limit 3%"):
        merge_adapter(cfg16, str(adapter), str(tmp_path / "bf16"))
    assert not (tmp_path / "bf16").exists()
    with pytest.raises(MergeRefused, match="float16 would change"):  # fp16's rounding distorts it too
        merge_adapter(cfg16, str(adapter), str(tmp_path / "fp16"), dtype="float16")


def test_merge_reports_survival_and_refuses_bf16(realistic, reference, tmp_path, capsys):
    from transformers import AutoModelForImageTextToText

    from stic.cli import main

    base_dir, adapter = realistic
    processor, base32, ref_delta = reference
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name_or_path": str(base_dir), "dtype": "bfloat16"}}))
    args = ["merge", "--recipe", str(recipe), "--adapter", str(adapter)]

    with pytest.raises(SystemExit) as exit_:
        main([*args, "-o", str(tmp_path / "bf16")])
    assert exit_.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("stic:")]
    assert len(err) == 1 and "bfloat16 would change the adapter's update" in err[0] and "--dtype float32" in err[0]
    assert not (tmp_path / "bf16").exists()

    with pytest.raises(SystemExit) as exit_:
        main([*args, "-o", str(tmp_path / "fp32"), "--dtype", "float32"])
    assert exit_.value.code == 0
    report = json.loads((tmp_path / "fp32" / "merge_report.json").read_text())
    assert report["error"] < 1e-3 and report["bfloat16_error"] > 0.7
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "fp32", dtype=torch.float32).eval()
    assert update_error(logits(merged, processor), base32, ref_delta) < 1e-3
    # the merged folder is loaded in its own precision by eval and stage 2, although the recipe says bf16
    from stic.evaluate import parse_recipe as eval_recipe
    from stic.evaluate import resolve_model
    from stic.infuse import parse_recipe, stage1_model_config

    data = {"model": {"name_or_path": str(base_dir), "dtype": "bfloat16"},
            "infuse_sft": {"stage1_model": str(tmp_path / "fp32"), "stage1_adapter": None, "adapter_mode": "new"}}
    assert resolve_model(eval_recipe(data), str(tmp_path / "fp32"))[0].dtype == "float32"
    assert stage1_model_config(parse_recipe(data)).dtype == "float32"
    # and `--model stage2` puts stage 2's adapter on that merged stage-1 model, not on the base
    model, adapters, _ = resolve_model(eval_recipe(data), "stage2")
    assert model.name_or_path == str(tmp_path / "fp32") and model.dtype == "float32"
    assert adapters == [eval_recipe(data).infuse_sft.output_dir]
    # with model.dtype auto the output precision is the checkpoint's own (bf16 here): refused as well
    recipe.write_text(yaml.safe_dump({"model": {"name_or_path": str(base_dir), "dtype": "auto"}}))
    with pytest.raises(SystemExit) as exit_:
        main([*args, "-o", str(tmp_path / "auto")])
    assert exit_.value.code == 2 and "bfloat16 would change" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_:
        main([*args, "-o", str(tmp_path / "forced"), "--force"])
    assert exit_.value.code == 0
    report = json.loads((tmp_path / "forced" / "merge_report.json").read_text())
    assert report["dtype"] == "bfloat16" and report["forced"] and report["error"] > 0.7


def test_merge_falls_back_to_float32_where_the_dtype_would_erase_the_update(realistic, tmp_path):
    """`stic rounds`' merge: the dtype asked for where the update survives it, else float32 instead of a refusal."""
    base_dir, adapter = realistic
    cfg16 = ModelSpec(name_or_path=str(base_dir), dtype="bfloat16")
    out, report = merge_adapter(cfg16, str(adapter), str(tmp_path / "m"), fallback_dtype="float32")
    assert report["dtype"] == "float32" and report["requested_dtype"] == "bfloat16" and report["error"] < 1e-3
    assert json.loads((out / "merge_report.json").read_text())["dtype"] == "float32"
    assert merged_folder_config(cfg16, str(out)).dtype == "float32"  # the next round loads it so
