import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
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


# ---------------------------------------------------------------------------------------------------------
# Errors: every toolkit error is a SticError, printed as one line without a traceback


def _one_error_line(err: str, prog: str = "stic") -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: ")]  # not progress bars etc.
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_every_toolkit_error_is_a_stic_error():
    from corruptions import CorruptionError
    from stic.benchmarks import BenchmarkFileError
    from stic.config import RecipeError
    from stic.dpo import DatasetError
    from stic.errors import SticError
    from stic.images import ImageRejected, ImageSourceError
    from stic.instructions import InstructionDataError
    from stic.judge import JudgeUnavailable
    from stic.store import OutputConflict

    for cls in (CorruptionError, BenchmarkFileError, RecipeError, DatasetError, ImageRejected, ImageSourceError,
                InstructionDataError, JudgeUnavailable, OutputConflict):
        assert issubclass(cls, SticError), cls
    # the old bases stay, so existing `except ValueError` / `except RuntimeError` keep working
    assert issubclass(RecipeError, ValueError) and issubclass(DatasetError, ValueError)
    assert issubclass(OutputConflict, RuntimeError) and issubclass(JudgeUnavailable, RuntimeError)


def test_dpo_names_a_truncated_parquet_part(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "selfgen" / "data"
    data.mkdir(parents=True)
    rows = [{"prompt": [{"role": "user", "content": f"Describe image {i}."}],
             "chosen": [{"role": "assistant", "content": "A red block."}],
             "rejected": [{"role": "assistant", "content": "A blue dog."}]} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), data / "train-a1b2-r000-00000.parquet")
    bad = data / "train-a1b2-r000-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), bad)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # a part cut off mid-file
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name_or_path": "tiny:llava", "dtype": "float32"},
                                      "dpo": {"output_dir": str(tmp_path / "out"), "dataset": str(tmp_path / "selfgen"),
                                              "report_to": []}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["dpo", "--recipe", str(recipe)])
    assert exit_info.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(bad) in line and "Parquet" in line
    assert not (tmp_path / "out").exists()


def test_infuse_sft_with_no_usable_record_says_why(tmp_path, capsys):
    from tests.test_instructions import conv

    data = tmp_path / "mix.json"
    data.write_text(json.dumps([
        {"id": "gone1", "image": "coco/nope1.jpg", "conversations": conv("<image>\nQ?", "A")},
        {"id": "gone2", "image": "coco/nope2.jpg", "conversations": conv("<image>\nQ?", "A")},
        {"id": "nohuman", "conversations": [{"from": "gpt", "value": "A"}]},
    ]))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name_or_path": "tiny:llava", "dtype": "float32"},
                                      "infuse_sft": {"output_dir": str(tmp_path / "s2"), "report_to": [],
                                                     "data": {"path": str(data), "image_folder": str(tmp_path)}}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["infuse-sft", "--recipe", str(recipe)])
    assert exit_info.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "stic: error: no usable record" in line and str(data) in line
    assert "3 skipped" in line and "2 missing image file" in line and "1 no human turn" in line


def test_eval_command_takes_eval_run_arguments_and_refuses_a_bad_key_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    for arg in ("--recipe", "--model", "--dar", "--benchmarks", "overrides", "scienceqa", "eval.plugins"):
        assert arg in usage
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"eval": {"output_dir": str(tmp_path / "out"), "limt": 2}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--recipe", str(recipe), "--benchmarks", "pope"])
    assert exit_info.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("stic: recipe error: unknown key eval.limt") and "eval.limit" in line
    assert not (tmp_path / "out").exists()
