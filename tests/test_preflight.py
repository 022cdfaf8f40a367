"""stic/preflight.py: a clean recipe passes on every family, and each fault preflight guards against is caught by
its check (the mutation matrix of stic/bench/preflight.py). Models are stored as hub checkpoints are (bf16,
std-0.02 weights), with the paper recipes' stage-1 settings."""

import pytest

from stic.bench.preflight import (CHECKS, FAULTS, GENERATION_CHECKS, GENERATION_FAULTS, generation_row, markdown,
                                  nothing, paper_like_recipe, preference_data, run_fault)
from stic.preflight import FAIL, PASS
from stic.tiny import FAMILIES


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("preflight")


@pytest.mark.parametrize("family, dtype", [(f, "float32") for f in FAMILIES] + [("llava", "bfloat16")])
def test_a_clean_recipe_passes_on_every_family(root, family, dtype):
    got = run_fault(root, family, {"model_dtype": dtype}, nothing)
    assert set(got) == set(CHECKS)
    assert [c for c, status in got.items() if status == FAIL] == []  # image_used may warn: a random model
    assert not (root / "run").exists()  # nothing written to the stage's output_dir


@pytest.mark.parametrize("fault", list(FAULTS))
def test_each_fault_is_caught_by_its_check(root, fault):
    family, overrides, inject, expected = FAULTS[fault]
    got = run_fault(root, family, overrides, inject)
    assert {c for c in expected if got.get(c) == FAIL} == set(expected), got
    row = {"fault": fault, "expected": list(expected), **got}
    assert markdown([row]).rstrip().endswith("| yes |")


def test_preflight_command_on_the_default_recipe(tmp_path, capsys):
    from stic.cli import main

    data = preference_data(tmp_path / "pairs")
    with pytest.raises(SystemExit) as exit_:
        main(["preflight", "--recipe", "recipes/default.yaml", f"dpo.dataset={data}"])
    out = capsys.readouterr()
    assert exit_.value.code == 0, out.err[-2000:]
    rows = [line.split()[1:3] for line in out.out.splitlines() if line.split()[:1] == ["dpo"]]
    assert [name for name, _ in rows] == list(CHECKS) and all(status in ("pass", "warn") for _, status in rows)

    # a fault: one line per failed check, naming the fix; exit 2
    with pytest.raises(SystemExit) as exit_:
        main(["preflight", "--recipe", "recipes/default.yaml", f"dpo.dataset={data}", "dpo.max_length=12"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("stic:")]
    assert exit_.value.code == 2
    assert len(err) == 1 and err[0].startswith("stic: preflight: dpo image_tokens failed: ") and "; fix: " in err[0]


def test_live_bytes_counts_what_ops_allocate_and_free():
    import torch

    from stic.preflight import LiveBytes

    with LiveBytes() as mem:
        a = torch.zeros(1000)  # 4000 bytes
        b = a + 1  # 4000 more: the peak
        view = b[:10]  # a view holds no new storage
        del a
        c = torch.zeros(250, dtype=torch.float64)  # 2000, after a is freed
    assert mem.peak == 8000 and mem.live == 6000 and view.numel() == 10 and c.numel() == 250


@pytest.mark.parametrize("family, checkpointing, dtype", [("llava", False, "float32"),
                                                          ("qwen2_5_vl", True, "bfloat16")])
def test_memory_estimate_is_within_15_percent_of_a_real_step(root, family, checkpointing, dtype):
    """Check 8 measures activations on preflight's longest rows (4 here) and scales them to the recipe's 2 rows
    per device; a real stage-1 step on 2 rows (forward, backward and the first optimizer step, which creates
    Adam's states) peaks within 15% of it."""
    import torch

    from stic.dpo import collate
    from stic.preflight import dpo_setup, memory_estimate, peak_bytes, set_checkpointing
    from stic.tiny import hub_shaped_model

    model_dir = hub_shaped_model(family, "bfloat16", root / "models" / family)
    data = root / "data4"
    if not (data / "data").exists():
        preference_data(data, n=4)
    recipe = paper_like_recipe(model_dir, data, model_dtype=dtype, activation_checkpointing=checkpointing,
                               per_device_train_batch_size=2)
    _, trainer, examples, batch = dpo_setup(recipe, str(root / f"scratch-{family}"), rows=2)
    assert len(examples) == 4
    cpu = torch.device("cpu")
    estimate = memory_estimate(trainer, batch, len(examples), 2, cpu)
    assert estimate["checkpointing"] is checkpointing
    assert estimate["activation_bytes_with_checkpointing"] < estimate["activation_bytes_without_checkpointing"]

    set_checkpointing(trainer.model, checkpointing)
    trainer.model.train()
    optimizer = trainer.create_optimizer()
    step = collate(trainer, examples[:2])
    with peak_bytes(cpu) as got:
        trainer.compute_loss(trainer.model, step).backward()
        optimizer.step()
    measured = estimate["weights_bytes"] + got["peak"]
    assert abs(estimate["estimate_bytes"] / measured - 1) < 0.15, (estimate, measured)


def test_memory_fix_names_the_knob_that_fits():
    from stic.preflight import memory_fix

    numbers = {"checkpointing": False, "per_device_rows": 8, "weights_bytes": 100, "gradient_bytes": 10,
               "optimizer_bytes": 20, "activation_bytes_with_checkpointing": 80,
               "estimate_bytes_with_checkpointing": 190}
    assert memory_fix(numbers, 200, "dpo") == "set dpo.activation_checkpointing: true"
    assert memory_fix(numbers, 150, "dpo").startswith("set dpo.per_device_train_batch_size: 4 ")
    assert "4-bit" in memory_fix(numbers, 115, "dpo")


# ---------------------------------------------------------------------------------------------------------
# The generation stages (selfgen, eval) and stage 2


def _generator(family: str, dtype: str):
    from stic.config import ModelSpec
    from stic.generation import BatchGenerator
    from stic.models import load_model, load_processor

    spec = ModelSpec(name_or_path=f"tiny:{family}", dtype=dtype)
    return BatchGenerator(load_model(spec, "cpu"), load_processor(spec), 8)


def _requests(n: int = 8):
    from PIL import Image

    from stic.generation import Request

    return [Request(Image.new("RGB", (64, 48), (30 * i, 90, 0)), "Describe the image in detail, step by step.")
            for i in range(n)]


@pytest.mark.parametrize("family, dtype, new_tokens", [
    ("llava", "float32", 96),
    # the estimate adds the prefill's peak to the new tokens' cache (an upper bound: Qwen's vision transients are
    # freed before the cache grows); at 256 tokens it is 13% high here
    pytest.param("qwen2_5_vl", "bfloat16", 256, marks=pytest.mark.slow)])
def test_generation_memory_is_within_15_percent_of_real_generation(family, dtype, new_tokens):
    """Weights + the measured prefill + the cache of every new token, against generate forced to its full length."""
    import torch

    from stic.preflight import generation_memory, peak_bytes

    gen, requests = _generator(family, dtype), _requests()
    estimate = generation_memory(gen, requests, new_tokens)
    assert estimate["kv_cache_bytes"] > 0.2 * (estimate["estimate_bytes"] - estimate["weights_bytes"])
    inputs = gen.encode(requests)
    inputs["pixel_values"] = inputs["pixel_values"].to(gen.model.dtype)
    with peak_bytes(torch.device("cpu")) as got:
        gen.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=gen.pad_id)
    measured = estimate["weights_bytes"] + got["peak"]
    assert abs(estimate["estimate_bytes"] / measured - 1) < 0.15, (estimate, measured)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_generation_checks_pass_a_clean_model(family):
    assert set(generation_row(family).values()) == {"pass"}


@pytest.mark.parametrize("fault", list(GENERATION_FAULTS))
def test_each_generation_fault_is_caught_by_its_check(fault):
    family, inject, expected, device_memory = GENERATION_FAULTS[fault]
    got = generation_row(family, inject, device_memory)
    assert {c for c in expected if got.get(c) == FAIL} == set(expected), got
    assert markdown([{"fault": fault, "expected": list(expected), **got}], GENERATION_CHECKS).rstrip().endswith("yes |")


def test_stage2_checks_catch_a_loss_on_the_prompt(tmp_path):
    """infuse-sft on the default recipe before stage 1 exists: a new adapter on the base, the longest rows with the
    longest description; with assistant_only_loss off, the loss covers the prompt and `tokens` fails."""
    import yaml

    from stic.preflight import preflight_stage
    from stic.recipe import parse_recipe

    data = yaml.safe_load(open("recipes/default.yaml"))
    data["infuse_sft"]["stage1_adapter"] = str(tmp_path / "no-stage1-yet")
    recipe = parse_recipe(data, build=("infuse_sft",))
    got = {c.name: c.status for c in preflight_stage(recipe, "infuse-sft")}
    assert got == {"stage1": "warn", "image_tokens": "pass", "model_inputs": "pass", "tokens": "pass",
                   "parameters": "pass", "update": "pass", "memory": "pass"}
    data["infuse_sft"]["assistant_only_loss"] = False
    got = {c.name: c.status for c in preflight_stage(parse_recipe(data, build=("infuse_sft",)), "infuse-sft")}
    assert got["tokens"] == "fail"


def test_preflight_of_selfgen_on_the_default_recipe(capsys):
    """selfgen on the default recipe's sample photos and prompts, as JSON: every check, none failed."""
    import json

    from stic.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["preflight", "--recipe", "recipes/default.yaml", "--stage", "selfgen", "--json"])
    checks = json.loads(capsys.readouterr().out)
    assert exit_.value.code == 0
    assert [c["name"] for c in checks] == ["image_tokens", "model_inputs", "tokens", "image_used", "memory"]
    assert {c["stage"] for c in checks} == {"selfgen"} and all(c["status"] != "fail" for c in checks)
    memory = checks[-1]["numbers"]
    assert memory["sequences"] == 16 and memory["kv_cache_bytes"] > 0  # the recipe's batch of 16 images


def test_preflight_of_every_stage_on_the_default_recipe(tmp_path, capsys):
    """--stage all before any stage has run: stand-in pairs for stage 1, the base for stage 2, the eval fixture."""
    from stic.cli import main
    from stic.eval_fixtures import main as make_fixture

    make_fixture([str(tmp_path / "fixture")])
    with pytest.raises(SystemExit) as exit_:
        main(["preflight", "--recipe", "recipes/default.yaml", "--stage", "all", f"eval.data_root={tmp_path / 'fixture'}",
              f"dpo.dataset={tmp_path / 'no-pairs-yet'}", f"selfgen.output_dir={tmp_path / 'no-pairs-yet'}"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0, out[-3000:]
    stages = {line.split()[0] for line in out.splitlines() if line.split()[:1] and line.split()[0] in
              ("selfgen", "dpo", "infuse-sft", "eval")}
    assert stages == {"selfgen", "dpo", "infuse-sft", "eval"}
    assert "checked on stand-in pairs" in out


def test_preflight_of_stage1_on_a_list_holding_the_unwritten_selfgen_folder(tmp_path, capsys):
    """dpo.dataset as a list with the recipe's selfgen folder not written yet: stand-in pairs take its place, and
    the list's other sources are read as they are."""
    from stic.cli import main
    from tests.test_dpo import make_dataset

    other = make_dataset(tmp_path / "other", n=2)
    pending = tmp_path / "no-pairs-yet"
    with pytest.raises(SystemExit) as exit_:
        main(["preflight", "--recipe", "recipes/default.yaml", "--stage", "dpo", f"selfgen.output_dir={pending}",
              f"dpo.dataset=[{pending}, {other}]"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0, out[-3000:]
    assert f"selfgen has not written {pending} yet: checked on stand-in pairs" in out
    assert not pending.exists()


def test_the_reference_check_passes_a_length_desensitised_loss(root):
    """dpo.ld_alpha (LD-DPO) weighs the reference's tokens past the shorter answer's length inside TRL: the step-0
    comparison must sum both sides alike, or a correct reference fails whenever the two answers differ in length."""
    got = run_fault(root, "llava", {"ld_alpha": 0.5}, nothing)
    assert got["reference"] == PASS, got


def test_preflight_of_selfgen_counts_each_pair_sources_generations_and_the_rounds_constructions(capsys):
    """The memory check sizes the cache for the longest generation the pair source makes: on-policy candidates
    sample with consistency_sampling, self-questions ask with question_sampling. `stic rounds`' further
    constructions (rounds.extra_selfgen) are checked too, each under its own name."""
    import json

    from stic.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["preflight", "--recipe", "recipes/default.yaml", "--stage", "selfgen", "--json",
              "selfgen.pair_source=grounding", "selfgen.consistency_sampling.max_new_tokens=600",
              "selfgen.consistency_sampling.do_sample=true",
              "rounds.extra_selfgen=[{pair_source: self_questions, question_sampling: {max_new_tokens: 700}}]"])
    checks = json.loads(capsys.readouterr().out)
    assert exit_.value.code == 0, checks
    memory = {c["stage"]: c["detail"] for c in checks if c["name"] == "memory"}
    assert set(memory) == {"selfgen", "selfgen-2"}
    assert "x 600 new tokens" in memory["selfgen"] and "x 700 new tokens" in memory["selfgen-2"], memory
    assert all(c["status"] != "fail" for c in checks)
