"""stic/eval_fixtures.py: the self-made fixture of every benchmark, in the official layouts the loaders read, and
the default recipe's `make eval` that reads it."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stic.benchmarks import PAPER_BENCHMARKS, get_benchmark
from stic.eval_fixtures import COUNTS, FIXTURE_MARKER, main, make_fixture
from stic.images import decode_image

REPO = Path(__file__).resolve().parent.parent


def test_fixture_loads_through_every_official_loader(tmp_path):
    root = tmp_path / "fixture"
    assert make_fixture(root)
    assert set(COUNTS) == set(PAPER_BENCHMARKS)
    for name in PAPER_BENCHMARKS:
        items = get_benchmark(name).load(root)
        assert len(items) == COUNTS[name], name
        assert len({it.id for it in items}) == len(items), name
        for it in items:
            image = decode_image(it.image, max_pixels=10**6, max_decode_pixels=10**7)
            assert image.width * image.height > 1000 and len(image.getcolors(10**4) or []) > 1, (name, it.id)
    pope = get_benchmark("pope").load(root)  # every split has a yes and a no, so its F1 is defined
    splits = ("adversarial", "popular", "random")
    assert {(it.meta["split"], it.meta["label"]) for it in pope} == {(s, lab) for s in splits for lab in ("yes", "no")}
    mmbench = {it.id: it for it in get_benchmark("mmbench").load(root)}
    assert "1000001" in mmbench and mmbench["2"].prompt.startswith("Count the dots in one row.\n")


def test_fixture_is_written_once_and_never_over_other_files(tmp_path, capsys):
    root = tmp_path / "fixture"
    assert main([str(root)]) == 0 and "wrote" in capsys.readouterr().out
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert main([str(root)]) == 0 and "already at" in capsys.readouterr().out
    assert make_fixture(root, force=True)
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before  # the same files, byte for byte
    data = tmp_path / "real-data"
    (data / "pope").mkdir(parents=True)
    assert main([str(data)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an eval fixture" in err and FIXTURE_MARKER in err
    assert [p.name for p in data.iterdir()] == ["pope"]


def test_make_eval_makes_the_default_recipes_fixture_first():
    recipe = yaml.safe_load((REPO / "recipes" / "default.yaml").read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    out = subprocess.run(["make", "-n", "--no-print-directory", "eval"], cwd=REPO, capture_output=True, text=True,
                         env=env)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0, out.stderr
    assert lines[-2].endswith(f"-m stic.eval_fixtures {recipe['eval']['data_root']}")
    assert "eval/run.py --recipe recipes/default.yaml" in lines[-1]
    out = subprocess.run(["make", "-n", "--no-print-directory", "eval", "RECIPE=recipes/llava-1.5-7b.yaml"],
                         cwd=REPO, capture_output=True, text=True, env=env)
    assert "stic.eval_fixtures" not in out.stdout  # another recipe reads its own data


@pytest.mark.slow
def test_default_recipe_eval_prints_a_table_on_the_fixture(tmp_path):
    root = tmp_path / "fixture"
    make_fixture(root)
    out = subprocess.run([sys.executable, "-m", "stic", "eval", "--recipe", str(REPO / "recipes" / "default.yaml"),
                          "--model", "base", "--benchmarks", "pope", "mmbench", "chartqa", f"eval.data_root={root}",
                          f"eval.output_dir={tmp_path / 'runs'}"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.strip("|").split("|") for line in out.stdout.splitlines() if line.startswith("| ")]
    table = {head.strip(): cell.strip() for head, cell in zip(rows[0], rows[1])}
    assert table["run"] == "base" and {"pope", "mmbench", "chartqa"} <= set(table), out.stdout
    assert all(re.fullmatch(r"\d+\.\d", table[name]) for name in ("pope", "mmbench", "chartqa")), out.stdout
