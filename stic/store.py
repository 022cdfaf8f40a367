"""The output folder of a resumable, sharded generation job.

Layout (OUT is what `datasets.load_dataset("parquet", data_dir=OUT)` reads):

    OUT/run_config.json             what produced the data; a rerun with another config is refused
    OUT/data/train-<run>-r<rank>-<n>.parquet
                                    rows, each part renamed into place whole (atomic); the "train" prefix
                                    is what the parquet loader keys its split on, so it skips the JSON files
    OUT/.ledger/<run>-r<rank>.jsonl items finished without a row (dropped pairs, unreadable images)
    OUT/manifest.json               counts, timings, rejects (written by the main process at the end)

An item is done when its id is in a part file or in a ledger. Rows are written before their ledger lines,
so a crash between the two at worst repeats the ledger's items, never a row. Each process of an
`accelerate launch` run writes its own parts and ledger, so nothing is shared between writers.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable

import pyarrow.parquet as pq


class OutputConflict(RuntimeError):
    """The output folder holds a run made with a different configuration."""


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


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
        """Create or check the folder. Returns True when earlier work is being resumed."""
        config_path = self.root / "run_config.json"
        resumed = False
        if config_path.exists():
            old = json.loads(config_path.read_text())
            if _canonical(old) != _canonical(run_config) and not overwrite:
                a, b = _flatten(old), _flatten(run_config)
                changed = sorted(k for k in set(a) | set(b) if _canonical(a.get(k)) != _canonical(b.get(k)))
                raise OutputConflict(
                    f"{self.root} already holds a run made with a different configuration (differs in: "
                    f"{', '.join(changed)}). Use another output directory, or pass --overwrite to delete it and "
                    "start over."
                )
            resumed = not overwrite
        if overwrite:
            for name in ("data", ".ledger", ".tmp", "manifest.json", "rejects.jsonl", "preview.html",
                         "run_config.json"):
                path = self.root / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)  # half-written parts of a killed run
        for d in (self.data_dir, self.ledger_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        config_path.write_text(json.dumps(run_config, indent=2, sort_keys=True, default=str) + "\n")
        return resumed

    # -- reading ----------------------------------------------------------------------------------------

    def part_files(self) -> list[Path]:
        return sorted(self.data_dir.glob("*.parquet")) if self.data_dir.exists() else []

    def row_ids(self, id_column: str) -> list[str]:
        ids: list[str] = []
        for part in self.part_files():
            ids.extend(pq.read_table(part, columns=[id_column]).column(id_column).to_pylist())
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
