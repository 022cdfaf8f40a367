"""Stage 1 training: DPO with an SFT regulariser on the self-generated pairs, with TRL's DPOTrainer.

The paper's objective (eq. 4.1) is

    L = -log sigmoid(beta * [log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x)]) - alpha * log pi(y_w|x)

`sft_weight` is alpha. It becomes TRL's `loss_type: [sigmoid, sft]` with `loss_weights: [1, alpha]`. TRL's sft
term is the mean negative log-likelihood per chosen token, whereas the paper writes the sequence
log-likelihood and its public code divides the summed log-probability by 1024. With chosen answers of L
tokens on average, the paper's alpha therefore corresponds to sft_weight = alpha * L / 1024 here
(`paper_alpha_to_sft_weight`). The run summary records L for the dataset that was trained on. With
`paper_alpha: a` instead of `sft_weight`, the stage measures L on the dataset when it starts and trains with
sft_weight = a * L / 1024.

Every `DPOConfig` option works in the recipe's `dpo:` section; the stage adds the keys of `DPOStageConfig`.

    accelerate launch --config_file recipes/accelerate/ddp.yaml -m stic dpo --recipe recipes/X.yaml
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from trl import DPOConfig

from stic.config import ModelSpec
from stic.errors import SticError, one_line
from stic.images import escapes
from stic.models import (ModelSetupError, language_model_name, lora_config, output_head_name, projector_module,
                         record_trained_precision, refuse_sharding_without_cuda, require_cuda_for_4bit,
                         training_device)
from stic.recipe import DPOStageConfig, Recipe, paper_alpha_to_sft_weight  # noqa: F401  (re-exported)
from stic.recipe import parse_recipe as parse_whole_recipe
from stic.report import projector_record, vision_lora_record, write_dpo_report
from stic.training import has_text_only_rows, is_main_rank, last_complete_checkpoint, precision_record, trainer_class


def parse_recipe(data: dict) -> Recipe:
    """The recipe with the sections dpo uses built; the others are only checked (building a TRL
    section runs TrainingArguments' setup, which belongs to the command that trains with it)."""
    return parse_whole_recipe(data, build=("dpo",))


REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")


# ---------------------------------------------------------------------------------------------------------
# Data


class DatasetError(SticError, ValueError):
    """The preference dataset cannot be trained on; the message says why and where."""


def _stic_records_to_rows(records: list, source: str, image_folder: str | None,
                          allow_outside: bool = False) -> list[dict]:
    """STIC's released records: full chosen/rejected conversations sharing one user prompt, `image` a file name
    under `image_folder` (default: the file's folder); one leading outside it is refused unless `allow_outside`."""
    rows = []
    for i, rec in enumerate(records):
        try:
            chosen, rejected = rec["chosen"], rec["rejected"]
            prompt = [m for m in chosen if m["role"] != "assistant"]
            row = {"prompt": prompt, "chosen": [chosen[-1]], "rejected": [rejected[-1]]}
        except (KeyError, TypeError, IndexError):
            raise DatasetError(f"{source}: record {i} needs 'chosen' and 'rejected' conversations") from None
        for m in prompt:  # the image is passed separately; drop any inline placeholder
            m["content"] = m["content"].replace("<image>\n", "").replace("<image>", "").strip()
        if rec.get("image"):
            root = Path(image_folder) if image_folder else Path(source).parent
            if not isinstance(rec["image"], str):
                raise DatasetError(f"{source}: record {i}: 'image' is not a path: {rec['image']!r}")
            if not allow_outside and escapes(root, rec["image"]):
                raise DatasetError(f"{source}: record {i}: image {rec['image']!r} lies outside the image folder "
                                   f"{root}; set dpo.allow_outside_image_folder: true to read it")
            row["images"] = [str(root / rec["image"])]
        rows.append(row)
    return rows


def _check_parquet_parts(folder: Path, full: bool = False) -> None:
    """DatasetError naming the first Parquet part under `folder` that pyarrow cannot read (a copy cut short, a
    full disk): its footer only, or with `full` all of it; or the first whose columns differ from the first
    part's (the loader takes the first part's schema, and the missing column fails at step 0)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    first = None
    for part in sorted(folder.rglob("*.parquet")):
        if any(p.startswith((".", "_")) for p in part.relative_to(folder).parts):
            continue  # hidden: the parquet loader skips it too
        try:
            columns = (pq.read_table(part) if full else pq.read_schema(part)).names
        except (pa.ArrowException, OSError) as err:
            raise DatasetError(f"dataset part {part} is not a readable Parquet file, truncated or corrupt "
                               f"({one_line(err)}); remove or replace it") from None
        if first is None:
            first = (part, set(columns))
        elif set(columns) != first[1]:
            missing, extra = sorted(first[1] - set(columns)), sorted(set(columns) - first[1])
            raise DatasetError(
                f"dataset part {part} has other columns than {first[0].name}: "
                + "; ".join(f"{what} {', '.join(cols)}" for what, cols in (("lacks", missing), ("adds", extra)) if cols)
                + "; regenerate or remove it")


def _refuse_duplicate_images(ds, folder: Path) -> None:
    """selfgen writes one pair per image: an image_id twice means two runs wrote the folder (or parts were copied
    in twice), and training on it would weigh those images double."""
    if "image_id" not in ds.column_names:
        return
    from collections import Counter

    counts = Counter(ds["image_id"])
    extra = {k: n for k, n in counts.items() if n > 1}
    if extra:
        example, n = next(iter(extra.items()))
        raise DatasetError(f"dataset {folder} holds {sum(extra.values()) - len(extra)} duplicate rows over "
                           f"{len(extra)} image_id(s) (e.g. {example!r} {n} times); two runs wrote one folder? "
                           "Regenerate it into a new output directory")


def load_preference_dataset(cfg: DPOStageConfig, extra_columns: tuple[str, ...] = ()):
    """Load, check and trim the dataset to the columns DPOTrainer reads (and `extra_columns` where the dataset
    has them). Problems raise DatasetError."""
    import datasets

    if isinstance(cfg.dataset, list):
        return _load_several(cfg, extra_columns)
    source = cfg.dataset
    path = Path(source)
    if path.is_dir() and (path / "data").is_dir():
        _check_parquet_parts(path)  # pyarrow's own error names no file
        try:
            ds = datasets.load_dataset("parquet", data_dir=str(path), split=cfg.dataset_split)
        except datasets.exceptions.DatasetGenerationError:
            _check_parquet_parts(path, full=True)  # a part damaged inside, its footer intact
            raise
        _refuse_duplicate_images(ds, path)
    elif path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
        ds = datasets.load_from_disk(str(path))
        ds = ds[cfg.dataset_split] if isinstance(ds, datasets.DatasetDict) else ds
    elif path.is_file() and path.suffix in (".json", ".jsonl"):
        text = path.read_text()
        try:
            records = (json.loads(text) if path.suffix == ".json"
                       else [json.loads(line) for line in text.splitlines() if line.strip()])
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
        if records and isinstance(records[0], dict) and "prompt" not in records[0]:
            records = _stic_records_to_rows(records, str(path), cfg.image_folder, cfg.allow_outside_image_folder)
        ds = datasets.Dataset.from_list(records)
        if "images" in ds.column_names:
            ds = ds.cast_column("images", datasets.List(datasets.Image()))
    elif path.exists():
        ds = datasets.load_dataset(str(path), split=cfg.dataset_split)
    elif source.count("/") == 1 and not source.startswith((".", "/")):
        ds = datasets.load_dataset(source, split=cfg.dataset_split)  # a Hugging Face dataset id
    else:
        raise DatasetError(f"dataset {source} does not exist")

    # plain SFT on the preferred answers needs no rejected ones
    required = REQUIRED_COLUMNS if cfg.mode == "dpo" else ("prompt", "chosen")
    missing = [c for c in required if c not in ds.column_names]
    if missing:
        raise DatasetError(f"dataset {source} lacks column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                           f"(it has: {', '.join(ds.column_names)})")
    if "image" in ds.column_names and "images" not in ds.column_names:
        ds = ds.map(lambda r: {"images": [r["image"]]}, remove_columns=["image"])
    if cfg.max_samples:
        ds = ds.select(range(min(cfg.max_samples, len(ds))))
    if len(ds) == 0:
        raise DatasetError(f"dataset {source} is empty")
    keep = [c for c in (*required, "images", *extra_columns) if c in ds.column_names]
    ds = ds.select_columns(keep)
    if "images" in keep:
        _check_images(ds, source)
    return ds


def _load_several(cfg: DPOStageConfig, extra_columns: tuple[str, ...]):
    """dpo.dataset as a list: each source loaded and checked as it would be alone, then their rows concatenated
    (the columns all of them have); max_samples draws from the whole (shuffled with the run's seed). A source named
    twice is refused (its rows would weigh double), and so are sources that differ in having images."""
    import datasets

    if not cfg.dataset:
        raise DatasetError("dpo.dataset is an empty list; name at least one dataset")
    seen: dict[str, str] = {}
    for source in cfg.dataset:
        key = str(Path(source).resolve()) if Path(source).exists() else source
        if key in seen:
            raise DatasetError(f"dpo.dataset names {source} twice (as {seen[key]!r} and {source!r}): its rows would "
                               "be trained on twice; list each dataset once")
        seen[key] = source
    parts = [load_preference_dataset(dataclasses.replace(cfg, dataset=source, max_samples=None), extra_columns)
             for source in cfg.dataset]
    with_images = [source for source, p in zip(cfg.dataset, parts) if "images" in p.column_names]
    if with_images and len(with_images) < len(parts):  # keeping the columns all share would drop every image
        without = next(source for source, p in zip(cfg.dataset, parts) if "images" not in p.column_names)
        raise DatasetError(f"dpo.dataset mixes pairs with images ({with_images[0]}) and without ({without}); train "
                           "them in separate runs, or drop the images column from the image sources")
    common = [c for c in parts[0].column_names if all(c in p.column_names for p in parts)]
    features = parts[0].select_columns(common).features
    aligned = []
    for source, part in zip(cfg.dataset, parts):
        part = part.select_columns(common)
        if part.features != features:  # a cast rewrites every row, images included: only where it must
            try:
                part = part.cast(features)
            except (TypeError, ValueError) as err:
                raise DatasetError(f"dpo.dataset: {source}'s rows are not shaped as {cfg.dataset[0]}'s "
                                   f"({one_line(err)}); convert one of them to the other's format") from None
        aligned.append(part)
    ds = datasets.concatenate_datasets(aligned)
    if cfg.max_samples:  # a sample of all the sources, not the first source's rows alone
        ds = ds.shuffle(seed=cfg.seed).select(range(min(cfg.max_samples, len(ds))))
    return ds


def _check_images(ds, source: str) -> None:
    """Every image must exist (and be stored or readable) before training starts, not fail at step N."""
    import datasets
    from PIL import Image

    raw = ds.cast_column("images", datasets.List(datasets.Image(decode=False)))
    # stage 1's pairs are about their image: a row without one would train a text-only pair unnoticed (usually
    # an image lost in a conversion), so it is refused rather than dropped, which would shrink the run silently
    empty = [i for i, images in enumerate(raw["images"]) if not images]
    if empty:
        raise DatasetError(f"dataset {source}: {len(empty)} of {len(raw)} rows have no image (first: row {empty[0]}); "
                           "remove them, or drop the images column to train text-only pairs")
    for i, images in enumerate(raw["images"]):
        for img in images or []:
            if img.get("bytes"):
                continue
            p = img.get("path")
            if not p or not Path(p).is_file():
                raise DatasetError(f"dataset {source}: row {i} refers to a missing image file {p!r}")
            try:  # the header only: a file that is no image fails here, not at the step that batches it
                with Image.open(p):
                    pass
            except (OSError, Image.DecompressionBombError) as err:
                raise DatasetError(f"dataset {source}: row {i}: {p!r} is not a readable image ({one_line(err)})"
                                   ) from None


def mean_chosen_tokens(ds, processor, limit: int | None = 512) -> float:
    """Mean length in tokens of the chosen answers of the first `limit` rows (None: every row)."""
    n = len(ds) if limit is None else min(limit, len(ds))
    texts = [c[-1]["content"] for c in ds.select(range(n))["chosen"]]  # this column only: no image decoded
    lengths = [len(ids) for ids in processor.tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    return sum(lengths) / max(1, len(lengths))


# ---------------------------------------------------------------------------------------------------------
# Model and adapter


def freeze_for_full_finetune(model, train_projector: bool) -> None:
    """Full fine-tuning trains the language model and lm_head (and projector if asked); the vision tower stays
    frozen. The text model is found by structure: Idefics3 calls it `text_model`."""
    trained = [language_model_name(model) + ".", (output_head_name(model) or "lm_head") + "."]
    if train_projector:
        trained.append(projector_module(model) + ".")
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(tuple(trained))


def load_training_model(model_cfg: ModelSpec, cfg: DPOStageConfig):
    from stic.models import load_model

    require_cuda_for_4bit(model_cfg)
    if model_cfg.load_in_4bit and not cfg.use_peft:
        raise ModelSetupError("a 4-bit model can only be trained with an adapter (dpo.use_peft: true)")
    model = load_model(model_cfg, training_device(model_cfg, cfg))
    if model_cfg.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.activation_checkpointing)
    return model


# ---------------------------------------------------------------------------------------------------------
# The stage


def run_dpo(recipe: Recipe) -> dict:
    from stic.store import main_process_lock

    from stic.store import check_output_dir

    refuse_sharding_without_cuda(recipe.dpo)
    check_output_dir(recipe.dpo.output_dir, "dpo.output_dir")
    with main_process_lock(recipe.dpo.output_dir, is_main_rank()):  # one run at a time writes the folder
        return _train(recipe)


def _train(recipe: Recipe) -> dict:
    from stic.models import load_processor

    cfg, model_cfg = recipe.dpo, recipe.model
    processor = load_processor(model_cfg)
    dataset = load_preference_dataset(cfg, extra_columns=("generation",))  # refuse bad data before the model loads
    setup = prepare_stage(cfg, processor, dataset)  # sft weight from paper_alpha, global batch, max_length check
    dataset = dataset.remove_columns([c for c in ("generation",) if c in dataset.column_names])
    resume_from = last_complete_checkpoint(cfg.output_dir, "dpo") if cfg.resume else None

    started = time.time()
    trainer, loaded_dtype = build_trainer(recipe, processor, dataset)
    setup["precision"] = precision_record(model_cfg, loaded_dtype, trainer)
    result = trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model(cfg.output_dir)
    summary = None
    if trainer.accelerator.is_main_process:
        load_processor(model_cfg, raw=True).save_pretrained(cfg.output_dir)  # the template as published
        if not cfg.use_peft:
            record_trained_precision(trainer.model, cfg.output_dir)
        # with paper_alpha: the L its sft weight came from (every row); else a sample's
        mean_len = (setup["paper_alpha"]["mean_chosen_tokens"] if "paper_alpha" in setup
                    else mean_chosen_tokens(dataset, processor))
        summary = write_dpo_report(recipe, trainer, result, len(dataset), mean_len, time.time() - started,
                                   resume_from, setup)
    trainer.accelerator.wait_for_everyone()
    return summary


def build_trainer(recipe: Recipe, processor, dataset):
    """(trainer, dtype the model loaded in): the stage's model loaded, frozen and wrapped, its reference and its
    TRL trainer, exactly as training runs them (preflight builds its batches through this too)."""
    from stic.models import load_model

    cfg, model_cfg = recipe.dpo, recipe.model
    model = load_training_model(model_cfg, cfg)
    loaded_dtype = model.dtype
    peft_config = lora_config(cfg, model) if cfg.use_peft else None
    if not cfg.use_peft:  # both modes: the vision tower stays frozen
        freeze_for_full_finetune(model, cfg.train_projector)
    if cfg.mode == "sft_positive":
        return _sft_positive_trainer(cfg, model, processor, dataset, peft_config), loaded_dtype
    from trl import DPOTrainer

    ref_model = None
    if not cfg.use_peft:
        ref_cfg = dataclasses.replace(model_cfg, name_or_path=cfg.ref_model or model_cfg.name_or_path)
        ref_model = load_model(ref_cfg, training_device(ref_cfg, cfg))
    text_only_rows = has_text_only_rows(dataset)
    cls = trainer_class(DPOTrainer, cfg, text_only_rows)
    if cfg.conditional_weight or cfg.anchor_weight:
        if cfg.conditional_weight and text_only_rows:
            raise DatasetError(f"dpo.conditional_weight needs an image in every row; dataset {cfg.dataset} has rows "
                               "without one")
        cls = with_conditional_preference(cls, cfg)
    probe = [dataset[i] for i in range(len(dataset)) if dataset[i].get("images")][:cfg.image_margin_probe]
    if probe:
        cls = type(cls.__name__, (ImageMarginLogMixin, cls), {"margin_probe": probe})
    trainer = cls(model=model, ref_model=ref_model, args=cfg, train_dataset=dataset, processing_class=processor,
                  peft_config=peft_config)
    return trainer, loaded_dtype


# ---------------------------------------------------------------------------------------------------------
# Does the model look at the image? log p(answer | image) - log p(answer | blank image), on DPO batches


def blank_copy(example: dict) -> dict:
    """The example with each image replaced by a mid-grey one of the same size."""
    from PIL import Image

    out = copy.deepcopy(example)
    out["images"] = [Image.new("RGB", im.size, (128, 128, 128)) for im in example["images"]]
    return out


def collate(trainer, examples: list[dict]) -> dict:
    """TRL's DPO batch of `examples` (chosen rows, then rejected rows) on the trainer's device."""
    collator = getattr(trainer.data_collator, "preference_collator", trainer.data_collator)  # without mDPO's extra
    return _on_device(collator([copy.deepcopy(e) for e in examples]), trainer.accelerator.device)


def training_batch(trainer, examples: list[dict]) -> dict:
    """The batch a training step of `examples` gets: `collate`'s, plus mDPO's conditional part where it is on."""
    return _on_device(trainer.data_collator([copy.deepcopy(e) for e in examples]), trainer.accelerator.device)


def _on_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else _on_device(v, device) if isinstance(v, dict) else v
            for k, v in batch.items()}


def completion_logps(model, batch: dict) -> torch.Tensor:
    """Summed log-probabilities of each sequence's completion: the forward TRL's DPO loss makes (its fused LM head,
    labels outside the completion masked), summed as it sums them. Gradients flow unless the caller stops them."""
    kwargs = {k: v for k, v in batch.items() if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    out = model(**kwargs, use_cache=False, labels=labels, fused_lm_head=True)
    mask = batch["completion_mask"][..., 1:]
    return out.log_probs[:, -mask.size(1):].sum(dim=1)


def sequence_logps(trainer, batch: dict, reference: bool = False) -> torch.Tensor:
    """Summed log-probabilities of each sequence's completion, as TRL's DPO loss computes them."""
    if reference:  # TRL's reference: the policy with its adapter disabled under LoRA, else ref_model
        model = trainer.model if trainer.ref_model is None else trainer.ref_model
        ld_alpha, trainer.ld_alpha = getattr(trainer, "ld_alpha", None), None  # whole sums, as the policy's below
        try:
            return torch.cat(trainer.compute_ref_log_probs(model, batch)).float()  # its halves (one for one row)
        finally:
            trainer.ld_alpha = ld_alpha
    with torch.no_grad(), trainer.accelerator.autocast():
        return completion_logps(trainer.model, batch).float()


def image_margin(trainer, examples, batch) -> torch.Tensor:
    """log p(answer | image) - log p(answer | blank image) per sequence (chosen rows, then rejected rows)."""
    return sequence_logps(trainer, batch) - sequence_logps(trainer, collate(trainer, [blank_copy(e) for e in examples]))


class ImageMarginLogMixin:
    """Trainer mixin: every training log (and so TensorBoard and the curves PNG) records the image-use margin of
    a fixed probe batch, chosen and rejected. Every process computes it, as FSDP's forward needs them all."""

    margin_probe: list | None = None

    def log(self, logs: dict, *args, **kwargs):
        if self.margin_probe and "loss" in logs:  # a training step's record
            margin = image_margin(self, self.margin_probe, collate(self, self.margin_probe))
            n = len(self.margin_probe)
            logs = {**logs, "image_margin/chosen": round(float(margin[:n].mean()), 4),
                    "image_margin/rejected": round(float(margin[n:].mean()), 4)}
        return super().log(logs, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# mDPO (Wang et al. 2024): the chosen answer preferred with its image over a corrupted one, and a reward anchor
#
#     L = TRL's loss + conditional_weight * -log sigmoid(r(y_w | image) - r(y_w | corrupted image))
#                    + anchor_weight * -log sigmoid(r(y_w | image)),        r = beta * (log pi - log pi_ref)
#
# TRL's collator gives chosen and rejected the same image, so the conditional pair has a batch of its own: the
# collator below wraps TRL's and adds, under CONDITIONAL, TRL's batch of the same rows with the corrupted image, cut
# to its chosen half. The trainer mixin runs TRL's loss unchanged and reads the chosen log-probs of the policy and
# reference forwards TRL makes (hooks on the models it calls); the policy then scores the conditional batch through
# the same fused LM head, and the reference through TRL's compute_ref_log_probs (under LoRA the base with the
# adapter disabled, else ref_model). Sums are over whole answers, as mDPO's.

CONDITIONAL = "conditional"


def conditional_seed(seed: int, example: dict) -> int:
    """The corruption seed of one row: from the run's seed and the row's content (prompt, chosen answer, image
    pixels), so a row is corrupted alike in every epoch, process and resumed run, whatever the order."""
    import hashlib

    h = hashlib.sha256(f"{seed}\x1f".encode())
    h.update(json.dumps([example["prompt"], example["chosen"]], sort_keys=True, default=str).encode())
    for image in example["images"]:
        h.update(f"{image.mode}{image.size}".encode() + image.tobytes())
    return int.from_bytes(h.digest()[:4], "big") >> 1


def corrupted_copy(example: dict, spec: dict, seed: int) -> dict:
    """The example with each image corrupted by `spec` ({"kind": ..., **settings}), seeded per row."""
    from corruptions import make_corruption

    corruption = make_corruption(spec["kind"], **{k: v for k, v in spec.items() if k != "kind"})
    row_seed = conditional_seed(seed, example)
    out = copy.deepcopy({k: v for k, v in example.items() if k != "images"})
    out["images"] = [corruption(image, row_seed + i)[0] for i, image in enumerate(example["images"])]
    return out


def chosen_rows(batch: dict, n: int) -> dict:
    """The first `n` sequences of a TRL DPO batch of 2n (its chosen half), with the image inputs that belong to them,
    cut to the longest of them. Per-sequence tensors lead with 2n; Qwen2-VL's patches are flat, `image_grid_thw`
    gives each image's count."""
    grid = batch.get("image_grid_thw")
    out = {}
    for key, value in batch.items():
        if key == "pixel_values" and grid is not None:
            out[key] = value[:int(grid[:n].prod(dim=-1).sum())]
        elif torch.is_tensor(value) and value.dim() and value.size(0) == 2 * n:
            out[key] = value[:n]
        else:
            out[key] = value
    length = int(out["attention_mask"].sum(dim=0).nonzero().max()) + 1  # the rejected answers padded further
    shape = out["input_ids"].shape
    return {k: v[:, :length] if torch.is_tensor(v) and v.shape == shape else v for k, v in out.items()}


@dataclasses.dataclass
class ConditionalCollator:
    """TRL's preference collator, plus the conditional batch: the same rows with the corrupted image, chosen
    answers only."""

    preference_collator: object
    corruption: dict
    seed: int

    def __call__(self, examples: list[dict]) -> dict:
        corrupted = [corrupted_copy(e, self.corruption, self.seed) for e in examples]  # before TRL edits them
        batch = self.preference_collator(examples)
        batch[CONDITIONAL] = chosen_rows(self.preference_collator(corrupted), len(examples))
        return batch


@contextlib.contextmanager
def recorded_log_probs(*modules):
    """The per-token log-probs of each fused-LM-head forward the modules run inside the block, in call order."""
    seen = []

    def keep(module, args, output):
        if getattr(output, "log_probs", None) is not None:
            seen.append(output.log_probs)

    handles = [m.register_forward_hook(keep) for m in dict.fromkeys(modules) if m is not None]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def conditional_logps(trainer, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(policy, reference) log p(chosen answer | corrupted image) of a conditional batch: the policy with gradients
    through `model` (the module TRL's loss calls), the reference by TRL's compute_ref_log_probs."""
    policy = completion_logps(model, batch)
    return policy, sequence_logps(trainer, batch, reference=True)


class ConditionalPreferenceMixin:
    """DPOTrainer mixin: mDPO's conditional pair and reward anchor added to TRL's loss (see above), each term and
    the conditional margin logged with TRL's metrics."""

    conditional_weight: float = 0.0
    anchor_weight: float = 0.0
    conditional_corruption: dict | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from accelerate.utils import is_peft_model

        from stic.training import TrainingSetupError

        if self.conditional_weight:
            if self.ref_model is None and not is_peft_model(self.model):
                raise TrainingSetupError("dpo.conditional_weight needs the reference model during training; "
                                         "precompute_ref_log_probs with full fine-tuning drops it")
            self.data_collator = ConditionalCollator(self.data_collator, self.conditional_corruption, self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        conditional = inputs.pop(CONDITIONAL, None)
        with recorded_log_probs(self.model, self.ref_model) as forwards:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if len(forwards) != (1 if self.precompute_ref_logps else 2):
            raise RuntimeError(f"TRL's DPO loss made {len(forwards)} log-prob forwards, not the policy's and the "
                               "reference's: this TRL version is not supported with conditional_weight/anchor_weight")
        n = inputs["input_ids"].size(0) // 2
        answer = inputs["completion_mask"].size(1) - 1
        chosen = forwards[0][:n, -answer:].sum(dim=1)
        ref_chosen = (inputs["ref_chosen_logps"] if self.precompute_ref_logps
                      else forwards[1][:n, -answer:].sum(dim=1))
        reward = self.beta * (chosen - ref_chosen.detach())
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        extra = 0.0
        if self.anchor_weight:
            anchor = -F.logsigmoid(reward).mean()
            extra = extra + self.anchor_weight * anchor
            metrics["anchor/loss"].append(self.accelerator.gather(anchor.detach()).mean().item())
        if self.conditional_weight:
            if conditional is None:
                raise RuntimeError("dpo.conditional_weight: the batch has no conditional part; was it built by "
                                   "the trainer's data_collator?")
            policy, reference = conditional_logps(self, model, conditional)
            margin = reward - self.beta * (policy - reference.detach())
            cond = -F.logsigmoid(margin).mean()
            extra = extra + self.conditional_weight * cond
            metrics["conditional/loss"].append(self.accelerator.gather(cond.detach()).mean().item())
            metrics["conditional/margin"].append(self.accelerator.gather(margin.detach()).mean().item())
            metrics["conditional/logps"].append(self.accelerator.gather(policy.detach()).mean().item())
        if return_outputs:
            return result[0] + extra, result[1]
        return result + extra


def with_conditional_preference(trainer_cls: type, cfg: DPOStageConfig) -> type:
    """`trainer_cls` (a DPOTrainer) training with mDPO's terms at the recipe's weights."""
    spec = cfg.conditional_corruption_spec() if cfg.conditional_weight else None
    return type(trainer_cls.__name__, (ConditionalPreferenceMixin, trainer_cls),
                {"conditional_weight": float(cfg.conditional_weight), "anchor_weight": float(cfg.anchor_weight),
                 "conditional_corruption": spec})


def prepare_stage(cfg: DPOStageConfig, processor, dataset) -> dict:
    """Settings known only once the data and the processes are: the sft weight from `paper_alpha` and the
    dataset's mean chosen length, gradient_accumulation_steps from `global_batch_size`, and the `max_length`
    check. Returns what run_summary.json records of them."""
    from stic.training import apply_global_batch, check_max_length

    setup = {"batch": apply_global_batch(cfg), "projector": projector_record(cfg),
             "vision_lora": vision_lora_record(cfg)}
    if cfg.paper_alpha is not None:
        mean_len = mean_chosen_tokens(dataset, processor, limit=None)
        cfg.apply_paper_alpha(mean_len)
        setup["paper_alpha"] = {"paper_alpha": cfg.paper_alpha, "mean_chosen_tokens": round(mean_len, 2),
                                "sft_weight": cfg.sft_weight}
    if cfg.conditional_weight or cfg.anchor_weight:
        setup["conditional_preference"] = {
            "conditional_weight": cfg.conditional_weight, "anchor_weight": cfg.anchor_weight,
            "conditional_corruption": cfg.conditional_corruption_spec() if cfg.conditional_weight else None}
    if cfg.max_length is not None:
        need = preference_sequence_need(dataset, processor)
        setup["max_length_check"] = check_max_length("dpo", cfg.max_length, need)
    return setup


def preference_sequence_need(dataset, processor) -> dict:
    """Image, prompt and answer tokens of the longest sequence the trainer will see: the longest rendered prompt of
    a sample of rows, plus selfgen's max_new_tokens (from the `generation` column) or else the longest answer."""
    from stic.training import generation_budget, longest_prompt, longest_text_tokens

    need = longest_prompt(processor, dataset, list(dataset["prompt"]))
    budget = generation_budget(list(dataset["generation"])) if "generation" in dataset.column_names else None
    if budget is not None:
        need.update(answer_tokens=budget, answer_source="selfgen max_new_tokens")
    else:
        answers = [m[-1]["content"] for col in ("chosen", "rejected") if col in dataset.column_names
                   for m in dataset[col]]
        need.update(answer_tokens=longest_text_tokens(processor, answers), answer_source="longest chosen/rejected")
    return need


def _sft_positive_trainer(cfg: DPOStageConfig, model, processor, dataset, peft_config):
    """Plain SFT on (x, image) -> y_w with the same data, schedule and budget as the DPO run."""
    from trl import SFTConfig, SFTTrainer

    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(SFTConfig)
              if f.init and f.name in {g.name for g in dataclasses.fields(DPOConfig)}}
    for key in ("loss_type", "loss_weights", "pad_to_multiple_of", "learning_rate"):
        shared.pop(key, None)
    sft_args = SFTConfig(**shared, learning_rate=cfg.learning_rate)
    data = dataset.map(lambda r: {"completion": r["chosen"]},
                       remove_columns=[c for c in ("chosen", "rejected") if c in dataset.column_names])
    return trainer_class(SFTTrainer, cfg, has_text_only_rows(data))(
        model=model, args=sft_args, train_dataset=data, processing_class=processor, peft_config=peft_config)
