"""stic/preflight.py: a clean recipe passes on every family, and each fault preflight guards against is caught by
its check (the mutation matrix). Models are stored as hub checkpoints are (bf16, std-0.02 weights)."""

import pytest
import torch

from stic.config import ModelSpec
from stic.dpo import Recipe
from stic.preflight import FAIL, PASS, WARN, preflight_dpo
from stic.tiny import FAMILIES
from tests.conftest import stored_like_the_hub
from tests.test_dpo import dpo_cfg, make_dataset


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("pairs"), n=3)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return lambda family: stored_like_the_hub(root, family, "bfloat16")


def paper_like(hub, pairs, tmp_path, family="llava", **kw):
    """The paper recipes' stage-1 settings on a bf16 checkpoint: LoRA at 1e-7, the projector trained at 2e-5."""
    cfg = dpo_cfg(tmp_path, pairs, train_projector=True, mm_projector_lr=2e-5, learning_rate=1e-7, lora_r=4,
                  lora_alpha=8, **kw)
    return Recipe(model=ModelSpec(name_or_path=str(hub(family)), dtype="bfloat16"), dpo=cfg)


def statuses(checks) -> dict:
    return {c.name: c.status for c in checks}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_clean_recipe_passes_on_every_family(hub, pairs, tmp_path, family):
    checks = preflight_dpo(paper_like(hub, pairs, tmp_path, family))
    got = statuses(checks)
    assert set(got) == {"image_tokens", "model_inputs", "tokens", "parameters", "reference", "image_used", "update"}
    assert all(s in (PASS, WARN) for s in got.values()), [(c.name, c.detail) for c in checks if c.status == FAIL]
    assert got["image_used"] in (PASS, WARN)  # a random model may answer without looking: a warning, not a fault
    assert not (tmp_path / "run").exists()  # nothing written to the stage's output_dir


# ---------------------------------------------------------------------------------------------------------
# Mutations: inject each fault, require the check that guards against it to fail


def _drop_from_batch(key):
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    real = DataCollatorForVisionPreference.torch_call

    def dropping(self, examples):
        batch = real(self, examples)
        batch.pop(key, None)
        return batch

    return DataCollatorForVisionPreference, "torch_call", dropping


def _template_without_eos(monkeypatch):
    import stic.models

    monkeypatch.setattr(stic.models, "trained_chat_template",
                        lambda processor: processor.chat_template)  # llava-1.5's published template: no EOS


def _no_float32_masters(monkeypatch):
    import stic.training

    monkeypatch.setattr(stic.training, "keep_trainable_in_float32", lambda model, select=None: [])


def _after_build(monkeypatch, edit):
    import stic.dpo

    real = stic.dpo.build_trainer

    def building(*a, **k):
        trainer, dtype = real(*a, **k)
        edit(trainer)
        return trainer, dtype

    monkeypatch.setattr(stic.dpo, "build_trainer", building)


def _quantised_projector(trainer):
    class Linear4bit(torch.nn.Linear):  # what bitsandbytes' class is called
        pass

    for module in trainer.model.modules():
        if type(module).__name__ == "Linear" and module.weight.shape == (64, 32):  # projector linear_1 (32 -> 64)
            module.__class__ = Linear4bit


def _pixels_ignored(trainer):
    from peft import PeftModel

    inner = trainer.model.get_base_model() if isinstance(trainer.model, PeftModel) else trainer.model

    def zero_pixels(module, args, kwargs):
        if kwargs.get("pixel_values") is not None:
            kwargs["pixel_values"] = torch.zeros_like(kwargs["pixel_values"])
        return args, kwargs

    inner.register_forward_pre_hook(zero_pixels, with_kwargs=True)


def _reference_differs(trainer):
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)


MUTATIONS = {  # fault: (family, recipe overrides, how to inject it, the check(s) that must fail)
    "image_sizes dropped": ("llava_next", {}, lambda m: m.setattr(*_drop_from_batch("image_sizes")), "model_inputs"),
    "image_grid_thw dropped": ("qwen2_5_vl", {}, lambda m: m.setattr(*_drop_from_batch("image_grid_thw")),
                               "model_inputs"),
    "image tokens truncated": ("llava", {"max_length": 12}, lambda m: None, "image_tokens"),
    "template without EOS": ("llava", {}, _template_without_eos, "tokens"),
    "bf16 projector copy": ("llava", {}, _no_float32_masters, ("parameters", "update")),
    "projector quantised": ("llava", {}, lambda m: _after_build(m, _quantised_projector), "parameters"),
    "forward ignores pixel_values": ("llava", {}, lambda m: _after_build(m, _pixels_ignored), "image_used"),
    "reference differs from the base": ("llava", {}, lambda m: _after_build(m, _reference_differs), "reference"),
}


@pytest.mark.parametrize("fault", list(MUTATIONS))
def test_each_fault_is_caught_by_its_check(hub, pairs, tmp_path, monkeypatch, fault):
    family, overrides, inject, check = MUTATIONS[fault]
    inject(monkeypatch)
    checks = preflight_dpo(paper_like(hub, pairs, tmp_path, family, **overrides))
    failed = {c.name: c for c in checks if c.status == FAIL}
    for name in (check,) if isinstance(check, str) else check:
        assert name in failed, statuses(checks)
        assert failed[name].fix  # names the fix


def test_preflight_command_on_the_default_recipe(pairs, capsys):
    from stic.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["preflight", "--recipe", "recipes/default.yaml", f"dpo.dataset={pairs}"])
    out = capsys.readouterr()
    assert exit_.value.code == 0, out.err[-2000:]
    rows = [line.split()[:2] for line in out.out.splitlines() if line.split()[:1] and line.split()[0] in (
        "image_tokens", "model_inputs", "tokens", "parameters", "reference", "image_used", "update")]
    assert len(rows) == 7 and all(status in ("pass", "warn") for _, status in rows)


def test_preflight_command_names_each_failed_check_and_its_fix_in_one_line(pairs, capsys):
    from stic.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["preflight", "--recipe", "recipes/default.yaml", f"dpo.dataset={pairs}", "dpo.max_length=12"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("stic:")]
    assert exit_.value.code == 2
    assert len(err) == 1 and err[0].startswith("stic: preflight: image_tokens failed: ") and "fix: " in err[0]
