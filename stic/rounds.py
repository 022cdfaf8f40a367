"""`stic rounds`: STIC repeated. Each round makes preference pairs with the previous round's merged model (round 1:
the recipe's base), trains stage 1 on them, evaluates the result on the chosen benchmarks, and merges it into a
standalone model folder: the next round's generator.

    stic rounds --recipe recipes/X.yaml [--rounds N] [rounds.key=value ...]
    accelerate launch -m stic rounds --recipe ...     (selfgen, dpo and eval share the processes as their commands do)

Under rounds.output_dir:
    round-<k>/selfgen    the pairs (the round's selfgen.output_dir)
    round-<k>/selfgen-<i>   the pairs of rounds.extra_selfgen's constructions (i = 2, 3, ...), by the same model
    round-<k>/dpo        the stage-1 adapter (dpo.output_dir, trained on round-<k>/selfgen and any selfgen-<i>)
    round-<k>/eval       eval runs (eval.output_dir): `stage1`, the adapter on the round's base; round 1 also `base`
    round-<k>/merged     base + adapter, stored in the model's dtype if the update survives it, else in float32
    rounds_state.json    the finished steps and what each made, rewritten atomically after each step
    rounds.md, rounds.json, rounds.png    the table of rounds (with which model made which data) and the metric

A rerun resumes: the finished steps are skipped and an unfinished one resumes through its stage's own resume
(selfgen's and eval's written parts, dpo's last complete checkpoint). The rounds stop early when a round does not
beat the best earlier value of rounds.metric by more than rounds.min_improvement; that round is merged only if
it is still the best so far.

Processes: every process runs selfgen, dpo and eval (each shards its work as its own command does); the main
process alone merges and writes the state, and a barrier after each step lets the others read it.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import os
from pathlib import Path

from stic.benchmarks import check_known, get_benchmark
from stic.config import RecipeError, plain, with_changes
from stic.errors import SticError
from stic.locks import main_process_lock
from stic.recipe import Recipe, parse_recipe
from stic.report import write_atomically
from stic.store import check_output_dir, digest
from stic.training import is_main_rank

STEPS = ("selfgen", "dpo", "eval", "merge")
STATE_FILE = "rounds_state.json"
# the sections whose settings decide what the rounds make: a rerun with other ones would mix two experiments
DECIDING_SECTIONS = ("model", "generation", "selfgen", "dpo", "eval")


class RoundsStateError(SticError, ValueError):
    """The rounds folder holds a run of another recipe, or a state file that cannot be read."""


def round_dir(out: Path, k: int) -> Path:
    return out / f"round-{k}"


def _section(data: dict, name: str) -> dict:
    data[name] = dict(data.get(name) or {})
    return data[name]


def extra_selfgen(data: dict) -> list[dict]:
    """rounds.extra_selfgen of a recipe mapping: the further pair constructions each round makes."""
    return plain((data.get("rounds") or {}).get("extra_selfgen") or [])


def construction(recipe: Recipe) -> dict:
    """What decides a selfgen run's pairs: its section without the folder it writes."""
    from stic.config import to_dict

    return {key: value for key, value in to_dict(recipe.selfgen).items() if key != "output_dir"}


def pair_folders(data: dict, out: Path, k: int) -> list[Path]:
    """Round k's selfgen folders: the recipe's construction, then each of rounds.extra_selfgen's."""
    r = round_dir(out, k)
    return [r / "selfgen"] + [r / f"selfgen-{i}" for i in range(2, 2 + len(extra_selfgen(data)))]


def round_data(data: dict, out: Path, k: int, benchmarks: list[str], model: dict | None = None) -> dict:
    """The recipe mapping of round k: every stage's folder inside round-<k>, eval on the chosen benchmarks, and
    `model` (from round 2 on: the previous round's merged folder, in the dtype it was stored in) as the base."""
    d = copy.deepcopy(data)
    r = round_dir(out, k)
    _section(d, "selfgen")["output_dir"] = str(r / "selfgen")
    folders = [str(f) for f in pair_folders(data, out, k)]
    # the stage's own resume, when a killed run left checkpoints
    _section(d, "dpo").update(output_dir=str(r / "dpo"), dataset=folders if len(folders) > 1 else folders[0],
                              resume=any((r / "dpo").glob("checkpoint-*")))
    # eval judges the precision of the recipe's stage-1 and stage-2 adapters: this round's alone
    stage2 = _section(d, "infuse_sft")
    stage2.pop("stage1_model", None)
    stage2.update(stage1_adapter=str(r / "dpo"), output_dir=str(r / "infuse_sft"))
    _section(d, "eval").update(output_dir=str(r / "eval"), benchmarks=list(benchmarks))
    if model:
        _section(d, "model").update(model)
    return d


# ---------------------------------------------------------------------------------------------------------
# What made what: digests of model and adapter folders


def _is_weight_or_config(path: Path) -> bool:
    if path.name in ("config.json", "adapter_config.json"):
        return True
    return path.suffix == ".safetensors" or (path.suffix == ".bin" and path.name != "training_args.bin")


def folder_digest(folder: str | os.PathLike) -> str | None:
    """sha256 of a model or adapter folder's weights and configs (its top-level *.safetensors, *.bin,
    config.json, adapter_config.json; not the run's logs), or None when it has none."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and _is_weight_or_config(p))
    if not files:
        return None
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def model_identity(name_or_path: str, revision: str | None = None) -> dict:
    """The model a round generated with: its name, its folder and that folder's digest; a hub id not downloaded
    to a folder is named by the commit of its cached snapshot."""
    from stic.models import resolve_model_path

    path = Path(resolve_model_path(name_or_path))  # tiny:<family> is built here when missing
    if path.is_dir():
        return {"model": name_or_path, "path": str(path), "digest": folder_digest(path)}
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
    return {"model": name_or_path, "revision": revision,
            "digest": f"hub commit {Path(cached).parent.name}" if isinstance(cached, str) else None}


# ---------------------------------------------------------------------------------------------------------
# The state file: each finished step, written by the main process after the step


def read_state(out: Path) -> dict:
    path = out / STATE_FILE
    if not path.exists():
        return {"rounds": {}}
    try:
        state = json.loads(path.read_text())
    except ValueError:
        state = None
    if not isinstance(state, dict) or not isinstance(state.get("rounds"), dict):
        raise RoundsStateError(f"{path} is not a rounds state file; move it away to start the rounds again")
    return state


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def recipe_fingerprint(data: dict, out: Path, benchmarks: list[str]) -> dict:
    """A digest per section that decides what the rounds make (the folders `round_data` sets left out)."""
    d = plain(round_data(data, out, 1, benchmarks))
    for section, keys in {"selfgen": ["output_dir"], "dpo": ["output_dir", "dataset", "resume"],
                          "eval": ["output_dir"]}.items():
        for key in keys:
            d[section].pop(key)
    fingerprint = {s: digest(d.get(s) or {}) for s in DECIDING_SECTIONS}
    if extra_selfgen(data):  # the further constructions decide the pairs too (absent: as before they existed)
        fingerprint["selfgen"] = digest({"selfgen": d.get("selfgen") or {}, "extra_selfgen": extra_selfgen(data)})
    return fingerprint


def check_same_recipe(state: dict, fingerprint: dict, out: Path) -> None:
    old = state.get("fingerprint")
    if old is None:
        return
    changed = [s for s in DECIDING_SECTIONS if old.get(s) != fingerprint[s]]
    if changed:
        raise RoundsStateError(
            f"{out} holds rounds of a recipe whose {', '.join(changed)} settings differ from this one's; "
            "rerun with the same recipe to resume, or set another rounds.output_dir")


# ---------------------------------------------------------------------------------------------------------
# The early stop


def metric_series(state: dict, metric: str) -> list[tuple[int, float | None]]:
    """(round, value of the metric) for the evaluated rounds; round 0 is the base, when it was evaluated."""
    rounds = state["rounds"]
    series = []
    base = rounds.get("1", {}).get("eval", {}).get("base_values")
    if base:
        series.append((0, base.get(metric)))
    for k in sorted(map(int, rounds)):
        values = rounds[str(k)].get("eval", {}).get("values")
        if values:
            series.append((k, values.get(metric)))
    return series


def round_gain(state: dict, k: int, metric: str, higher_is_better: bool) -> tuple[float, float, float] | None:
    """(round k's value, the best earlier value, how much k beats it in the metric's direction), or None when either
    is missing."""
    series = dict(metric_series(state, metric))
    current = series.get(k)
    earlier = [v for r, v in series.items() if r < k and v is not None]
    if current is None or not earlier:
        return None
    best = max(earlier) if higher_is_better else min(earlier)
    return current, best, current - best if higher_is_better else best - current


def stop_reason(state: dict, k: int, metric: str, higher_is_better: bool, margin: float | None) -> str | None:
    """Why the rounds stop after round k (it does not beat the best earlier value by more than `margin`), or None."""
    gain = round_gain(state, k, metric, higher_is_better)
    if margin is None or gain is None or gain[2] > margin:
        return None
    return (f"round {k}'s {metric} ({gain[0]:.4g}) does not beat the best earlier value ({gain[1]:.4g}) by more "
            f"than rounds.min_improvement ({margin:g})")


# ---------------------------------------------------------------------------------------------------------
# The command


class Rounds:
    """One `stic rounds` run: its settings, the state, and the steps of each round."""

    def __init__(self, data: dict, count: int | None = None):
        self.data = copy.deepcopy(data)
        checked = parse_recipe(self.data, build=("eval", "rounds"))  # all checked; eval's plugins loaded
        cfg = checked.rounds
        if count is not None and count < 1:
            raise RecipeError(f"--rounds must be at least 1, got {count}")
        self.count = count or cfg.count
        self.benchmarks = list(cfg.benchmarks or checked.eval.benchmarks)
        check_known(self.benchmarks)
        self.metric = cfg.metric or self.benchmarks[0]
        if self.metric not in self.benchmarks:
            raise RecipeError(f"rounds.metric {self.metric} is not one of the benchmarks each round is evaluated on "
                              f"({', '.join(self.benchmarks)})")
        bench = get_benchmark(self.metric)
        judge = checked.eval.judge
        if bench.score is None and not judge.mock and not os.environ.get(judge.base_url_env):
            raise RecipeError(f"rounds.metric {self.metric} is scored by an LLM judge and ${judge.base_url_env} is "
                              "unset: choose a benchmark scored without one, or set the judge")
        if checked.generation.backend != "local":
            raise RecipeError("stic rounds generates with each round's merged model in its own processes; "
                              "generation.backend must be local")
        self.higher_is_better = bench.higher_is_better
        self.margin = cfg.min_improvement
        self.eval_base = cfg.eval_base
        self.base = checked.model
        self.out = Path(cfg.output_dir)
        check_output_dir(self.out, "rounds.output_dir")
        first = round_data(self.data, self.out, 1, self.benchmarks)
        made = {"the recipe's selfgen": construction(parse_recipe(first, build=("selfgen",)))}
        for i, changes in enumerate(extra_selfgen(self.data)):  # each construction's keys checked before any work
            try:
                this = construction(self.extra_recipe(first, i, changes))
            except RecipeError as err:
                raise RecipeError(f"rounds.extra_selfgen[{i}]: {err}") from None
            same = next((name for name, other in made.items() if other == this), None)
            if same:
                raise RecipeError(f"rounds.extra_selfgen[{i}] makes the same pairs as {same}: stage 1 would train "
                                  "on them twice; change a key that decides the pairs, or remove it")
            made[f"rounds.extra_selfgen[{i}]"] = this
        self.main = is_main_rank()

    def run(self) -> dict | None:
        """Run or resume the rounds; returns the report (rounds.json) on the main process."""
        with main_process_lock(self.out, self.main):  # one rounds run at a time writes the folder
            self.state = read_state(self.out)
            fingerprint = recipe_fingerprint(self.data, self.out, self.benchmarks)
            check_same_recipe(self.state, fingerprint, self.out)
            if self.main and "fingerprint" not in self.state:
                self.out.mkdir(parents=True, exist_ok=True)
                self.state["fingerprint"] = fingerprint
                write_atomically(self.out / STATE_FILE, json.dumps(self.state, indent=1) + "\n")
            stopped = None
            for k in range(1, self.count + 1):
                stopped = self.run_round(k)
                if stopped:
                    merged = "merge" in self.state["rounds"][str(k)]
                    self.say(f"rounds: stopped early: {stopped}; round {k} is "
                             + ("merged, being the best so far" if merged else "not merged"))
                    break
            if not self.main:
                return None
            report = write_report(self.out, self.state, self.benchmarks, self.metric, self.higher_is_better,
                                  self.margin, stopped)
            self.say(f"rounds: {len(report['rounds'])} rows in {self.out}/rounds.md, rounds.json, rounds.png")
            return report

    def say(self, line: str) -> None:
        if self.main:
            print(line, flush=True)

    def finish(self, k: int, step: str, record: dict | None) -> None:
        """Record a finished step (the main process's record) and let every process read it."""
        if self.main:
            self.state["rounds"].setdefault(str(k), {})[step] = {"finished": _now(), **(record or {})}
            write_atomically(self.out / STATE_FILE, json.dumps(self.state, indent=1) + "\n")
        from stic.models import process_state

        process_state().wait_for_everyone()
        self.state = read_state(self.out)

    def round_recipe(self, k: int) -> tuple[Recipe, dict | None, dict]:
        """Round k's recipe, the changes to its model section (None in round 1: the recipe's base), and the recipe
        mapping it was parsed from (the further constructions' start)."""
        model = None
        if k > 1:  # the previous round's merged folder, loaded in the precision it was stored in
            from stic.models import merged_folder_config

            merged = self.state["rounds"][str(k - 1)]["merge"]["merged"]
            spec = merged_folder_config(self.base, merged)
            model = {"name_or_path": spec.name_or_path, "dtype": spec.dtype, "load_in_4bit": spec.load_in_4bit,
                     "revision": None}
        data = round_data(self.data, self.out, k, self.benchmarks, model)
        return parse_recipe(data, build=("selfgen", "dpo", "eval", "rounds")), model, data

    def extra_recipe(self, round_mapping: dict, i: int, changes: dict) -> Recipe:
        """The recipe of the round's i-th further construction: its selfgen section with `changes`, written to
        that construction's folder (round_mapping: the round's recipe mapping)."""
        d = copy.deepcopy(round_mapping)
        folder = Path(d["selfgen"]["output_dir"]).parent / f"selfgen-{i + 2}"
        d["selfgen"] = {**with_changes(d["selfgen"], changes), "output_dir": str(folder)}
        return parse_recipe(d, build=("selfgen",))

    def run_round(self, k: int) -> str | None:
        """Round k's unfinished steps; returns why the rounds stop after it, or None."""
        from stic import dpo, evaluate, models, selfgen

        done = self.state["rounds"].get(str(k), {})
        if all(step in done for step in STEPS):  # the stop is decided again: rounds.min_improvement may have changed
            return stop_reason(self.state, k, self.metric, self.higher_is_better, self.margin)
        recipe, model, mapping = self.round_recipe(k)
        r = round_dir(self.out, k)
        folders = [str(f) for f in pair_folders(self.data, self.out, k)]
        if "selfgen" not in done:
            self.say(f"rounds: round {k}/{self.count}: selfgen with {recipe.model.name_or_path}")
            manifests = [selfgen.run_selfgen(recipe)]
            for i, changes in enumerate(extra_selfgen(self.data)):  # the same model, another construction
                self.say(f"rounds: round {k}/{self.count}: selfgen-{i + 2} ({', '.join(sorted(changes))} changed)")
                manifests.append(selfgen.run_selfgen(self.extra_recipe(mapping, i, changes)))
            record = None
            if self.main:
                generator = (self.state["rounds"][str(k - 1)]["merge"]["identity"] if model
                             else model_identity(recipe.model.name_or_path, recipe.model.revision))
                rows = [m["counts"]["rows"] if m else None for m in manifests]
                record = {"generator": generator, "pairs": " + ".join(folders),
                          "rows": None if None in rows else sum(rows)}
                if len(folders) > 1:
                    record["rows_by_folder"] = dict(zip(folders, rows))
            self.finish(k, "selfgen", record)
        if "dpo" not in self.state["rounds"][str(k)]:
            adapter = r / "dpo"
            summary_file = adapter / "run_summary.json"
            if not summary_file.exists():  # else: trained to the end before a kill that came before the state
                self.say(f"rounds: round {k}/{self.count}: stage 1 on {' + '.join(folders)}"
                         + (" (resuming from its last checkpoint)" if recipe.dpo.resume else ""))
                dpo.run_dpo(recipe)
            record = None
            if self.main:
                summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
                record = {"adapter": str(adapter), "digest": folder_digest(adapter),
                          "global_step": summary.get("global_step")}
            self.finish(k, "dpo", record)
        if "eval" not in self.state["rounds"][str(k)]:
            record = {}
            if k == 1 and self.eval_base:
                self.say(f"rounds: round {k}/{self.count}: eval of the base on {', '.join(self.benchmarks)}")
                record["base_values"] = headline_values(evaluate.run_eval(recipe, "base", False, self.benchmarks))
            self.say(f"rounds: round {k}/{self.count}: eval of stage 1 on {', '.join(self.benchmarks)}")
            record["values"] = headline_values(evaluate.run_eval(recipe, "stage1", False, self.benchmarks))
            record["eval"] = str(r / "eval")
            self.finish(k, "eval", record)
        stop = stop_reason(self.state, k, self.metric, self.higher_is_better, self.margin)
        # the round that stops the rounds is merged only if it is still the best so far (by less than the margin)
        best_so_far = (round_gain(self.state, k, self.metric, self.higher_is_better) or (0, 0, 1))[2] > 0
        if (stop is None or best_so_far) and "merge" not in self.state["rounds"][str(k)]:
            record = None
            if self.main:
                self.say(f"rounds: round {k}/{self.count}: merging {r / 'dpo'} into {recipe.model.name_or_path}")
                record = merge_round(models, recipe, r / "dpo", r / "merged")
            self.finish(k, "merge", record)
        return stop


def headline_values(summary: dict | None) -> dict | None:
    """{benchmark: headline value} of an eval summary (the main process's; None elsewhere)."""
    if summary is None:
        return None
    return {name: (entry or {}).get("value") for name, entry in summary["benchmarks"].items()}


def merge_round(models, recipe: Recipe, adapter: Path, merged: Path) -> dict:
    """Merge the round's adapter through `stic merge`'s guard: the model's dtype when the update survives it, else
    float32. A merge of this adapter finished before a kill that came before the state is kept."""
    report_file = merged / models.MERGE_REPORT
    report = json.loads(report_file.read_text()) if report_file.is_file() else None
    if report is None or report.get("adapter") != str(adapter):
        _, report = models.merge_adapter(recipe.model, str(adapter), str(merged), overwrite=True,
                                         fallback_dtype="float32")
    identity = {"model": str(merged), "path": str(merged), "digest": folder_digest(merged)}
    return {"merged": str(merged), "dtype": report["dtype"], "update_error": report.get("error"),
            "requested_dtype": report.get("requested_dtype", report["dtype"]), "identity": identity}


def run_rounds(data: dict, count: int | None = None) -> dict | None:
    """`stic rounds`: the recipe mapping (as `stic.config.load_recipe_dict` reads it) and --rounds."""
    return Rounds(data, count).run()


# ---------------------------------------------------------------------------------------------------------
# The table and the plot


def table_rows(state: dict, benchmarks: list[str]) -> list[dict]:
    """One row per evaluated model: round 0 the base (when evaluated), then each round with what made what."""
    rows = []
    rounds = state["rounds"]
    first = rounds.get("1", {})
    if first.get("eval", {}).get("base_values"):
        rows.append({"round": 0, "model": first.get("selfgen", {}).get("generator"),
                     "values": first["eval"]["base_values"]})
    for k in sorted(map(int, rounds)):
        rec = rounds[str(k)]
        rows.append({"round": k, "generator": rec.get("selfgen", {}).get("generator"),
                     "pairs": rec.get("selfgen", {}).get("pairs"), "rows": rec.get("selfgen", {}).get("rows"),
                     "rows_by_folder": rec.get("selfgen", {}).get("rows_by_folder"),
                     "adapter": rec.get("dpo", {}).get("adapter"), "adapter_digest": rec.get("dpo", {}).get("digest"),
                     "global_step": rec.get("dpo", {}).get("global_step"),
                     "values": rec.get("eval", {}).get("values"),
                     "merged": rec.get("merge", {}).get("merged"), "merged_dtype": rec.get("merge", {}).get("dtype"),
                     "merged_digest": rec.get("merge", {}).get("identity", {}).get("digest"),
                     "steps": [s for s in STEPS if s in rec]})
    return rows


def _short(digest_text: str | None) -> str:
    return digest_text.removeprefix("sha256:")[:12] if digest_text else "–"


def _value(values: dict | None, name: str) -> str:
    v = (values or {}).get(name)
    return "–" if v is None else f"{v:.4g}"


def markdown_table(rows: list[dict], benchmarks: list[str], metric: str) -> str:
    head = ["round", "pairs made by (digest)", "pairs", "stage-1 adapter (steps)",
            *[f"{b}{' (metric)' if b == metric else ''}" for b in benchmarks], "merged (dtype, digest)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if row["round"] == 0:
            model = row["model"] or {}
            cells = ["0 (base)", f"{model.get('model', '–')} ({_short(model.get('digest'))})", "–", "–"]
            cells += [_value(row["values"], b) for b in benchmarks] + ["–"]
        else:
            gen = row["generator"] or {}
            by_folder = row.get("rows_by_folder")
            pairs = (" + ".join(f"{folder} ({'–' if n is None else n})" for folder, n in by_folder.items())
                     if by_folder else row["pairs"] or "–")
            cells = [str(row["round"]), f"{gen.get('model', '–')} ({_short(gen.get('digest'))})",
                     f"{pairs} ({row['rows'] if row['rows'] is not None else '–'} rows)",
                     f"{row['adapter'] or '–'} ({row['global_step'] if row['global_step'] is not None else '–'})"]
            cells += [_value(row["values"], b) for b in benchmarks]
            cells.append(f"{row['merged']} ({row['merged_dtype']}, {_short(row['merged_digest'])})"
                         if row["merged"] else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_metric(series: list[tuple[int, float | None]], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(k, v) for k, v in series if v is not None]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    if points:
        ax.plot([k for k, _ in points], [v for _, v in points], marker="o")
    ax.set_xticks([k for k, _ in series], ["base" if k == 0 else str(k) for k, _ in series])
    ax.set_xlabel("round")
    ax.set_ylabel(f"{metric} ({get_benchmark(metric).headline})")
    ax.set_title(f"{metric} by round")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, state: dict, benchmarks: list[str], metric: str, higher_is_better: bool,
                 margin: float | None, stopped: str | None) -> dict:
    """rounds.md, rounds.json and rounds.png from the state; returns what rounds.json holds."""
    rows = table_rows(state, benchmarks)
    series = metric_series(state, metric)
    scored = [(k, v) for k, v in series if v is not None]
    best = (max if higher_is_better else min)(scored, key=lambda kv: kv[1]) if scored else None
    report = {"metric": metric, "headline": get_benchmark(metric).headline, "higher_is_better": higher_is_better,
              "min_improvement": margin, "stopped_early": stopped, "best_round": best[0] if best else None,
              "benchmarks": benchmarks, "rounds": rows}
    write_atomically(out / "rounds.json", json.dumps(report, indent=1) + "\n")
    foot = (f"\nMetric: {metric} ({report['headline']}, {'higher' if higher_is_better else 'lower'} is better); "
            f"best: {'the base' if best and best[0] == 0 else f'round {best[0]}' if best else '–'}."
            + (f" Stopped early: {stopped}.\n" if stopped else "\n"))
    write_atomically(out / "rounds.md", markdown_table(rows, benchmarks, metric) + foot)
    plot_metric(series, metric, out / "rounds.png")
    return report
