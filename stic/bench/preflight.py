"""The preflight mutation matrix: inject each fault that `stic preflight` guards against into a clean stage-1 run
and record which checks catch it.

    make preflight-report        # or: python -m stic.bench.preflight [--out DIR]

Each fault runs on a tiny model of the family it concerns, stored as hub checkpoints are (bf16, std-0.02
weights), with the paper recipes' stage-1 settings (LoRA at 1e-7, the projector trained at 2e-5). Prints a
markdown table (fault x check: pass / warn / FAIL, the expected check marked) and writes it with JSON under --out.
tests/test_preflight.py runs the same table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from unittest import mock

import torch

CHECKS = ("image_tokens", "model_inputs", "tokens", "parameters", "reference", "image_used", "update", "memory")


# ---------------------------------------------------------------------------------------------------------
# The faults: each a context manager that injects it while preflight runs


@contextlib.contextmanager
def nothing():
    yield


@contextlib.contextmanager
def drop_from_batch(key: str):
    """The collator loses an input the processor produced (TRL #4071, image_grid_thw; image_sizes likewise)."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    real = DataCollatorForVisionPreference.torch_call

    def dropping(self, examples):
        batch = real(self, examples)
        batch.pop(key, None)
        return batch

    with mock.patch.object(DataCollatorForVisionPreference, "torch_call", dropping):
        yield


@contextlib.contextmanager
def template_without_eos():
    """The published llava-1.5 template, whose assistant turn ends with a space: trained answers never stop."""
    with mock.patch("stic.models.trained_chat_template", lambda processor: processor.chat_template):
        yield


@contextlib.contextmanager
def no_float32_masters():
    """The projector copy (modules_to_save) left in the checkpoint's bf16, as PEFT leaves it."""
    with mock.patch("stic.training.keep_trainable_in_float32", lambda model, select=None: []):
        yield


@contextlib.contextmanager
def after_build(edit):
    """`edit(trainer)` once stage 1 has built its trainer."""
    import stic.dpo

    real = stic.dpo.build_trainer

    def building(*args, **kwargs):
        trainer, dtype = real(*args, **kwargs)
        edit(trainer)
        return trainer, dtype

    with mock.patch.object(stic.dpo, "build_trainer", building):
        yield


def _inner(model):
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def quantise_projector(trainer):
    """The projector's Linear layers become bitsandbytes-named 4-bit layers (bare skip names miss them)."""
    from stic.models import projector_module

    class Linear4bit(torch.nn.Linear):
        pass

    prefix = projector_module(_inner(trainer.model))
    for name, module in _inner(trainer.model).named_modules():
        if name.startswith(prefix) and type(module) is torch.nn.Linear:
            module.__class__ = Linear4bit


def ignore_pixels(trainer):
    """The forward receives pixel_values but never uses them (TRL #2660 fed the wrong rows; here: none)."""
    def zero_pixels(module, args, kwargs):
        if kwargs.get("pixel_values") is not None:
            kwargs["pixel_values"] = torch.zeros_like(kwargs["pixel_values"])
        return args, kwargs

    _inner(trainer.model).register_forward_pre_hook(zero_pixels, with_kwargs=True)


def shift_reference(trainer):
    """The policy no longer starts at the reference (an adapter that is not freshly initialised)."""
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)


def shift_ref_model(trainer):
    """Full fine-tuning whose separate reference is not the model the policy starts from (dpo.ref_model naming
    another checkpoint)."""
    with torch.no_grad():
        for p in trainer.ref_model.parameters():
            p.add_(torch.randn_like(p) * 0.02)


# fault: (family, dpo overrides (model_dtype: the dtype the bf16 checkpoint loads in, default float32, which is
# fast on a CPU), injection, the check(s) that must fail)
FAULTS = {
    "image_sizes dropped": ("llava_next", {}, lambda: drop_from_batch("image_sizes"), ("model_inputs",)),
    "image_grid_thw dropped": ("qwen2_5_vl", {}, lambda: drop_from_batch("image_grid_thw"), ("model_inputs",)),
    "image tokens truncated": ("llava", {"max_length": 12}, nothing, ("image_tokens",)),
    "template without EOS": ("llava", {}, template_without_eos, ("tokens",)),
    "bf16 projector copy": ("llava", {"model_dtype": "bfloat16"}, no_float32_masters, ("parameters", "update")),
    "projector quantised": ("llava", {}, lambda: after_build(quantise_projector), ("parameters",)),
    "forward ignores pixel_values": ("llava", {}, lambda: after_build(ignore_pixels), ("image_used",)),
    "reference differs from the base": ("llava", {}, lambda: after_build(shift_reference), ("reference",)),
    "full fine-tune, ref_model not the base": ("llava", {"use_peft": False}, lambda: after_build(shift_ref_model),
                                               ("reference",)),
    # the run's card (preflight's --device-memory) holds less than a step needs
    "step larger than the device": ("llava", {"device_memory": 8 * 2**20}, nothing, ("memory",)),
}


# ---------------------------------------------------------------------------------------------------------
# The generation stages (selfgen, eval): faults injected into a loaded generator

GENERATION_CHECKS = ("image_tokens", "model_inputs", "tokens", "image_used", "memory")


@contextlib.contextmanager
def eos_not_stopping(gen):
    """generation_config's EOS is not the token the template ends a turn with (answers run to max_new_tokens)."""
    real = gen.eos_ids
    gen.eos_ids = {gen.processor.tokenizer.convert_tokens_to_ids("<unk>")}
    yield
    gen.eos_ids = real


@contextlib.contextmanager
def blind_vision_tower(gen):
    """The vision tower receives zeros: the pixels never reach the model."""
    tower = next(m for name, m in gen.model.named_modules()
                 if name.rsplit(".", 1)[-1] in ("vision_tower", "visual", "vision_model"))
    handle = tower.register_forward_pre_hook(
        lambda m, args, kwargs: ((torch.zeros_like(args[0]),) + tuple(args[1:]) if args else args, kwargs),
        with_kwargs=True)
    yield
    handle.remove()


@contextlib.contextmanager
def generation_drops(gen, key: str):
    """The generation inputs lose one of the processor's outputs (image_sizes: anyres features cannot be unpadded)."""
    real = gen.encode
    gen.encode = lambda requests: {k: v for k, v in real(requests).items() if k != key}
    yield
    gen.encode = real


# fault: (family, injection(gen), the checks that must fail, the device memory preflight compares with)
GENERATION_FAULTS = {
    "image_sizes dropped": ("llava_next", lambda gen: generation_drops(gen, "image_sizes"),
                            ("image_tokens", "model_inputs"), None),
    "EOS is not the turn end": ("llava", eos_not_stopping, ("tokens",), None),
    "pixels never reach the model": ("llava", blind_vision_tower, ("image_used",), None),
    "batch larger than the device": ("llava", lambda gen: nothing(), ("memory",), 2**20),
}


def generation_row(family: str, inject=None, device_memory: int | None = None) -> dict:
    """{check: status} of the generation checks (selfgen's, on a batch of 4 images) with the fault injected."""
    from PIL import Image

    from stic.config import ModelSpec
    from stic.generation import BatchGenerator, Request
    from stic.models import load_model, load_processor
    from stic.preflight import generation_checks

    spec = ModelSpec(name_or_path=f"tiny:{family}")
    gen = BatchGenerator(load_model(spec, "cpu"), load_processor(spec), 4)
    requests = [Request(Image.new("RGB", (64, 48), (40 * i, 90, 0)), "Describe the image in detail.")
                for i in range(4)]
    with (inject(gen) if inject else nothing()):
        checks = generation_checks(gen, requests, 16, 1, "selfgen.batch_size", device_memory)
    return {c.name: c.status for c in checks}


def generation_matrix() -> list[dict]:
    from stic.tiny import FAMILIES

    rows = [{"fault": f"none ({family})", "expected": [], **generation_row(family)} for family in FAMILIES]
    for fault, (family, inject, expected, memory) in GENERATION_FAULTS.items():
        rows.append({"fault": f"{fault} ({family})", "expected": list(expected),
                     **generation_row(family, inject, memory)})
    return rows


# ---------------------------------------------------------------------------------------------------------
# The run


def preference_data(root: Path, n: int = 2) -> Path:
    """A few preference rows in selfgen's format, with images of different sizes."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = [{"prompt": [{"role": "user", "content": "Describe the image."}],
             "chosen": [{"role": "assistant", "content": f"a red square and {i + 1} blue circles on the left"}],
             "rejected": [{"role": "assistant", "content": "two dogs running in a park"}],
             "images": [Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8))]}
            for i in range(n)]
    (root / "data").mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).cast_column("images", datasets.List(datasets.Image())).to_parquet(
        str(root / "data" / "train-0.parquet"))
    return root


def paper_like_recipe(model_dir: Path, data: Path, model_dtype: str = "float32", **overrides):
    """Stage 1 as the paper recipes set it, on a bf16 checkpoint: LoRA at 1e-7, the projector at 2e-5."""
    from stic.config import ModelSpec
    from stic.dpo import DPOStageConfig, Recipe

    cfg = dict(output_dir=str(data.parent / "run"), dataset=str(data), lora_r=4, lora_alpha=8, learning_rate=1e-7,
               train_projector=True, mm_projector_lr=2e-5, per_device_train_batch_size=2, max_length=None,
               report_to=[], activation_checkpointing=False, plot=False, save_strategy="no")
    cfg.update(overrides)
    return Recipe(model=ModelSpec(name_or_path=str(model_dir), dtype=model_dtype), dpo=DPOStageConfig(**cfg))


def run_fault(root: Path, family: str, overrides: dict, inject) -> dict:
    """{check: status} of preflight on `family` with the fault injected."""
    from stic.preflight import preflight_dpo
    from stic.tiny import hub_shaped_model

    model_dir = hub_shaped_model(family, "bfloat16", root / "models" / family)
    data = root / "data"
    if not (data / "data").exists():
        preference_data(data)
    overrides = dict(overrides)
    device_memory = overrides.pop("device_memory", None)
    with inject():
        checks = preflight_dpo(paper_like_recipe(model_dir, data, **overrides), device_memory=device_memory)
    return {c.name: c.status for c in checks}


def matrix(root: Path) -> list[dict]:
    from stic.tiny import FAMILIES

    rows = [{"fault": f"none ({family}, {dtype})", "expected": [],
             **run_fault(root, family, {"model_dtype": dtype}, nothing)}
            for family in FAMILIES for dtype in ("float32", "bfloat16")]
    for fault, (family, overrides, inject, expected) in FAULTS.items():
        rows.append({"fault": f"{fault} ({family})", "expected": list(expected),
                     **run_fault(root, family, overrides, inject)})
    return rows


def markdown(rows: list[dict], checks=CHECKS) -> str:
    head = "| fault | " + " | ".join(checks) + " | caught |\n|---|" + "---|" * (len(checks) + 1) + "\n"
    lines = []
    for r in rows:
        cells = []
        for c in checks:
            status = r.get(c, "–")
            cell = "FAIL" if status == "fail" else status
            cells.append(f"**{cell}**" if c in r["expected"] else cell)
        caught = all(r.get(c) == "fail" for c in r["expected"]) if r["expected"] else not any(
            r.get(c) == "fail" for c in checks)
        lines.append(f"| {r['fault']} | " + " | ".join(cells) + f" | {'yes' if caught else 'NO'} |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/preflight-report")
    args = ap.parse_args(argv)
    rows = matrix(Path(tempfile.mkdtemp(prefix="stic-preflight-report-")))
    generation = generation_matrix()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = ("Stage 1 (dpo)\n\n" + markdown(rows) + "\nThe generation stages (selfgen, eval)\n\n"
             + markdown(generation, GENERATION_CHECKS))
    (out / "matrix.md").write_text(table)
    (out / "matrix.json").write_text(json.dumps({"dpo": rows, "generation": generation}, indent=1) + "\n")
    print(table)
    print(f"written: {out / 'matrix.md'}, {out / 'matrix.json'}")


if __name__ == "__main__":
    main()
