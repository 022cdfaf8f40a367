import pytest
import torch
import yaml

from stic.config import RecipeError, load_recipe_dict
from stic.selfgen import parse_recipe


def write(tmp_path, data):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_valid_recipe_parses_nested_sections(tmp_path):
    path = write(tmp_path, {"model": {"name_or_path": "x/y", "dtype": "bfloat16"},
                            "selfgen": {"batch_size": 3, "images": {"type": "folder", "path": "/tmp"},
                                        "chosen_sampling": {"max_new_tokens": 9}, "hallucination_prob": 1}})
    recipe = parse_recipe(load_recipe_dict(path))
    assert recipe.model.dtype == "bfloat16"
    assert recipe.selfgen.batch_size == 3
    assert recipe.selfgen.images.type == "folder"
    assert recipe.selfgen.chosen_sampling.max_new_tokens == 9
    assert recipe.selfgen.hallucination_prob == 1.0 and isinstance(recipe.selfgen.hallucination_prob, float)


@pytest.mark.parametrize("data, needle", [
    ({"selfgen": {"batch_sise": 3}}, "selfgen.batch_sise"),
    ({"selfgen": {"images": {"kind": "folder"}}}, "selfgen.images.kind"),
    ({"model": {"dtype": "int4"}}, "model.dtype"),
    ({"selfgen": {"batch_size": "8"}}, "selfgen.batch_size"),
    ({"selfgen": {"batch_size": 2.5}}, "selfgen.batch_size"),
    ({"selfgen": {"drop_truncated_chosen": "yes"}}, "selfgen.drop_truncated_chosen"),
    ({"selfgen": {"corruptions": "color_jitter"}}, "selfgen.corruptions"),
    ({"selfgen": {"chosen_sampling": {"max_new_tokens": None}}}, "selfgen.chosen_sampling.max_new_tokens"),
    ({"selfgen": {"hallucination_prob": 1.5}}, "hallucination_prob"),
    ({"selfgen": {"images": {"type": "folder"}}}, "images.path"),
    ({"selfgn": {}}, "selfgn"),
])
def test_bad_recipe_names_the_key(tmp_path, data, needle):
    with pytest.raises(RecipeError) as err:
        parse_recipe(load_recipe_dict(write(tmp_path, data)))
    assert needle in str(err.value)


def test_overrides_are_typed_and_default_to_the_stage_section(tmp_path):
    path = write(tmp_path, {"selfgen": {"batch_size": 3}})
    data = load_recipe_dict(path, ["batch_size=5", "model.dtype=float32", "selfgen.images.limit=2",
                                   "--selfgen.corruptions=[jpeg]"], default_section="selfgen")
    recipe = parse_recipe(data)
    assert recipe.selfgen.batch_size == 5
    assert recipe.model.dtype == "float32"
    assert recipe.selfgen.images.limit == 2
    assert recipe.selfgen.corruptions == ["jpeg"]
    with pytest.raises(RecipeError, match="selfgen.batch_size"):
        parse_recipe(load_recipe_dict(path, ["batch_size=lots"], default_section="selfgen"))
    with pytest.raises(RecipeError, match="section.key=value"):
        load_recipe_dict(path, ["batch_size"], default_section="selfgen")


def test_bad_corruption_settings_are_refused_before_work(tmp_path):
    from stic.selfgen import _corruption_specs

    with pytest.raises(RecipeError, match=r"corruptions\[1\].*no setting"):
        _corruption_specs(["jpeg", {"kind": "color_jitter", "brightnes": 0.2}])
    with pytest.raises(RecipeError, match="unknown corruption"):
        _corruption_specs(["sepia"])


def test_shipped_recipes_parse():
    from pathlib import Path

    recipes = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))
    assert recipes
    from stic import dpo, evaluate, infuse

    for path in recipes:
        recipe = parse_recipe(load_recipe_dict(path))
        assert recipe.model.name_or_path
        stage1 = dpo.parse_recipe(load_recipe_dict(path)).dpo
        stage2 = infuse.parse_recipe(load_recipe_dict(path)).infuse_sft
        # the paper's beta, except ShapesWorld's 0.5 (the fix for its fragment collapse, see the recipe)
        assert stage1.beta == (0.5 if path.name == "shapesworld.yaml" else 0.1)
        paper_model = recipe.model.name_or_path.startswith(("llava-hf/", "Qwen/"))
        if paper_model:  # the paper's public scripts: generate_pref.py, dpo_finetune.sh, finetune_lora.sh
            for sampling in (recipe.selfgen.chosen_sampling, recipe.selfgen.rejected_sampling):
                assert (sampling.max_new_tokens, sampling.do_sample, sampling.temperature, sampling.top_p) == \
                    (1024, True, 0.2, 1.0)
            assert recipe.selfgen.drop_truncated_chosen
            assert stage1.learning_rate == 1e-7 and stage1.lora_r == 128 and stage1.lora_alpha == 256
            # alpha as the paper's code applies it; the sft weight is measured on the data at run time
            assert stage1.paper_alpha == 1.0 and stage1.sft_weight is None and stage1.loss_type == ["sigmoid"]
            assert stage1.train_projector and stage1.mm_projector_lr == 2e-5 and stage1.global_batch_size == 8
            assert stage2.learning_rate == 2e-5 and stage2.global_batch_size == 32
            assert stage2.train_projector and stage2.mm_projector_lr == 2e-5
        else:
            assert stage1.loss_type == ["sigmoid", "sft"] and stage1.paper_alpha is None
        assert stage1.max_length is None and stage2.max_length is None  # never cut image tokens
        assert stage2.stage1_adapter == stage1.output_dir and stage2.num_train_epochs == 1
        assert stage2.assistant_only_loss and "{description}" in stage2.template
        benchmarks = evaluate.parse_recipe(load_recipe_dict(path)).eval.benchmarks
        expected = 8 if paper_model or "tiny:" in recipe.model.name_or_path else 2  # ShapesWorld: its own two
        assert len(benchmarks) == expected


def test_each_stage_reads_the_previous_stage_output_by_default():
    from stic.recipe import parse_recipe as parse_all

    recipe = parse_all({"selfgen": {"output_dir": "runs/a/selfgen"}, "dpo": {"output_dir": "runs/a/dpo"}})
    assert recipe.dpo.dataset == "runs/a/selfgen"
    assert recipe.infuse_sft.stage1_adapter == "runs/a/dpo"
    # an explicit value wins, also an explicit null (no stage-1 adapter)
    recipe = parse_all({"selfgen": {"output_dir": "runs/a/selfgen"}, "dpo": {"dataset": "hub/pairs"},
                        "infuse_sft": {"stage1_adapter": "runs/b/dpo"}})
    assert recipe.dpo.dataset == "hub/pairs" and recipe.infuse_sft.stage1_adapter == "runs/b/dpo"
    recipe = parse_all({"infuse_sft": {"stage1_adapter": None, "stage1_model": "m", "adapter_mode": "new"}})
    assert recipe.infuse_sft.stage1_adapter is None
    # a merged stage-1 model holds its adapter: no default adapter next to it
    assert parse_all({"infuse_sft": {"stage1_model": "m", "adapter_mode": "new"}}).infuse_sft.stage1_adapter is None


def test_a_command_builds_only_the_sections_it_uses_and_checks_the_rest():
    """Building a TRL section runs TrainingArguments' setup: hardware checks (tf32 needs an Ampere GPU), accelerate's
    process state, global tf32/DeepSpeed settings. Selfgen and eval of the base must not depend on the training
    sections' hardware settings, yet still refuse their unknown keys and wrong types."""
    from stic import dpo, evaluate, infuse, selfgen
    from stic.recipe import Recipe
    from stic.recipe import parse_recipe as parse_all

    gpu_tuned = {"dpo": {"tf32": True}, "infuse_sft": {"tf32": True}}
    if not torch.cuda.is_available():
        with pytest.raises(RecipeError, match="tf32"):
            parse_all(gpu_tuned)
    recipe = selfgen.parse_recipe(gpu_tuned)
    assert isinstance(recipe, Recipe) and recipe.selfgen.output_dir and recipe.dpo is None and recipe.infuse_sft is None
    recipe = evaluate.parse_recipe(gpu_tuned, "base", dar=False)
    assert recipe.eval is not None and recipe.dpo is None and recipe.infuse_sft is None
    assert evaluate.parse_recipe({}, "stage1", dar=False).dpo.output_dir == "outputs/dpo"
    assert evaluate.parse_recipe({}, "base", dar=True).infuse_sft.describe is not None  # DaR prompts as stage 2
    assert dpo.parse_recipe({}).selfgen is None and infuse.parse_recipe({}).dpo is None
    # the sections a command does not build are still checked
    with pytest.raises(RecipeError, match=r"dpo\.learning_rat .*did you mean dpo\.learning_rate"):
        selfgen.parse_recipe({"dpo": {"learning_rat": 1e-6}})
    with pytest.raises(RecipeError, match=r"infuse_sft\.beta|infuse_sft\.learning_rate: expected a number"):
        selfgen.parse_recipe({"infuse_sft": {"learning_rate": "fast"}})
    # the chained default comes from the unbuilt section's value
    assert infuse.parse_recipe({"dpo": {"output_dir": "runs/x"}}).infuse_sft.stage1_adapter == "runs/x"


def test_a_whole_recipe_is_checked_with_dotted_keys():
    with pytest.raises(RecipeError, match=r"dpo\.learning_rat .*did you mean dpo\.learning_rate"):
        parse_recipe({"dpo": {"learning_rat": 1e-6}})
    with pytest.raises(RecipeError, match=r"infuse_sft\.subset\.size"):
        parse_recipe({"infuse_sft": {"subset": {"size": "many"}}})
    with pytest.raises(RecipeError, match="^name"):
        parse_recipe({"name": 3})


@pytest.mark.parametrize("name", ["default.yaml", "shapesworld.yaml"])
def test_recipe_round_trips(name):
    from pathlib import Path

    from stic.recipe import recipe_to_dict

    recipe = parse_recipe(load_recipe_dict(Path(__file__).parent.parent / "recipes" / name))
    data = recipe_to_dict(recipe)
    assert parse_recipe(yaml.safe_load(yaml.safe_dump(data))) == recipe
    assert data["selfgen"]["output_dir"] == recipe.selfgen.output_dir


def test_stage_help_lists_the_recipe_keys(capsys):
    from stic.cli import main

    for command, needles in [
        ("selfgen", ["selfgen.hallucination_prob (float, default 0.5): p in Algorithm 1",
                     "selfgen.chosen_sampling.max_new_tokens (int, default 256)", "model.name_or_path"]),
        ("dpo", ["dpo.dataset (str | list[str], default selfgen.output_dir)", "dpo.lora_r (int, default 128)",
                 "every TRL DPOConfig option"]),
        ("infuse-sft", ["infuse_sft.stage1_adapter (str | None, default dpo.output_dir)",
                        "infuse_sft.subset.size", "every TRL SFTConfig option"]),
        ("eval", ["eval.limit (int | None, default None)", "eval.judge.model"]),
    ]:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert "recipe keys (override as section.key=value):" in out
        for needle in needles:
            assert needle in out, (command, needle)


def test_config_module_sits_below_the_stages():
    import subprocess
    import sys

    code = ("import sys, stic.config, stic.recipe; "
            "print(sorted(m for m in sys.modules if m in ('stic.selfgen', 'stic.dpo', 'stic.infuse', 'stic.evaluate')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"
