"""A stage-1-sized update must survive the precision the adapted model is run and stored in.

Real checkpoints hold bf16 weights of magnitude ~0.02; STIC's stage 1 (LoRA, lr 1e-7) changes them by ~1e-5,
below half a bf16 ulp. The fixture reproduces that scale on a tiny LLaVA: language-model weights drawn at
std 0.02 and stored in bf16, and a LoRA adapter whose weight delta has rms 1e-5.
"""

import json

import pytest
import torch
import yaml

from stic.config import ModelSpec
from stic.generation import BatchGenerator, Request
from stic.models import adapter_survival, load_model, load_processor
from tests.conftest import photo

DELTA_RMS = 1e-5


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    """(bf16 base folder, adapter folder) at real-model weight and update scale."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    from stic.models import LoraOptions, lora_config

    root = tmp_path_factory.mktemp("precision")
    gen = torch.Generator().manual_seed(0)
    model = load_model(ModelSpec(name_or_path="tiny:llava", dtype="float32"))
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "language_model" in name:
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.02)
    model.to(torch.bfloat16).save_pretrained(root / "base")
    load_processor(ModelSpec(name_or_path="tiny:llava")).save_pretrained(root / "base")

    cfg32 = ModelSpec(name_or_path=str(root / "base"), dtype="float32")
    base = load_model(cfg32)
    peft_model = get_peft_model(base, lora_config(LoraOptions(lora_r=8, lora_alpha=16, lora_dropout=0.0), base))
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                module.lora_B["default"].weight.normal_(0, 1, generator=gen)
                delta = module.get_delta_weight("default")
                module.lora_B["default"].weight.mul_(DELTA_RMS / delta.pow(2).mean().sqrt())
    peft_model.save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def logits(model, processor):
    inputs = BatchGenerator(model, processor).encode([Request(photo(1), "Describe the image.")])
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.no_grad():
        return model(**inputs).logits.float()


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
    kept = {dt: adapter_survival(peft_model, dt)["kept"] for dt in (torch.bfloat16, torch.float16, torch.float32)}
    # a delta of rms 1e-5 on bf16-grid weights of std 0.02: about 28% survives bf16, 97% fp16, all of it fp32
    assert 0.2 < kept[torch.bfloat16] < 0.4
    assert 0.95 < kept[torch.float16] < 0.99
    assert kept[torch.float32] == 1.0


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
    from stic.models import load_for_inference as load_for_dar

    base_dir, adapter = realistic
    processor, base32, ref_delta = reference
    cfg16 = ModelSpec(name_or_path=str(base_dir), dtype="bfloat16")
    model, _ = load_for_dar(cfg16, [str(adapter)], "cpu")
    assert update_error(logits(model, processor), base32, ref_delta) < 1e-3
    assert model.dtype == torch.float32  # bf16 would keep ~28%, so the adapted model stays in fp32

    recipe = parse_recipe({"model": {"name_or_path": str(base_dir), "dtype": "bfloat16"},
                           "infuse_sft": {"stage1_adapter": str(adapter), "output_dir": str(tmp_path / "s2")}})
    model, _ = load_stage1_for_inference(recipe, "cpu")
    assert update_error(logits(model, processor), base32, ref_delta) < 1e-3

    # model.merged_dtype forces the precision (here one that erases most of the update)
    forced, _ = load_for_dar(ModelSpec(name_or_path=str(base_dir), dtype="bfloat16", merged_dtype="bfloat16"),
                             [str(adapter)], "cpu")
    assert forced.dtype == torch.bfloat16


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
    assert len(err) == 1 and "survives bfloat16" in err[0] and "--dtype float32" in err[0]
    assert not (tmp_path / "bf16").exists()

    with pytest.raises(SystemExit) as exit_:
        main([*args, "-o", str(tmp_path / "fp32"), "--dtype", "float32"])
    assert exit_.value.code == 0
    report = json.loads((tmp_path / "fp32" / "merge_report.json").read_text())
    assert report["kept"] == 1.0 and 0.2 < report["bfloat16_kept"] < 0.4
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
    # with model.dtype auto the output precision is the checkpoint's own (bf16 here): refused as well
    recipe.write_text(yaml.safe_dump({"model": {"name_or_path": str(base_dir), "dtype": "auto"}}))
    with pytest.raises(SystemExit) as exit_:
        main([*args, "-o", str(tmp_path / "auto")])
    assert exit_.value.code == 2 and "survives bfloat16" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_:
        main([*args, "-o", str(tmp_path / "forced"), "--force"])
    assert exit_.value.code == 0
    report = json.loads((tmp_path / "forced" / "merge_report.json").read_text())
    assert report["dtype"] == "bfloat16" and report["forced"] and report["kept"] < 0.4
