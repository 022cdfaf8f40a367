"""stic/bench/gpu_check.py: what the GPU check can be held to without a GPU. The real-shaped models have the published
parameter counts, module names and image-token counts (built on the meta device: no memory); the recipes it runs
parse; the card's bandwidth and the decode roofline; which rows a machine skips; the make targets and the wheels'
pins. The whole CPU-runnable path, on shrunk models, is the slow test at the end."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from stic.bench.gpu_check import (FAMILIES, PUBLISHED, GpuCheckError, cli, count_parameters, decode_roofline,
                                  hbm_bandwidth, load_recipe, plan, real_config, real_processor, write_recipe)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def processors():
    return {family: real_processor(family) for family in FAMILIES}


def depth(vision_config) -> int:
    return getattr(vision_config, "depth", None) or vision_config.num_hidden_layers


def meta_model(config):
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


@pytest.mark.parametrize("family, hidden, layers, vocab, vision_depth", [
    ("llava", 4096, 32, 32064, 24), ("llava_next", 4096, 32, 32064, 24), ("qwen2_5_vl", 3584, 28, 152064, 32)])
def test_real_shapes_have_the_published_sizes(processors, family, hidden, layers, vocab, vision_depth):
    config = real_config(family, processors[family].tokenizer)
    text, vision = config.get_text_config(), config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (hidden, layers, vocab)
    assert depth(vision) == vision_depth
    published = PUBLISHED[family][1]
    assert abs(count_parameters(config) - published) / published < 0.005


@pytest.mark.parametrize("family, vision, projector", [
    ("llava", "model.vision_tower", "model.multi_modal_projector"),
    ("llava_next", "model.vision_tower", "model.multi_modal_projector"),
    ("qwen2_5_vl", "model.visual", "model.visual.merger")])
def test_the_families_module_names_as_the_toolkit_finds_them(processors, family, vision, projector):
    from stic.models import language_model_name, projector_module, quantization_skip_patterns

    model = meta_model(real_config(family, processors[family].tokenizer, layers=2))
    assert language_model_name(model) == "model.language_model"
    assert projector_module(model) == projector
    model.get_submodule(vision)
    # QLoRA quantises the language model alone: the vision tower (with the merger inside it), the projector and
    # the head stay in full precision
    skipped = quantization_skip_patterns(model)
    assert vision in skipped and "lm_head" in skipped
    assert projector in skipped or projector.startswith(vision + ".")


@pytest.mark.parametrize("family, size, tokens", [
    ("llava", (336, 336), 576), ("llava", (640, 480), 576),  # (336 / 14)^2 whatever the size: one 336 px crop
    ("llava_next", (560, 560), 2928),  # anyres 672x672: 576 base + 48 x 48 grid + 48 newline tokens
    ("qwen2_5_vl", (336, 336), 144)])  # (336 / 14)^2 patches merged 2 x 2
def test_image_tokens_per_image_at_the_real_sizes(processors, family, size, tokens):
    from stic.generation import conversation

    processor = processors[family]
    image = Image.new("RGB", size)
    text = processor.apply_chat_template(conversation("Describe it.", image), add_generation_prompt=True,
                                         tokenize=False)
    ids = processor(text=[text], images=[[image]], return_tensors="pt")["input_ids"][0].tolist()
    assert ids.count(real_config(family, processor.tokenizer).image_token_id) == tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_and_width_divisor_cut_the_model_but_keep_its_head_size(processors, family):
    tokenizer = processors[family].tokenizer
    full, cut = real_config(family, tokenizer), real_config(family, tokenizer, layers=2, width_divisor=4)
    for a, b in ((full.get_text_config(), cut.get_text_config()), (full.vision_config, cut.vision_config)):
        heads = "num_attention_heads" if hasattr(a, "num_attention_heads") else "num_heads"
        assert a.hidden_size // getattr(a, heads) == b.hidden_size // getattr(b, heads)  # rotary sections fit
        assert getattr(b, heads) == getattr(a, heads) // 4
    assert cut.get_text_config().num_hidden_layers == 2
    assert depth(cut.vision_config) == 2
    assert len(tokenizer) <= cut.get_text_config().vocab_size < full.get_text_config().vocab_size
    model = meta_model(cut)
    assert sum(p.numel() for p in model.parameters()) < count_parameters(full) / 20


@pytest.mark.parametrize("family", FAMILIES)
def test_the_recipes_it_runs_are_the_shipped_ones_pointed_at_the_model(tmp_path, family):
    path = write_recipe(family, tmp_path / "model", tmp_path / "data", tmp_path / "run", tmp_path / "r.yaml",
                        steps=10, qlora=True, cuda=False)
    recipe = load_recipe(str(path))
    assert recipe.model.name_or_path == str(tmp_path / "model") and recipe.model.load_in_4bit
    assert recipe.model.dtype == "auto"  # the stored bf16 on a GPU
    cfg = recipe.dpo
    assert (cfg.max_steps, cfg.gradient_accumulation_steps, cfg.global_batch_size) == (10, 1, None)
    assert (cfg.lora_r, cfg.learning_rate, cfg.train_projector) == (128, 1e-7, True)  # as shipped
    assert cfg.dataset == str(tmp_path / "data") and cfg.output_dir == str(tmp_path / "run")


def test_hbm_bandwidth_by_device_name_and_the_override():
    assert hbm_bandwidth("NVIDIA H200") == 4.8e12
    assert hbm_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert hbm_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert hbm_bandwidth("NVIDIA A100-SXM4-80GB") == 2.039e12
    assert hbm_bandwidth("NVIDIA A100-SXM4-40GB") == 1.555e12
    assert hbm_bandwidth("NVIDIA L4") is None
    assert hbm_bandwidth("NVIDIA L4", override_tbps=0.3) == 0.3e12


def test_decode_roofline():
    # 14 GB of bf16 weights at 4.8 TB/s: one step per 2.9 ms, 343 tokens/s for one sequence
    assert decode_roofline(14e9, 0, 0, 1, 4.8e12) == pytest.approx(342.86, rel=1e-4)
    # 16 sequences each reading a 0.5 MB-per-token KV cache at 700 tokens: 19.6 GB a step
    assert decode_roofline(14e9, 2**19, 700, 16, 4.8e12) == pytest.approx(16 * 4.8e12 / (14e9 + 16 * 2**19 * 700))


def test_which_rows_a_machine_skips():
    cpu = plan(0, have_bitsandbytes=True)
    assert {k for k, v in cpu.items() if v} == {"decode roofline", "stage 1 QLoRA", "FSDP (2 GPUs)"}
    assert set(cpu.values()) == {None, "skipped: no GPU"}
    assert {k: v for k, v in plan(1, True).items() if v} == {"FSDP (2 GPUs)": "skipped: one GPU"}
    assert {k: v for k, v in plan(2, False).items() if v} == {"stage 1 QLoRA": "skipped: bitsandbytes not installed"}


def test_bad_settings_and_missing_packages_are_one_line(monkeypatch, capsys):
    assert cli(["--steps", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "gpu-check: --steps, --images, --batch-size, --max-new-tokens, --width-divisor and --layers must be at least 1"]
    import stic.bench.gpu_check as gpu_check

    monkeypatch.setattr(gpu_check, "versions", lambda: {**dict.fromkeys(("transformers", "peft", "accelerate",
                                                                         "bitsandbytes"), "1"),
                                                       "trl": None, "datasets": None})
    with pytest.raises(GpuCheckError, match="missing Python packages: trl, datasets; .*make gpu-wheels"):
        gpu_check.main([])


def make_n(*args) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    out = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()


def test_make_gpu_check_runs_with_a_bare_machines_python():
    assert make_n("gpu-check", "GPU_PY=python3", "ARGS=--layers 8") == ["python3 -m stic.bench.gpu_check --layers 8"]
    assert make_n("gpu-check")[-1].strip() == ".venv/bin/python -m stic.bench.gpu_check"


def test_gpu_wheels_are_the_pinned_versions_for_the_gpu_machines_python():
    command = " ".join(make_n("gpu-wheels")).replace("\\", " ")
    assert "pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp" in command
    assert "--platform manylinux_2_28_x86_64" in command and " -d .whl " in command
    wheels = dict(re.findall(r"(\S+)==(\S+)", command))
    pins = dict(re.findall(r'^\s*"([\w-]+)==([^"]+)",', (REPO / "pyproject.toml").read_text(), re.M))
    assert {"trl", "datasets", "bitsandbytes", "peft", "transformers"} <= set(wheels)
    assert {name: version for name, version in wheels.items() if name in pins} == {
        name: pins[name] for name in wheels if name in pins}
    assert "torch" not in wheels and "torchvision" not in wheels  # the machine's own, built for its CUDA
    assert ".whl/" in (REPO / ".gitignore").read_text()


@pytest.mark.slow
def test_the_cpu_runnable_path_end_to_end(tmp_path):
    """One family, shrunk to one layer and 1/8 width, through every row a CPU can run (~2 min on 2 cores)."""
    out = tmp_path / "gpu_check.json"
    assert cli(["--families", "llava", "--layers", "1", "--width-divisor", "8", "--steps", "2", "--images", "2",
                "--batch-size", "2", "--max-new-tokens", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    skips = plan(torch.cuda.device_count(), report["versions"]["bitsandbytes"] is not None)
    rows = {r["check"]: r for r in report["rows"]}
    assert list(rows) == list(skips)
    for check, skip in skips.items():
        assert rows[check]["status"] == (skip or rows[check]["status"])
        if not skip:
            assert rows[check]["status"] in ("ok", "pass", "warn"), rows[check]
    assert rows["model"]["numbers"]["layers"] == 1
    assert set(rows["preflight"]["numbers"]["checks"]) >= {"image_tokens", "model_inputs", "tokens", "reference"}
    assert rows["selfgen batched"]["numbers"]["tokens_per_s"] > 0
    assert rows["stage 1 LoRA"]["numbers"]["steps"] == 2
    assert rows["stage 1 LoRA"]["numbers"]["estimate_bytes"] > 0  # preflight's check 8, beside the peak on a GPU
    assert not list((tmp_path / "models").iterdir())  # the model folder is removed afterwards
