"""Progress bars that stay readable in log files.

On a terminal tqdm redraws its line in place many times a second. Redirected to a file (a batch job, CI,
`nohup`), every redraw is another `\r` line, so a long run writes megabytes of bars; there a bar redraws at
most every LOG_INTERVAL_S seconds.
"""

from __future__ import annotations

import sys

LOG_INTERVAL_S = 10.0


def live() -> bool:
    """Whether bars draw on a terminal (tqdm writes to stderr), so frequent redraws cost nothing."""
    return sys.stderr.isatty()


def progress_bar(*args, **kwargs):
    """tqdm(*args, **kwargs), redrawn at most every LOG_INTERVAL_S seconds when stderr is not a terminal."""
    from tqdm.auto import tqdm

    if not live():
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    return tqdm(*args, **kwargs)
