"""The reports the stages write next to their outputs, for people and for the tools that read them back.

- selfgen:     manifest.json (counts, timings), rejects.jsonl, preview.html (a few pairs side by side)
- dpo, infuse: run_summary.json, log_history.json, training_curves.png
- infuse:      skipped_records.jsonl, infused_samples.jsonl
- eval:        summary.json and results.md of a run; `stic compare`'s table and bar chart

The stage modules call these once their work is done. This module imports no stage module (the stages import
it): it reads the recipe and config objects it is handed by attribute only.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from stic.config import to_dict
from stic.errors import SticError
from stic.locks import output_lock

if TYPE_CHECKING:
    from stic.store import ShardedOutput


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    with open(path, "w") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------------------
# selfgen


def write_selfgen_manifest(store: ShardedOutput, recipe, refs, run_stats: list[dict], resumed_from: int,
                           id_column: str, row_id_column: str | None = None) -> dict:
    """manifest.json, rejects.jsonl and preview.html of a selfgen output folder; returns the manifest. `id_column`
    names a row's image, `row_id_column` the row itself where an image gives several rows (self-questioning)."""
    import pyarrow.parquet as pq

    ids = store.row_ids(id_column)
    row_ids = store.row_ids(row_id_column) if row_id_column and row_id_column != id_column else ids
    branches: Counter = Counter()
    finish: Counter = Counter()
    for part in store.part_files():
        table = pq.read_table(part, columns=["rejected_branch", "chosen_finish_reason"])
        branches.update(table.column("rejected_branch").to_pylist())
        finish.update(table.column("chosen_finish_reason").to_pylist())
    ledger = store.ledger()
    rejects = [e for e in ledger if e["status"] == "rejected"]
    dropped = dict(Counter(e["reason"] for e in ledger if e["status"] == "dropped"))
    write_jsonl(store.root / "rejects.jsonl", ({"id": e["id"], "path": e.get("path"), "row": e.get("row"),
                                                "reason": e["reason"]} for e in rejects))
    wall = max((s["seconds"] for s in run_stats), default=0.0)
    this_images = sum(s["images"] for s in run_stats)
    this_tokens = sum(s["tokens"] for s in run_stats)
    manifest = {
        "stage": "selfgen",
        "config": {"model": to_dict(recipe.model), "selfgen": to_dict(recipe.selfgen)},
        "counts": {
            "images_in_source": len(refs),
            "rows": len(ids),
            "duplicate_rows": len(row_ids) - len(set(row_ids)),
            "rejected_images": len(rejects),
            "dropped_pairs": dropped,
            "rejected_branch": dict(branches),
            "chosen_finish_reason": dict(finish),
            "images_remaining": len({r.id for r in refs} - set(ids) - {e["id"] for e in ledger}),
        },
        "last_run": {
            "processes": len(run_stats),
            "already_done_at_start": resumed_from,
            "images_processed": this_images,
            "seconds": round(wall, 2),
            "images_per_second": round(this_images / wall, 3) if wall else None,
            "generated_tokens": this_tokens,
            "tokens_per_second": round(this_tokens / wall, 1) if wall else None,
        },
        "rejects_file": "rejects.jsonl",
        "data_files": [p.relative_to(store.root).as_posix() for p in store.part_files()],
    }
    (store.root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    write_preview(store, recipe.selfgen.preview_pairs, id_column)
    c = manifest["counts"]
    print(f"selfgen: {c['rows']} pairs in {store.root} ({c['rejected_images']} images rejected, "
          f"{sum(dropped.values())} pairs dropped); last run {this_images} images in {wall:.1f}s, "
          f"{manifest['last_run']['tokens_per_second']} tok/s")
    return manifest


def write_preview(store: ShardedOutput, n: int, id_column: str) -> None:
    """preview.html: a few pairs side by side, with the corrupted image the rejected answer was made from."""
    import pyarrow.parquet as pq
    from PIL import Image

    from corruptions import corrupt

    cards = []
    for part in store.part_files():
        if len(cards) >= n:
            break
        for row in pq.read_table(part).slice(0, n - len(cards)).to_pylist():
            image = Image.open(io.BytesIO(row["images"][0]["bytes"])).convert("RGB")
            shown = [("clean image", image)]
            if row["corruption_params"]:  # rebuilt from its record: the corrupted image itself is not stored
                rec = json.loads(row["corruption_params"])
                role = "grounding reference" if row["rejected_branch"] == "grounding" else "rejected's input"
                shown.append((f"{rec['kind']} ({role})", corrupt(image, rec["kind"], rec["seed"],
                                                                           **rec["settings"])[0]))
            imgs = "".join(f"<figure><img src='data:image/jpeg;base64,{_thumb(im)}'><figcaption>{html.escape(t)}"
                           f"</figcaption></figure>" for t, im in shown)
            e = html.escape
            cards.append(
                f"<section><h2>{e(row[id_column])} <small>rejected via {e(row['rejected_branch'])}</small></h2>"
                f"<div class=imgs>{imgs}</div><p class=prompt><b>Prompt x:</b> {e(row['caption_prompt'])}</p>"
                f"<div class=pair><div class=chosen><h3>chosen ({e(row['chosen_finish_reason'])})</h3>"
                f"<details class=prompt><summary>step-by-step prompt</summary>{e(row['chosen_prompt'])}</details>"
                f"<p>{e(row['chosen'][0]['content'])}</p></div><div class=rejected><h3>rejected "
                f"({e(row['rejected_finish_reason'])})</h3><p class=prompt>{e(row['rejected_prompt'])}</p>"
                f"<p>{e(row['rejected'][0]['content'])}</p></div></div>{_candidates_html(row.get('candidates'))}"
                "</section>"
            )
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}section{border-bottom:1px solid #ccc;"
             "padding:8px}.imgs{display:flex;gap:8px}img{max-height:180px}.pair{display:flex;gap:12px}"
             ".pair>div{flex:1;padding:6px}.chosen{background:#eefbea}.rejected{background:#fdecec}"
             ".prompt{color:#555;font-size:90%}figure{margin:0}table.cands{border-collapse:collapse;font-size:90%}"
             ".cands td{border-top:1px solid #ddd;padding:3px 6px;vertical-align:top}.cands ul{margin:0}")
    (store.root / "preview.html").write_text(
        f"<!doctype html><meta charset=utf-8><title>STIC preference pairs</title><style>{style}</style>"
        f"<h1>STIC preference pairs ({len(cards)} shown)</h1>{''.join(cards)}"
    )


def _candidates_html(candidates: list[dict] | None) -> str:
    """On-policy pairs (stic/onpolicy.py): every sampled answer with its score and what the score is made of."""
    if not candidates:
        return ""
    e = html.escape
    rows = []
    for c in candidates:
        parts = json.loads(c["parts"] or "{}")
        totals = ", ".join(f"{k} {v}" for k, v in parts.items() if k != "claims")
        claims = "".join(
            f"<li>{e(p['claim'])}: " + (f"margin {p['margin']:+.4f}" if "margin" in p else
                                        f"{'yes' if p['affirmed'] else 'not affirmed'} ({e(p['answer'])})") + "</li>"
            for p in parts.get("claims", []))
        score = "unscored" if c["score"] is None else f"{c['score']:+.4f}"
        rows.append(f"<tr class='{e(c['role'])}'><td>{e(c['role']) or '&nbsp;'}</td><td>{score}</td>"
                    f"<td>{e(c['text'])}<div class=prompt>{e(totals)}</div><ul>{claims}</ul></td></tr>")
    return (f"<details open><summary>{len(candidates)} candidates, scored without labels</summary>"
            f"<table class=cands><tr><th>role</th><th>score</th><th>answer, and the parts of its score</th></tr>"
            f"{''.join(rows)}</table></details>")


def _thumb(image) -> str:
    """A small JPEG as base64, so preview.html is one self-contained file."""
    image = image.copy()
    image.thumbnail((256, 256))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode()


# ---------------------------------------------------------------------------------------------------------
# Training stages (dpo, infuse)

# (panel title, log keys drawn in it)
PREFERENCE_PANELS = (("loss", ("loss",)), ("reward margin", ("rewards/margins",)),
                     ("reward accuracy", ("rewards/accuracies",)), ("log-probs", ("logps/chosen", "logps/rejected")))
SFT_LOSS_PANELS = (("stage 2 SFT loss", ("loss",)),)
# log p(answer | image) - log p(answer | blank image) on stage 1's probe batch: is the model learning to look?
IMAGE_MARGIN_PANEL = ("image-use margin (nats)", ("image_margin/chosen", "image_margin/rejected"))


def train_logs(history: list[dict]) -> list[dict]:
    """The Trainer's per-step training records (not its eval or end-of-training records)."""
    return [h for h in history if "loss" in h and "step" in h]


def plot_training_curves(history: list[dict], path: Path, panels=PREFERENCE_PANELS,
                         figsize: tuple[float, float] = (16, 3.6)) -> Path:
    """One panel per (title, keys) entry, each key a curve over the training steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = train_logs(history)
    fig, axes = plt.subplots(1, len(panels), figsize=figsize, squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            pts = [(h["step"], h[key]) for h in logs if key in h]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None, label=key.split("/")[-1])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1 and ax.lines:  # SFT-only runs have no log-prob curves
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_training_report(out_dir: Path, summary: dict, history: list[dict], panels=None,
                          figsize: tuple[float, float] = (16, 3.6)) -> dict:
    """log_history.json, training_curves.png (when `panels` are given; its path goes into the summary) and
    run_summary.json. The log is written first, so a failed plot still leaves it."""
    (out_dir / "log_history.json").write_text(json.dumps(history, indent=1) + "\n")
    if panels:
        summary["plot"] = str(plot_training_curves(history, out_dir / "training_curves.png", panels, figsize))
    (out_dir / "run_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def projector_record(cfg) -> dict:
    """Whether a training stage trains the projector, and at which learning rate."""
    if not cfg.train_projector:
        return {"trained": False}
    return {"trained": True, "lr": cfg.mm_projector_lr if cfg.mm_projector_lr is not None else cfg.learning_rate}


def vision_lora_record(cfg) -> dict:
    """Whether a training stage trains LoRA on the vision encoder (lora_vision), at which rank and alpha."""
    if not getattr(cfg, "lora_vision", False):
        return {"trained": False}
    if getattr(cfg, "adapter_mode", None) == "continue":
        return {"trained": True, "adapter": "the stage-1 adapter's, continued"}
    return {"trained": True, "r": cfg.lora_vision_r, "alpha": cfg.lora_vision_alpha,
            "target_modules": cfg.lora_vision_target_modules or "every linear layer of the vision encoder"}


def distributed_record(trainer) -> dict:
    """What run_summary.json says of the processes: the strategy accelerate ran (MULTI_GPU/MULTI_CPU = DDP, FSDP,
    DEEPSPEED, NO) and, under DDP, find_unused_parameters as the DDP wrapper holds it."""
    from torch.nn.parallel import DistributedDataParallel

    wrapped = getattr(trainer, "model_wrapped", None)
    kind = trainer.accelerator.distributed_type
    return {"distributed_type": getattr(kind, "value", str(kind)), "processes": trainer.accelerator.num_processes,
            "ddp_find_unused_parameters": (wrapped.find_unused_parameters
                                           if isinstance(wrapped, DistributedDataParallel) else None),
            "find_unused_from": getattr(trainer, "find_unused_source", None)}


def write_dpo_report(recipe, trainer, result, rows: int, mean_chosen_tokens: float, seconds: float, resumed_from,
                     setup: dict | None = None) -> dict:
    """run_summary.json, log_history.json and training_curves.png of a finished dpo run; returns the summary.
    `setup` is what the stage settled before training (batch, projector, paper_alpha, max_length check)."""
    import torch

    cfg = recipe.dpo
    out = Path(cfg.output_dir)
    history = trainer.state.log_history
    logs = train_logs(history)
    summary = {
        "stage": "dpo",
        "mode": cfg.mode,
        "model": to_dict(recipe.model),
        "dataset": {"source": cfg.dataset, "rows": rows, "mean_chosen_tokens": round(mean_chosen_tokens, 1)},
        "loss": {"loss_type": cfg.loss_type, "loss_weights": cfg.loss_weights, "beta": cfg.beta,
                 "sft_weight": cfg.sft_weight, "paper_alpha": cfg.paper_alpha,
                 "paper_alpha_equivalent": (round(cfg.sft_weight * 1024 / mean_chosen_tokens, 4)
                                            if cfg.sft_weight and mean_chosen_tokens else None)},
        **(setup or {}),
        "adapter": cfg.use_peft,
        "processes": trainer.accelerator.num_processes,
        "distributed": distributed_record(trainer),
        "global_step": trainer.state.global_step,
        "resumed_from": resumed_from,
        "train_metrics": result.metrics,
        "first_log": logs[0] if logs else None,
        "last_log": logs[-1] if logs else None,
        "seconds": round(seconds, 1),
        "peak_gpu_memory_gib": (round(torch.cuda.max_memory_allocated() / 2**30, 2)
                                if torch.cuda.is_available() else None),
        "output_dir": str(out),
    }
    panels = PREFERENCE_PANELS + ((IMAGE_MARGIN_PANEL,) if any("image_margin/chosen" in h for h in logs) else ())
    write_training_report(out, summary, history, panels if cfg.plot and logs else None,
                          figsize=(4 * len(panels), 3.6))
    print(f"dpo: {trainer.state.global_step} steps in {seconds:.0f}s; saved to {out}")
    return summary


def skip_reasons(skipped: list[dict]) -> Counter:
    """Skipped instruction records by reason; the missing-image reasons, each naming its file, count as one."""
    return Counter("missing image file" if s["reason"].startswith("missing image") else s["reason"]
                   for s in skipped)


def write_infused_data_report(out_dir: Path, skipped: list[dict], train_set, samples: int = 20,
                              subset: dict | None = None) -> None:
    """skipped_records.jsonl (every record left out, with its reason), infused_samples.jsonl (the first
    infused records, to read what stage 2 trains on) and, given, subset.json (the chosen subset's composition and
    yes/no balance), all written before training starts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if subset is not None:
        (out_dir / "subset.json").write_text(json.dumps(subset, indent=2) + "\n")
    write_jsonl(out_dir / "skipped_records.jsonl", skipped)
    write_jsonl(out_dir / "infused_samples.jsonl", ({"id": row["id"], "messages": row["messages"]}
                                                    for row in train_set.select(range(min(samples, len(train_set))))))


def write_infuse_report(cfg, model_cfg, trainer, result, *, usable_records: int, skipped: list[dict],
                        subset: list[dict], undescribed: list[str], trained_records: int, batch: dict,
                        length_check: dict | None, seconds: float, precision: dict | None = None,
                        yes_no: dict | None = None) -> dict:
    """run_summary.json, log_history.json and training_curves.png of a finished infuse-sft run; returns the
    summary. `model_cfg` is the stage-1 model the run trained on; `yes_no` the subset's yes/no record counts before
    and after subset.yes_no_ratio (stic.instructions.select_subset)."""
    from stic.instructions import composition

    out = Path(cfg.output_dir)
    summary = {
        "stage": "infuse_sft",
        "model": to_dict(model_cfg),
        "stage1_adapter": cfg.stage1_adapter,
        "adapter_mode": cfg.adapter_mode,
        "data": {"source": cfg.data.path, "usable_records": usable_records, "skipped_records": len(skipped),
                 "skipped_by_reason": dict(skip_reasons(skipped))},
        "subset": {**to_dict(cfg.subset), "composition": composition(subset),
                   **({"yes_no": yes_no} if yes_no is not None else {})},
        "descriptions": {"images": len({r["image"] for r in subset if r["image"]}),
                         "records_without_description": undescribed},
        "trained_records": trained_records,
        "template": cfg.template,
        "processes": trainer.accelerator.num_processes,
        "distributed": distributed_record(trainer),
        "batch": batch,
        "max_length_check": length_check,
        "projector": projector_record(cfg),
        "vision_lora": vision_lora_record(cfg),
        "precision": precision,
        "global_step": trainer.state.global_step,
        "train_metrics": result.metrics,
        "seconds": round(seconds, 1),
    }
    write_training_report(out, summary, trainer.state.log_history, SFT_LOSS_PANELS if cfg.plot else None,
                          figsize=(5, 3.4))
    print(f"infuse-sft: {trained_records} records, {trainer.state.global_step} steps; saved to {out}")
    return summary


# ---------------------------------------------------------------------------------------------------------
# eval: summaries, tables and charts


def benchmark_summary(headline: str, scores: dict) -> dict:
    """A benchmark's entry in summary.json: its headline value and its scalar metrics."""
    entry = {"headline": headline, "value": scores["metrics"].get(headline),
             "metrics": {k: v for k, v in scores["metrics"].items() if not isinstance(v, dict)}}
    if "judge" in scores:  # judged benchmarks: the judge model, the rule file's digest, comparable or not
        entry["judge"] = scores["judge"]
    return entry


class SummaryFileError(SticError, ValueError):
    """A run's summary.json cannot be read, so this eval cannot be merged into it."""


# What an entry of summary.json was made with (its `settings`). Runs accumulate: each eval of a run name merges its
# entries into the run's summary, and an entry kept from an earlier eval whose settings differ from the latest
# eval's is flagged (†) in results.md and `stic compare`, never mixed in silently.
SETTING_KEYS = ("model", "adapters", "precision", "dar", "recipe_digest")


def settings_conflicts(made_with: dict | None, expected: dict) -> dict:
    """{setting: [the entry's value, the latest eval's]} for each setting that differs; settings the latest eval
    does not know (None, e.g. the precision when it loaded no model) are not compared."""
    if made_with is None:
        return {"settings": ["not recorded", "recorded"]}
    return {k: [made_with.get(k), expected[k]] for k in SETTING_KEYS
            if expected.get(k) is not None and made_with.get(k) != expected[k]}


def merge_eval_summary(old: dict | None, new: dict, expected: Callable[[str], dict]) -> dict:
    """The run's summary after an eval: the earlier entries, each replaced by this eval's entry of its benchmark (a
    benchmark skipped this time keeps its earlier entry). Each entry kept from an earlier eval is checked against
    `expected(benchmark)`, the settings this eval would have made it with: the differences go into its
    `conflicts`. The run's own keys (model, adapters, precision) are this eval's."""
    earlier = (old or {}).get("benchmarks", {})
    entries = {}
    for name in dict.fromkeys([*earlier, *new["benchmarks"]]):
        entry = new["benchmarks"].get(name)
        if name not in new["benchmarks"] or (name in earlier and "skipped" in (entry or {})):  # a skip: no answers
            entry = {k: v for k, v in earlier[name].items() if k != "conflicts"}  # checked against this eval
            found = {} if "skipped" in entry else settings_conflicts(entry.get("settings"), expected(name))
            if found:
                entry["conflicts"] = found
        entries[name] = entry
    return {**(old or {}), **new, "benchmarks": entries}


def write_atomically(path: Path, text: str) -> None:
    """Write through a temporary file and a rename, so that a reader (or a killed writer) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_eval_summary(run_dir: Path, summary: dict) -> None:
    """summary.json and results.md of an eval run, each written atomically; prints the table."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(run_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    table = results_table([summary])
    write_atomically(run_dir / "results.md", table)
    print(table)


def read_eval_summary(run_dir: Path) -> dict | None:
    """A run's summary.json, or None when it has none yet."""
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SummaryFileError(f"{path} is not valid JSON ({err.msg}); move it away to start the run's summary "
                               "afresh (each benchmark's predictions.jsonl and scores.json are kept)") from None


def record_eval_summary(run_dir: Path, summary: dict, expected: Callable[[str], dict]) -> dict:
    """Merge this eval's summary into the run's summary.json (merge_eval_summary) under the run folder's lock, so
    that two evals of one run name finishing together both land; writes results.md, prints the table and a warning
    per entry made with other settings, and returns the merged summary."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with output_lock(run_dir, wait_s=60):
        merged = merge_eval_summary(read_eval_summary(run_dir), summary, expected)
        write_eval_summary(run_dir, merged)
    for name, entry in merged["benchmarks"].items():
        if entry.get("conflicts"):
            print(f"warning: {merged['run']}: {name}'s result was made with other settings than this eval "
                  f"({_conflict_text(entry['conflicts'])}); it is marked † until it is evaluated again")
    return merged


def eval_closing_line(run_dir: Path, summary: dict) -> str:
    """The eval's last printed line: what it scored, and the items whose image could not be read (each scored as
    an empty answer; predictions.jsonl gives the reason under `error`)."""
    scored = [n for n, e in summary["benchmarks"].items() if e and "skipped" not in e]
    line = f"eval {summary['run']}: scored {', '.join(scored) or 'nothing'} into {run_dir / 'summary.json'}"
    unread = {n: summary["benchmarks"][n]["unreadable_images"] for n in scored
              if (summary["benchmarks"][n].get("unreadable_images") or {}).get("count")}
    if not unread:
        return line + ("; every image was read" if scored else "")
    named = "; ".join(f"{n} {u['count']} ({', '.join(map(str, u['ids']))}"
                      f"{', …' if u['count'] > len(u['ids']) else ''})" for n, u in unread.items())
    count = sum(u["count"] for u in unread.values())
    return line + f"; {count} item(s) had an unreadable image and were scored as empty answers: {named}"


def _conflict_text(conflicts: dict) -> str:
    return ", ".join(f"{k}: {a} (now {b})" for k, (a, b) in conflicts.items())


def _cell(entry: dict | None) -> float | None:
    """An entry's headline score as the table shows it (rates in %); None when it has none."""
    if not entry or entry.get("value") is None:
        return None
    return 100 * entry["value"] if entry.get("headline") in ("accuracy", "f1", "hallucination_rate") else entry["value"]


def _shown(entry: dict | None) -> str:
    """A table cell: the score (0.0 included, † when made with other settings than the run's latest eval), or why
    there is none: not run, skipped, or the status an entry gives (e.g. awaiting a judge)."""
    value = _cell(entry)
    if value is not None:
        return f"{value:.1f}" + (" †" if entry.get("conflicts") else "")
    if entry is None:
        return "not run"
    if entry.get("status"):
        return str(entry["status"])
    return "skipped" if "skipped" in entry else "no score"


def _table_names(summaries: list[dict]) -> list[str]:
    """The benchmarks the runs have, in registry order; names no imported plugin registered (`stic compare` does
    not read the runs' recipes) follow in the order the runs list them."""
    from stic.benchmarks import BENCHMARKS

    order = list(BENCHMARKS)
    names = dict.fromkeys(n for s in summaries for n in s["benchmarks"])
    return sorted(names, key=lambda n: order.index(n) if n in order else len(order))


def higher_is_better(name: str, summaries: list[dict]) -> bool | None:
    """A benchmark's headline direction: as its entries recorded it, else as its registration says; None when
    neither knows (a plugin `stic compare` did not import, in a summary written before directions were recorded)."""
    from stic.benchmarks import BENCHMARKS

    recorded = {s["benchmarks"][name]["higher_is_better"] for s in summaries
                if "higher_is_better" in (s["benchmarks"].get(name) or {})}
    if not recorded and name in BENCHMARKS:
        recorded = {BENCHMARKS[name].higher_is_better}
    return recorded.pop() if len(recorded) == 1 else None


def _heading(name: str, direction: bool | None) -> str:
    return f"{name} ↓" if direction is False else name


def results_table(summaries: list[dict]) -> str:
    """A markdown table, one row per run, one column per benchmark (its headline metric, in %; ↓ marks a
    lower-is-better one), plus the average over the benchmarks every run has when their metrics all point one way.
    Notes under it say why there is no average and which entries were made with other settings (†)."""
    names = _table_names(summaries)
    directions = {n: higher_is_better(n, summaries) for n in names}
    common = [n for n in names if all(_cell(s["benchmarks"].get(n)) is not None for s in summaries)]
    ways = {directions[n] for n in common}
    averaged = len(ways) == 1 and None not in ways
    head = ("| run | " + " | ".join(_heading(n, directions[n]) for n in names) + " | "
            + _heading("average", ways.pop() if averaged else None) + " |\n|---|" + "---|" * (len(names) + 1) + "\n")
    lines, notes = [], []
    for s in summaries:
        cells = [_shown(s["benchmarks"].get(n)) for n in names]
        avg = [_cell(s["benchmarks"][n]) for n in common] if averaged else []
        tail = f" | {sum(avg) / len(avg):.1f} |" if avg else " | – |"
        lines.append(f"| {s['run']} | " + " | ".join(cells) + tail)
        notes += [f"† {s['run']}/{n} was made with other settings than the run's latest eval: "
                  f"{_conflict_text(s['benchmarks'][n]['conflicts'])}"
                  for n in names if (s["benchmarks"].get(n) or {}).get("conflicts")]
    if common and not averaged:
        lower = [n for n in common if directions[n] is False]
        unknown = [n for n in common if directions[n] is None]
        why = ([f"lower is better for {', '.join(lower)}, higher for the others"] if lower else []) + (
            [f"no recorded direction for {', '.join(unknown)}"] if unknown else [])
        notes.insert(0, f"no average: {'; '.join(why)}")
    return (head + "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")
            + judge_notes(summaries))


def judge_notes(summaries: list[dict]) -> str:
    """Lines under a results table naming the judged scores that cannot be compared with published ones (the
    toolkit's own judge wording, the mock judge), so that no such number stands unlabelled."""
    notes: dict[tuple[str, str], list[str]] = {}
    for s in summaries:
        for name, entry in s["benchmarks"].items():
            note = ((entry or {}).get("judge") or {}).get("note")
            if note:
                notes.setdefault((name, note), []).append(s["run"])
    lines = "".join(f"- {name} ({', '.join(runs)}): {note}\n" for (name, note), runs in notes.items())
    return "\n" + lines if lines else ""


def compare_runs(run_dirs: list[str], out_png: str | None = None) -> str:
    """The results table of several eval runs (their summary.json files), and with `out_png` a bar chart."""
    summaries = []
    for d in run_dirs:
        path = Path(d) / "summary.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: pass run folders written by eval/run.py")
        summaries.append(json.loads(path.read_text()))
    table = results_table(summaries)
    if out_png:
        plot_comparison(summaries, out_png)
    warning = precision_warning(summaries)
    return f"{warning}\n\n{table}" if warning else table


def precision_warning(summaries: list[dict]) -> str | None:
    """A line when the runs were evaluated in different precisions (or some without a record): the switch from
    bf16 to float32 alone moves the logits by more than a stage-1 update does."""
    dtypes = {s["run"]: (s.get("precision") or {}).get("dtype", "unrecorded") for s in summaries}
    if len(set(dtypes.values())) <= 1:
        return None
    listed = ", ".join(f"{run}: {dtype}" for run, dtype in dtypes.items())
    return (f"warning: these runs were evaluated in different precisions ({listed}); their differences mix the "
            "training's effect with rounding. Rerun them in one precision (model.merged_dtype) to compare.")


def plot_comparison(summaries: list[dict], out_png: str) -> list[tuple[str, str, float]]:
    """Grouped bars: one group per benchmark some run has a score for, one bar per run that has one, labelled with
    its value (so a 0 shows as 0.0); a run without a score gets its reason ('not run', a status) written where its
    bar would be. Returns the bars as drawn: (benchmark, run, height)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in _table_names(summaries) if any(_cell(s["benchmarks"].get(n)) is not None
                                                        for s in summaries)]
    width = 0.8 / max(1, len(summaries))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(names) + 2), 4))
    drawn = []
    for k, s in enumerate(summaries):
        scored = [(i, n, _cell(s["benchmarks"].get(n))) for i, n in enumerate(names)]
        has = [(i, n, v) for i, n, v in scored if v is not None]
        bars = ax.bar([i + k * width for i, _, _ in has], [v for _, _, v in has], width, label=s["run"], color=f"C{k}")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        drawn += [(n, s["run"], patch.get_height()) for (_, n, _), patch in zip(has, bars.patches)]
        for i, n, v in scored:
            if v is None:  # no bar: say why, so that it does not read as a 0
                ax.text(i + k * width, 0, _shown(s["benchmarks"].get(n)), rotation=90, ha="center", va="bottom",
                        fontsize=7, color="gray")
    ax.set_xticks([i + width * (len(summaries) - 1) / 2 for i in range(len(names))],
                  [_heading(n, higher_is_better(n, summaries)) for n in names])
    ax.set_ylabel("score (%)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return drawn
