import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stic.cli import main
from stic.prompts import PromptsConfig, load_prompts
from tests.conftest import photo

REPO = Path(__file__).resolve().parent.parent


def test_corrupt_previews_one_image(tmp_path, capsys):
    src, out = tmp_path / "in.png", tmp_path / "out.png"
    photo(0, size=(80, 64)).save(src)
    with pytest.raises(SystemExit) as code:
        main(["corrupt", str(src), "--kind", "color_jitter", "--seed", "3", "--set", "hue=0.2", "-o", str(out)])
    assert code.value.code == 0
    record = json.loads(capsys.readouterr().out)
    assert record["kind"] == "color_jitter" and record["seed"] == 3 and record["settings"]["hue"] == 0.2
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(src)))


def test_tiny_model_command_writes_a_loadable_model(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    with pytest.raises(SystemExit):
        main(["tiny-model", "--family", "qwen2_5_vl", "-o", str(tmp_path / "m")])
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "m")
    processor = AutoProcessor.from_pretrained(tmp_path / "m")
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert processor.chat_template and "<|im_start|>" in processor.chat_template


def test_selfgen_command_refuses_a_bad_recipe_before_work(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("selfgen:\n  batch_size: 4\n  output_dir: %s\n  imagez: {}\n" % (tmp_path / "out"))
    res = subprocess.run([sys.executable, "-m", "stic", "selfgen", "--recipe", str(recipe)], cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert "selfgen.imagez" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()
    recipe.write_text("selfgen:\n  output_dir: %s\n" % (tmp_path / "out"))
    res = subprocess.run([sys.executable, "-m", "stic", "selfgen", "--recipe", str(recipe),
                          "images.type=folder", f"images.path={tmp_path / 'none'}"],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2 and "does not exist" in res.stderr, res.stderr[-2000:]


def test_prompt_sets_can_be_replaced_from_files(tmp_path):
    (tmp_path / "good.txt").write_text("Describe every object, one by one.\nThen the background.\n")
    (tmp_path / "cap.txt").write_text("Describe it.\n\nWhat is this?\n")
    (tmp_path / "hallu.json").write_text(json.dumps(["Invent a story about it."]))
    sets = load_prompts(PromptsConfig(str(tmp_path / "good.txt"), str(tmp_path / "cap.txt"),
                                      str(tmp_path / "hallu.json")))
    assert sets.good == "Describe every object, one by one.\nThen the background."
    assert sets.caption == ("Describe it.", "What is this?")
    assert sets.hallucination == ("Invent a story about it.",)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="holds no prompt"):
        load_prompts(PromptsConfig(caption_prompts_file=str(tmp_path / "empty.txt")))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_prompts(PromptsConfig(hallucination_prompts_file=str(tmp_path / "missing.txt")))
