"""Fault suite, input part: bad worlds, recipes, datasets and servers get one line naming the problem, exit 2, no
traceback, before any work (or, where data is skipped instead, the reason is recorded).

Each row runs `stic.cli.main` in this process and checks the one stderr line that starts with "stic: ".
"""

import json
import threading
import time
from pathlib import Path

import pytest
import yaml

from stic.cli import main
from tests.conftest import conv, photo

REPO = Path(__file__).resolve().parent.parent


def refused(argv: list[str], capsys) -> str:
    """Run the command; it must exit 2 with exactly one `stic: ` line on stderr and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("stic: ")]
    assert exit_info.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# A. World files: every value within what the world can draw (an impossible object count used to loop forever)


def world_with(tmp_path, edit) -> Path:
    data = yaml.safe_load((REPO / "recipes/shapesworld/world.yaml").read_text())
    edit(data)
    path = tmp_path / "world.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _set(section, key, value):
    def edit(data):
        data[section][key] = value
    return edit


WORLD_ROWS = {
    "objects_per_scene_12_hangs": (_set("scenes", "objects_per_scene", [12]), "scenes.objects_per_scene"),
    "objects_per_scene_10": (_set("scenes", "objects_per_scene", [10]), "scenes.objects_per_scene"),
    "objects_per_scene_empty": (_set("scenes", "objects_per_scene", []), "scenes.objects_per_scene"),
    "objects_per_scene_zero": (_set("scenes", "objects_per_scene", [0]), "scenes.objects_per_scene"),
    "objects_over_max_objects": (_set("scenes", "objects_per_scene", [5]), "scenes.objects_per_scene"),
    "max_objects_over_types": (lambda d: d["scenes"].update(max_objects=6, objects_per_scene=[6]),
                               "scenes.max_objects"),
    "qa_kinds_empty": (_set("qa", "kinds", []), "qa.kinds"),
    "qa_per_scene_negative": (_set("qa", "per_scene", -1), "qa.per_scene"),
    "background_shade_inverted": (_set("scenes", "background_shade", [70, 20]), "scenes.background_shade"),
    "background_shade_one_value": (_set("scenes", "background_shade", [20]), "scenes.background_shade"),
    "co_occurrence_over_1": (_set("scenes", "co_occurrence", 1.5), "scenes.co_occurrence"),
    "faint_prob_negative": (_set("scenes", "faint_prob", -0.1), "scenes.faint_prob"),
    "rgb_out_of_range": (lambda d: d["colors"].update(red=[300, -5, 0]), "colors.red"),
    "rgb_two_values": (lambda d: d["colors"].update(red=[220, 40]), "colors.red"),
    "radius_over_cell": (lambda d: d["scenes"]["radius"].update(large=40), "scenes.radius.large"),
    "radius_missing_size": (_set("scenes", "radius", {"small": 3}), "scenes.radius"),
    "presence_yes_over_1": (_set("qa", "presence_yes", 2.0), "qa.presence_yes"),
    "invented_negative": (lambda d: d["sources"]["imaginative"].update(invented=[-1]),
                          "sources.imaginative.invented"),
}


@pytest.mark.parametrize("row", sorted(WORLD_ROWS))
def test_world_value_it_cannot_draw_is_refused_before_any_scene(row, tmp_path, capsys):
    edit, key = WORLD_ROWS[row]
    world = world_with(tmp_path, edit)
    out = tmp_path / "data"
    line = refused(["shapes", "make-data", "--world", world, "-o", out, "--train", "2", "--heldout", "2"], capsys)
    assert line.startswith(f"stic: error: world file {world}: ") and key in line, line
    assert not out.exists()


def test_default_world_still_loads_with_its_recorded_digest(capsys):
    from stic.shapes import world as W

    # the calibrated world's digest (recipes/shapesworld/calibration/v4a*.json): its data must stay identical
    assert W.load_world().digest() == "5ec1ed143f37"
    for path in sorted((REPO / "recipes/shapesworld/candidates").glob("*.yaml")):
        W.load_world(path)  # every calibration candidate is still a drawable world


# ---------------------------------------------------------------------------------------------------------
# B. Recipe values that used to run with exit 0 and do nothing, or nonsense


def recipe_file(tmp_path, data=None) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data or {"model": {"name_or_path": "tiny:llava", "dtype": "float32"}}))
    return path


RECIPE_ROWS = {
    "dpo_beta_negative": ("dpo", ["dpo.beta=-0.5"], "dpo: beta must be positive"),
    "dpo_beta_zero": ("dpo", ["dpo.beta=0"], "dpo: beta must be positive"),
    "dpo_sft_weight_negative": ("dpo", ["dpo.sft_weight=-1"], "dpo: sft_weight must be at least 0"),
    "dpo_zero_epochs": ("dpo", ["dpo.num_train_epochs=0"], "dpo: num_train_epochs must be positive"),
    "dpo_zero_epochs_zero_steps": ("dpo", ["dpo.num_train_epochs=0", "dpo.max_steps=0"],
                                   "dpo: num_train_epochs must be positive"),
    "dpo_negative_epochs": ("dpo", ["dpo.num_train_epochs=-1"], "dpo: num_train_epochs must be positive"),
    "infuse_zero_epochs": ("infuse-sft", ["infuse_sft.num_train_epochs=0"],
                           "infuse_sft: num_train_epochs must be positive"),
    "top_p_over_1": ("selfgen", ["selfgen.rejected_sampling.top_p=2.0"],
                     "selfgen.rejected_sampling: top_p must lie in (0, 1]"),
    "top_p_zero": ("selfgen", ["selfgen.rejected_sampling.top_p=0"],
                   "selfgen.rejected_sampling: top_p must lie in (0, 1]"),
    "temperature_negative": ("selfgen", ["selfgen.chosen_sampling.temperature=-1"],
                             "selfgen.chosen_sampling: temperature must be at least 0"),
    "max_new_tokens_zero": ("selfgen", ["selfgen.chosen_sampling.max_new_tokens=0"],
                            "selfgen.chosen_sampling: max_new_tokens must be at least 1"),
    "describe_top_p_over_1": ("infuse-sft", ["infuse_sft.describe.sampling.top_p=1.5"],
                              "infuse_sft.describe.sampling: top_p must lie in (0, 1]"),
    "eval_limit_negative": ("eval", ["eval.limit=-1"], "eval: limit must be at least 1"),
    "eval_limit_zero": ("eval", ["eval.limit=0"], "eval: limit must be at least 1"),
}


@pytest.mark.parametrize("row", sorted(RECIPE_ROWS))
def test_nonsense_recipe_value_is_refused_at_parse_time(row, tmp_path, capsys):
    command, overrides, message = RECIPE_ROWS[row]
    out = tmp_path / "out"
    section = command.replace("-", "_")
    argv = [command, "--recipe", recipe_file(tmp_path), f"{section}.output_dir={out}", *overrides]
    if command == "eval":
        argv += ["--benchmarks", "pope"]
    line = refused(argv, capsys)
    assert line.startswith("stic: recipe error: ") and message in line, line
    assert not out.exists()
