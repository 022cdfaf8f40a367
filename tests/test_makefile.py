import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("target, expected", [
    ("demo", "-m stic.shapes.demo"), ("selfgen", "-m stic selfgen --recipe recipes/default.yaml"),
    ("dpo", "-m stic dpo"), ("infuse-sft", "-m stic infuse-sft"), ("eval", "eval/run.py --recipe"),
    ("rounds", "-m stic rounds --recipe recipes/default.yaml"), ("test", "-m pytest"), ("bench-selfgen", "-m stic.bench.selfgen"), ("bench-dpo", "-m stic.bench.dpo"),
])
def test_make_targets_run_their_stage(target, expected):
    # run as a top-level make even when the suite itself runs under `make test`
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    out = subprocess.run(["make", "-n", "--no-print-directory", target], cwd=REPO, capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert "overriding" not in out.stderr
    assert expected in out.stdout.strip().splitlines()[-1]
