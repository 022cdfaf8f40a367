"""The toolkit's errors share one base, `SticError`.

Each module keeps its own subclass (RecipeError, DatasetError, OutputConflict, ...), most of them also
deriving from the builtin they used to be (ValueError, RuntimeError), so existing `except` clauses still match.
"""

from __future__ import annotations


class SticError(Exception):
    """The toolkit's errors: a problem with the user's recipe, data or folders, not a bug.

    The message says what is wrong and where (file, record, key); the command-line entries (`stic`,
    eval/run.py) print it as one line, without a traceback, and exit with status 2."""


def one_line(err: BaseException) -> str:
    """The error's message on one line (its class name when it has none)."""
    text = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__
