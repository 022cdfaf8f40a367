"""stic/benchmarks.py: the benchmark readers and scorers on files in their published formats, and the registry
that plugin modules add their benchmarks to."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stic.benchmarks import (BENCHMARKS, PAPER_BENCHMARKS, BenchmarkFileError, BenchmarkPluginError, UnknownBenchmark,
                             check_known, get_benchmark, load_plugins, read_json, read_jsonl, register)
from stic.errors import SticError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def registry(monkeypatch):
    """The registry as it was before the test, restored after it (plugins registered in a test stay there), and
    so the record of which plugin modules were imported (load_plugins does not run one twice)."""
    before = dict(BENCHMARKS)
    modules = set(sys.modules)
    shapes = sys.modules.get("stic.shapes.benchmarks")
    yield BENCHMARKS
    BENCHMARKS.clear()
    BENCHMARKS.update(before)
    for name in set(sys.modules) - modules:
        if name.startswith("plugin_"):
            del sys.modules[name]
    if shapes is None:
        sys.modules.pop("stic.shapes.benchmarks", None)
    else:
        sys.modules["stic.shapes.benchmarks"] = shapes


# -------------------------------------------------------------------------------------------------------------
# Readers and scorers


def test_scoring_uses_the_official_rules_on_known_answers(eval_root):
    pope = get_benchmark("pope")
    items = pope.load(eval_root)
    # answer every question with its label, phrased as a sentence: all right
    metrics, per = pope.score(items, {it.id: "Yes, there is." if it.meta["label"] == "yes" else "No, there is not."
                                      for it in items})
    assert metrics["accuracy"] == 1.0 and metrics["random"]["f1"] == 1.0 and all(per.values())
    mmbench = get_benchmark("mmbench")
    items = mmbench.load(eval_root)
    metrics, per = mmbench.score(items, {"42": "C", "1000042": "B. pear", "43": "The answer is B"})
    assert metrics["questions"] == 2 and metrics["accuracy"] == 0.5  # q42 fails on its rotated copy
    assert per == {"42": True, "1000042": False, "43": True}
    textvqa = get_benchmark("textvqa")
    items = textvqa.load(eval_root)
    metrics, _ = textvqa.score(items, {it.id: "Acme" for it in items})
    assert metrics["accuracy"] == pytest.approx(1.0)  # 'the acme' normalises to 'acme': 8 of 10 match


def test_loaders_read_the_published_layouts(eval_root):
    counts = {"scienceqa": 3, "textvqa": 3, "chartqa": 3, "pope": 9, "mmbench": 3, "mathvista": 2,
              "llava_bench": 2, "mmvet": 1}
    for name in PAPER_BENCHMARKS:
        items = get_benchmark(name).load(eval_root)
        assert len(items) == counts[name], name
        assert len({it.id for it in items}) == len(items), name
        for it in items:  # every image a benchmark names exists (MMBench carries its images as bytes)
            assert isinstance(it.image, bytes) or Path(it.image).is_file(), (name, it.image)
    sqa = get_benchmark("scienceqa").load(eval_root)
    assert [it.id for it in sqa] == ["77", "78", "80"]  # 79 has no image: not part of ScienceQA-IMG
    assert sqa[0].prompt.endswith("\nAnswer with the option's letter from the given choices directly.")
    assert "<image>" not in sqa[0].prompt
    pope = get_benchmark("pope").load(eval_root)
    assert {it.meta["split"] for it in pope} == {"random", "popular", "adversarial"}
    assert pope[0].prompt.endswith("\nAnswer the question using a single word or phrase.")
    mathvista = {it.id: it for it in get_benchmark("mathvista").load(eval_root)}
    assert mathvista["2"].prompt.startswith("Hint: Please answer the question and provide the correct option")


def test_chartqa_and_mathvista_scores(eval_root):
    chartqa = get_benchmark("chartqa")
    items = chartqa.load(eval_root)
    right = {"human/0": "42", "augmented/0": "Yes", "augmented/1": "nope"}  # 42 is within 5% of 42.5
    metrics, per = chartqa.score(items, right)
    assert per == {"human/0": True, "augmented/0": True, "augmented/1": False}
    assert metrics["human"] == 1.0 and metrics["augmented"] == 0.5 and metrics["accuracy"] == 0.75
    mathvista = get_benchmark("mathvista")
    items = mathvista.load(eval_root)
    metrics, per = mathvista.score(items, {"1": "The area is 16.", "2": "(A) 3"})
    assert per == {"1": True, "2": False} and metrics == {"accuracy": 0.5, "count": 2}


def test_malformed_benchmark_file_names_file_and_record(tmp_path, eval_root):
    root = tmp_path / "data"
    shutil.copytree(eval_root, root)
    path = root / "pope" / "coco" / "coco_pope_popular.json"
    lines = path.read_text().splitlines()
    lines[1] = '{"question_id": 2, "image": "x.jpg", "text": "Is there a dog?"}'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BenchmarkFileError, match=r"coco_pope_popular\.json line 2: missing field label"):
        get_benchmark("pope").load(root)
    lines[1] = '{"question_id": 2, "image": "x.jpg", "text": "Is there a dog?", "label": "maybe"}'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BenchmarkFileError, match="line 2: label must be 'yes' or 'no', got 'maybe'"):
        get_benchmark("pope").load(root)
    shutil.rmtree(root / "chartqa")
    with pytest.raises(BenchmarkFileError, match=r"test_human\.json does not exist"):
        get_benchmark("chartqa").load(root)


def test_json_readers_name_the_file_and_line(tmp_path):
    with pytest.raises(BenchmarkFileError, match="does not exist"):
        read_json(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text('{"a": ')
    with pytest.raises(BenchmarkFileError, match=r"bad\.json: not valid JSON .* at line 1"):
        read_json(tmp_path / "bad.json")
    (tmp_path / "rows.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n{oops\n')
    with pytest.raises(BenchmarkFileError, match=r"rows\.jsonl line 4: not valid JSON"):
        read_jsonl(tmp_path / "rows.jsonl")
    (tmp_path / "rows.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_jsonl(tmp_path / "rows.jsonl") == [{"a": 1}, {"a": 2}]  # blank lines skipped
    assert issubclass(BenchmarkFileError, SticError) and issubclass(BenchmarkFileError, ValueError)


# -------------------------------------------------------------------------------------------------------------
# The registry


def test_the_paper_benchmarks_are_registered_in_table_order():
    assert list(BENCHMARKS)[:8] == PAPER_BENCHMARKS
    assert {n: BENCHMARKS[n].headline for n in PAPER_BENCHMARKS} == {
        "scienceqa": "accuracy", "textvqa": "accuracy", "chartqa": "accuracy", "pope": "f1",
        "mmbench": "accuracy", "mathvista": "accuracy", "llava_bench": "relative", "mmvet": "total"}
    judged = {n for n in PAPER_BENCHMARKS if BENCHMARKS[n].score is None}
    assert judged == {"llava_bench", "mmvet"}


def test_unknown_names_are_refused_naming_them_and_the_known_ones():
    check_known(PAPER_BENCHMARKS)  # no error
    check_known([])
    with pytest.raises(UnknownBenchmark) as err:
        check_known(["pope", "popee", "vqa2"])
    assert str(err.value) == f"unknown benchmarks popee, vqa2; known: {', '.join(BENCHMARKS)}"
    with pytest.raises(UnknownBenchmark, match="^unknown benchmark popee; known: scienceqa, "):
        get_benchmark("popee")
    assert issubclass(UnknownBenchmark, SticError) and issubclass(UnknownBenchmark, ValueError)


def test_a_plugin_module_registers_its_benchmark_once(tmp_path, monkeypatch, registry):
    (tmp_path / "plugin_toy.py").write_text(
        "from stic.benchmarks import Item, register\n"
        "RUNS = []\n"
        "def load(root):\n"
        "    return [Item('a', None, 'Q?', {'answer': 'yes'})]\n"
        "def score(items, answers):\n"
        "    per = {it.id: answers[it.id] == it.meta['answer'] for it in items}\n"
        "    return {'accuracy': sum(per.values()) / len(per)}, per\n"
        "register('toy', load, score, 'accuracy', max_new_tokens=4)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UnknownBenchmark):
        check_known(["toy"])
    load_plugins(["plugin_toy"])
    load_plugins(["plugin_toy"])  # imported already: not run again, so not registered twice
    assert list(BENCHMARKS)[-1] == "toy"  # after the paper's: its table column comes last
    check_known(["pope", "toy"])
    toy = get_benchmark("toy")
    assert (toy.headline, toy.max_new_tokens) == ("accuracy", 4)
    items = toy.load(tmp_path)
    assert toy.score(items, {"a": "yes"}) == ({"accuracy": 1.0}, {"a": True})
    with pytest.raises(BenchmarkPluginError, match="benchmark 'toy' is registered twice"):
        register("toy", toy.load, toy.score, "accuracy")
    with pytest.raises(BenchmarkPluginError, match="benchmark 'pope' is registered twice"):
        register("pope", toy.load, toy.score, "f1")
    assert BENCHMARKS["pope"].headline == "f1" and BENCHMARKS["toy"] is toy  # the first registration stands


def test_a_plugin_that_cannot_be_imported_is_named(tmp_path, monkeypatch, registry):
    with pytest.raises(BenchmarkPluginError, match="benchmark plugin 'plugin_nowhere' cannot be imported"):
        load_plugins(["plugin_nowhere"])
    (tmp_path / "plugin_broken.py").write_text("import a_module_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BenchmarkPluginError, match="'plugin_broken' cannot be imported: No module named "
                                                   "'a_module_that_is_not_installed'"):
        load_plugins(["plugin_broken"])
    (tmp_path / "plugin_typo.py").write_text("x = = 1\n")
    with pytest.raises(BenchmarkPluginError, match="'plugin_typo' cannot be imported: SyntaxError"):
        load_plugins(["plugin_typo"])
    assert issubclass(BenchmarkPluginError, SticError)


def test_shapes_benchmarks_are_registered_only_by_their_plugin():
    """The core does not import stic.shapes: its benchmarks exist once a recipe names the plugin module."""
    code = (
        "import sys\n"
        "import stic.benchmarks as b, stic.evaluate, stic.recipe\n"
        "assert not [m for m in sys.modules if m.startswith('stic.shapes')], 'the core imported stic.shapes'\n"
        "assert 'shapes_describe' not in b.BENCHMARKS and 'shapes_qa' not in b.BENCHMARKS\n"
        "try:\n"
        "    b.check_known(['shapes_qa'])\n"
        "    raise SystemExit('shapes_qa known without the plugin')\n"
        "except b.UnknownBenchmark:\n"
        "    pass\n"
        "b.load_plugins(['stic.shapes.benchmarks'])\n"
        "assert list(b.BENCHMARKS) == b.PAPER_BENCHMARKS + ['chair', 'shapes_describe', 'shapes_qa'], list(b.BENCHMARKS)\n"
        "assert b.BENCHMARKS['shapes_describe'].headline == 'hallucination_rate'\n"
        "assert b.BENCHMARKS['shapes_qa'].headline == 'accuracy'\n"
        "b.check_known(['shapes_describe', 'shapes_qa'])\n"
        "print('ok')\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def test_an_eval_recipe_knows_the_benchmarks_of_the_plugins_it_names(registry):
    from stic.config import RecipeError
    from stic.evaluate import parse_recipe

    BENCHMARKS.pop("shapes_qa", None)  # another test of this session may have loaded the plugin
    BENCHMARKS.pop("shapes_describe", None)
    with pytest.raises(RecipeError, match="eval: unknown benchmark shapes_qa; known: scienceqa"):
        parse_recipe({"eval": {"benchmarks": ["shapes_qa"]}})
    sys.modules.pop("stic.shapes.benchmarks", None)  # so that load_plugins runs it (and registers) again
    recipe = parse_recipe({"eval": {"benchmarks": ["shapes_qa"], "plugins": ["stic.shapes.benchmarks"]}})
    assert recipe.eval.benchmarks == ["shapes_qa"] and "shapes_describe" in BENCHMARKS
