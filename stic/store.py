"""The output folder of a resumable, sharded generation job.

Layout (OUT is what `datasets.load_dataset("parquet", data_dir=OUT)` reads):

    OUT/run_config.json             what produced the data; a rerun with another config is refused
    OUT/data/train-<run>-r<rank>-<n>.parquet
                                    rows, each part renamed into place whole (atomic); the "train" prefix
                                    is what the parquet loader keys its split on, so it skips the JSON files
    OUT/.ledger/<run>-r<rank>.jsonl items finished without a row (dropped pairs, unreadable images)
    OUT/manifest.json               counts, timings, rejects (written by the main process at the end)
    .OUT.stic-lock                  beside OUT: held (flock) by the run writing OUT; names its holder

An output folder is written by one run at a time: the run's main process holds its lock file (an flock the
kernel drops when the process dies, so a killed run leaves no stale lock) and a second run is refused.

An item is done when its id is in a part file or in a ledger. Rows are written before their ledger lines,
so a crash between the two at worst repeats the ledger's items, never a row. Each process of an
`accelerate launch` run writes its own parts and ledger, so nothing is shared between writers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pyarrow.parquet as pq

from stic.errors import SticError, one_line
from stic.locks import OutputLocked, lock_path, main_process_lock, output_lock  # noqa: F401  (re-exported)


class OutputConflict(SticError, RuntimeError):
    """The output folder holds a run made with a different configuration."""


class OutputDirError(SticError, ValueError):
    """An output folder that cannot be written: a file, under a file, or read-only."""


def check_output_dir(path: str | os.PathLike, key: str) -> None:
    """Refuse `path` (the recipe's `key`) before any model loads when it cannot become a writable folder;
    nothing is created here."""
    p = Path(path)
    nearest = next(a for a in (p, *p.parents) if a.exists() or a == Path(a.anchor) or str(a) == ".")
    if not nearest.is_dir():
        where = "is a file" if nearest == p else f"cannot be created: {nearest} is a file"
        raise OutputDirError(f"{key} {p} {where}, not a folder")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise OutputDirError(f"{key} {p} is not writable ({nearest} is read-only)"
                             if nearest == p else f"{key} {p} cannot be created: {nearest} is read-only")


# what a sharded output folder is made of: all that --overwrite deletes
TOOLKIT_ENTRIES = ("data", ".ledger", ".tmp", "manifest.json", "rejects.jsonl", "preview.html", "run_config.json")


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def digest(obj) -> str:
    """A short digest of JSON-able settings that is stable across runs and key orders (of their canonical JSON)."""
    return hashlib.sha256(_canonical(obj).encode()).hexdigest()[:12]


def _flatten(obj, prefix: str = "") -> dict:
    if not isinstance(obj, dict):
        return {prefix: obj}
    flat = {}
    for k, v in obj.items():
        flat.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return flat


class ShardedOutput:
    def __init__(self, out_dir: str | os.PathLike, rank: int = 0):
        self.root = Path(out_dir)
        self.data_dir = self.root / "data"
        self.ledger_dir = self.root / ".ledger"
        self.tmp_dir = self.root / ".tmp"
        self.rank = rank
        self.run_id = uuid.uuid4().hex[:8]
        self._parts_written = 0

    # -- set-up (main process only) ---------------------------------------------------------------------

    def prepare(self, run_config: dict, overwrite: bool = False) -> bool:
        """Create or check the folder. Returns True when earlier work is being resumed.

        Only a folder whose run_config.json marks it as this stage's output is resumed or (with `overwrite`)
        deleted, and then only the toolkit's own files: anything else in it is never touched."""
        config_path = self.root / "run_config.json"
        stage = run_config.get("stage")
        old = None
        if config_path.exists():
            try:
                old = json.loads(config_path.read_text())
            except ValueError:
                raise OutputConflict(f"{config_path} is not valid JSON, so {self.root} cannot be checked; use another "
                                     "output directory, or delete it yourself") from None
        if old is None:
            foreign = self._foreign_entries()
            if foreign:
                raise OutputConflict(
                    f"{self.root} holds files the toolkit did not write ({', '.join(foreign)}) and no "
                    f"run_config.json; nothing there is {'deleted' if overwrite else 'touched'}: use a new or empty "
                    "output directory")
        elif not isinstance(old, dict) or old.get("stage") != stage:
            other = old.get("stage") if isinstance(old, dict) else None
            raise OutputConflict(f"{self.root} holds the output of another stage ({other or 'unknown'}, not {stage}); "
                                 f"{'--overwrite deletes only a ' + str(stage) + ' output' if overwrite else 'it is kept'}"
                                 ": use another output directory")
        resumed = False
        if old is not None:
            # a folder whose run stopped before any row or ledger line (a model that failed to load, was killed
            # loading) holds no work: another config replaces it, so the corrected rerun is not refused
            has_work = bool(self.part_files() or self.ledger())
            if _canonical(old) != _canonical(run_config) and not overwrite and has_work:
                a, b = _flatten(old), _flatten(run_config)
                # a key on one side only (another version's option) is named as such, null or not
                changed = sorted(k if k in a and k in b else f"{k} ({'not in the stored run' if k in b else 'not set now'})"
                                 for k in set(a) | set(b) if k not in a or k not in b or _canonical(a[k]) != _canonical(b[k]))
                raise OutputConflict(
                    f"{self.root} already holds a run made with a different configuration (differs in: "
                    f"{', '.join(changed)}). Use another output directory, or pass --overwrite to delete it and "
                    "start over."
                )
            resumed = not overwrite and _canonical(old) == _canonical(run_config)
        if overwrite and old is not None:
            for name in TOOLKIT_ENTRIES:
                path = self.root / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)  # half-written parts of a killed run
        self.root.mkdir(parents=True, exist_ok=True)
        config_path.write_text(json.dumps(run_config, indent=2, sort_keys=True, default=str) + "\n")
        for d in (self.data_dir, self.ledger_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        return resumed

    def _foreign_entries(self) -> list[str]:
        """What a folder without run_config.json holds besides the lock and the empty folders of a start cut short."""
        if not self.root.is_dir():
            return []
        foreign = sorted(e.name + ("/" if e.is_dir() else "") for e in self.root.iterdir()
                         if not (e.is_dir() and e.name in ("data", ".ledger", ".tmp")
                                                         and not any(e.iterdir())))
        return foreign[:5] + ([f"{len(foreign) - 5} more"] if len(foreign) > 5 else [])

    # -- reading ----------------------------------------------------------------------------------------

    def part_files(self) -> list[Path]:
        return sorted(self.data_dir.glob("*.parquet")) if self.data_dir.exists() else []

    def row_ids(self, id_column: str) -> list[str]:
        import pyarrow as pa

        ids: list[str] = []
        for part in self.part_files():
            try:
                ids.extend(pq.read_table(part, columns=[id_column]).column(id_column).to_pylist())
            except (pa.ArrowException, OSError, KeyError) as err:
                # parts appear whole (renamed into place), so this one was damaged afterwards (a cut copy, a full
                # disk); resuming past it would lose or repeat its items
                raise OutputConflict(f"{part} is not a readable Parquet part, truncated or corrupt "
                                     f"({one_line(err)}); delete it and rerun to redo its items") from None
        return ids

    def ledger(self) -> list[dict]:
        entries = []
        for path in sorted(self.ledger_dir.glob("*.jsonl")) if self.ledger_dir.exists() else []:
            for line in path.read_text().splitlines():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a kill: its items are simply redone
                    continue
        return entries

    def done_ids(self, id_column: str) -> set[str]:
        return set(self.row_ids(id_column)) | {e["id"] for e in self.ledger()}

    # -- writing (every process) ------------------------------------------------------------------------

    def write_rows(self, rows: list[dict], features) -> Path | None:
        """Write rows as one parquet part that appears atomically."""
        if not rows:
            return None
        import datasets

        name = f"train-{self.run_id}-r{self.rank:03d}-{self._parts_written:05d}.parquet"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_dir / name
        datasets.Dataset.from_list(rows, features=features).to_parquet(str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        final = self.data_dir / name
        os.replace(tmp, final)
        self._parts_written += 1
        return final

    def log(self, entries: Iterable[dict]) -> None:
        entries = list(entries)
        if not entries:
            return
        path = self.ledger_dir / f"{self.run_id}-r{self.rank:03d}.jsonl"
        with open(path, "a") as fh:
            fh.write("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
            fh.flush()
            os.fsync(fh.fileno())


# -------------------------------------------------------------------------------------------------------------
# The job loop shared by every stage that generates from images (selfgen, the stage-2 descriptions)


@dataclasses.dataclass
class JobResult:
    store: ShardedOutput
    run_stats: list[dict]  # one entry per process: images, rows, tokens, seconds
    done_at_start: int


def run_sharded(*, name: str, out_dir: str, refs: Sequence, run_config: dict, load: Callable[[Any], Any],
                make_worker: Callable, features, id_column: str, items_per_part: int,
                overwrite: bool = False) -> JobResult | None:
    """Process `refs` (objects with an `id`) over all `accelerate launch` processes, resumably.

    load(ref) returns the item (an image) or raises ImageRejected; make_worker(device) is called once per
    process that has work and returns worker(items, on_batch) -> (rows, drops), with items a list of
    (id, item). Returns the JobResult on the main process, None elsewhere.
    """
    import datasets
    import transformers

    from stic.models import process_state

    datasets.disable_progress_bars()  # one bar for the job, not one per parquet part
    transformers.logging.disable_progress_bar()
    state = process_state()  # without a GPU, `accelerate launch` processes join over gloo on the CPU
    with main_process_lock(out_dir, state.is_main_process):  # held until every rank has finished
        return _run_sharded(state, name=name, out_dir=out_dir, refs=refs, run_config=run_config, load=load,
                            make_worker=make_worker, features=features, id_column=id_column,
                            items_per_part=items_per_part, overwrite=overwrite)


def _run_sharded(state, *, name, out_dir, refs, run_config, load, make_worker, features, id_column, items_per_part,
                 overwrite) -> JobResult | None:
    from accelerate.utils import gather_object

    from stic.images import ImageRejected
    from stic.progress import live, progress_bar

    store = ShardedOutput(out_dir, rank=state.process_index)
    if state.is_main_process:
        store.prepare(run_config, overwrite=overwrite)
    state.wait_for_everyone()

    done = store.done_ids(id_column)
    todo = [r for r in refs if r.id not in done]
    if done and state.is_main_process:
        print(f"{name}: resuming in {out_dir}: {len(refs) - len(todo)} of {len(refs)} items already done, "
              f"{len(todo)} to go")
    mine = todo[state.process_index::state.num_processes]  # the same order on every process: disjoint shards
    started = time.time()
    stats = {"images": 0, "rows": 0, "tokens": 0}
    if mine:
        worker = make_worker(state.device)
        bar = progress_bar(total=len(mine), unit="img", desc=f"{name}[{state.process_index}]", dynamic_ncols=True,
                           disable=not state.is_local_main_process)

        def on_batch(_n, n_tokens):
            stats["tokens"] += n_tokens
            elapsed = max(time.time() - started, 1e-6)
            bar.set_postfix(img_s=f"{stats['images'] / elapsed:.2f}", tok_s=f"{stats['tokens'] / elapsed:.1f}",
                            refresh=live())  # in a log file the rates show with the next timed redraw

        try:  # the bar ends its line even when the job stops, so an error prints on a line of its own
            for start in range(0, len(mine), items_per_part):
                chunk = mine[start:start + items_per_part]
                items, rejects = [], []
                for ref in chunk:
                    try:
                        items.append((ref.id, load(ref)))
                    except ImageRejected as err:
                        rejects.append({"id": ref.id, "status": "rejected", "reason": str(err),
                                        "path": getattr(ref, "path", None), "row": getattr(ref, "row", None)})
                rows, drops = worker(items, on_batch) if items else ([], [])
                store.write_rows(rows, features)
                store.log(rejects + drops)
                stats["images"] += len(chunk)
                stats["rows"] += len(rows)
                bar.update(len(chunk))
                on_batch(0, 0)
        finally:
            bar.close()
    elapsed = time.time() - started
    state.wait_for_everyone()
    run_stats = gather_object([{**stats, "rank": state.process_index, "seconds": elapsed}])
    if not state.is_main_process:
        return None
    return JobResult(store, run_stats, len(done))
