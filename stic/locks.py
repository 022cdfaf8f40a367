"""The exclusive lock of an output folder: one run at a time writes it.

A second run on the same folder is refused in one line naming the holder. The lock is an `fcntl.flock` on a
hidden sibling file, held open for the run, so the kernel releases it when the holder dies (kill -9 included)
and no stale lock is left. Under `accelerate launch` the run's main process holds it for all ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from stic.errors import SticError


class OutputLocked(SticError, RuntimeError):
    """Another run is writing the output folder."""


def lock_path(folder: str | os.PathLike) -> Path:
    """The lock file of an output folder: a hidden sibling, so that taking the lock creates nothing in (or of) the
    folder, and a refused or failed run leaves no empty folder behind."""
    folder = Path(folder).resolve()
    return folder.parent / f".{folder.name}.stic-lock"


_held: dict[str, object] = {}  # lock file -> its open handle: a process that holds a lock may take it again


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, lock_file: str | os.PathLike | None = None, wait_s: float = 0.0):
    """Hold the exclusive lock of an output folder for the block; OutputLocked names the holder if another run
    still has it after `wait_s` seconds (0: at once; a short wait suits a write of a few milliseconds, such as
    merging an eval summary). flock belongs to the open file, so the kernel releases it when the holder dies
    (kill -9 included). The lock file is left in place: deleting it would let two runs lock two different files."""
    folder = Path(folder)
    path = Path(lock_file) if lock_file else lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    if key in _held:  # this process already holds it (e.g. the stage around its sharded writer)
        yield
        return
    fh = open(path, "a+")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            fh.seek(0)
            text = fh.read()
            fh.close()
            try:
                h = json.loads(text)
                holder = f"pid {h['pid']} on {h['host']}, started {h['started']}: {h['command']}"
            except (ValueError, KeyError, TypeError):
                holder = "holder not yet recorded"
            raise OutputLocked(f"{folder} is being written by another run ({holder}); wait for it to finish, or "
                               "use another output directory") from None
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "started": datetime.datetime.now().isoformat(timespec="seconds"),
                         "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}) + "\n")
    fh.flush()
    _held[key] = fh
    try:
        yield
    finally:
        del _held[key]
        fh.close()  # releases the flock


def main_process_lock(folder: str | os.PathLike, is_main: bool):
    """The run's lock, taken by its main process only: the ranks of one `accelerate launch` run share the folder."""
    return output_lock(folder) if is_main else contextlib.nullcontext()
