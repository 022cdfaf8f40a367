"""Log hygiene: progress bars in log files (stic/progress.py) and import-time warnings (stic/__init__.py)."""

import io
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.mark.parametrize("tty", [True, False])
def test_progress_bars_redraw_rarely_in_a_log_file(monkeypatch, tty):
    import time

    from stic.progress import LOG_INTERVAL_S, progress_bar

    stream = Stream(tty)
    monkeypatch.setattr("sys.stderr", stream)
    bar = progress_bar(total=500, file=stream)
    now = [time.time()]
    bar._time = lambda: now[0]  # tqdm's clock: one second passes per item
    for _ in range(500):
        now[0] += 1.0
        bar.update(1)
    bar.close()
    draws = stream.getvalue().count("\r")
    assert "500/500" in stream.getvalue()
    if tty:
        assert draws >= 500  # tqdm's own default on a terminal: a redraw per item
    else:
        assert 500 / LOG_INTERVAL_S <= draws <= 500 / LOG_INTERVAL_S + 3  # one per interval, then the last


def test_commands_print_no_bitsandbytes_kernels_warning():
    """Importing the training stages imports bitsandbytes (through trl and peft), which warned on every command."""
    code = "import stic.dpo, stic.infuse; from stic.cli import main; main(['--help'])"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0 and "usage: stic" in res.stdout
    assert "kernels" not in res.stderr and "gemm_4bit" not in res.stderr, res.stderr[-2000:]


def test_only_that_bitsandbytes_message_is_dropped(caplog):
    import logging

    import stic  # noqa: F401  (installs the filter)

    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=log.name):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "no module")
        log.warning("some other bitsandbytes problem")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes problem"]
