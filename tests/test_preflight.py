"""stic/preflight.py: a clean recipe passes on every family, and each fault preflight guards against is caught by
its check (the mutation matrix of stic/bench/preflight.py). Models are stored as hub checkpoints are (bf16,
std-0.02 weights), with the paper recipes' stage-1 settings."""

import pytest

from stic.bench.preflight import CHECKS, FAULTS, markdown, nothing, preference_data, run_fault
from stic.preflight import FAIL
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
    rows = [line.split()[:2] for line in out.out.splitlines() if line.split()[:1] and line.split()[0] in CHECKS]
    assert [name for name, _ in rows] == list(CHECKS) and all(status in ("pass", "warn") for _, status in rows)

    # a fault: one line per failed check, naming the fix; exit 2
    with pytest.raises(SystemExit) as exit_:
        main(["preflight", "--recipe", "recipes/default.yaml", f"dpo.dataset={data}", "dpo.max_length=12"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("stic:")]
    assert exit_.value.code == 2
    assert len(err) == 1 and err[0].startswith("stic: preflight: image_tokens failed: ") and "; fix: " in err[0]
