"""What the two training stages share besides LoRA: the global batch, the projector's own learning rate, and
the check that `max_length` leaves room for a whole training sequence.

- `global_batch_size` fixes the batch the optimizer sees, whatever the number of processes:
  gradient_accumulation_steps = global_batch_size / (per_device_train_batch_size x processes), so one GPU and
  eight GPUs train the same recipe.
- `with_projector_group(TrainerClass, lr)` gives the trainable projector parameters their own optimizer
  parameter groups at `lr`, next to the LoRA (or language-model) parameters at `learning_rate`.
- `check_max_length` refuses a `max_length` below image tokens + prompt tokens + answer tokens of the data,
  before any training: a cut sequence loses its answer, or its image tokens no longer match the image.
- `trainer_class` also gives every trained parameter float32 master weights (`keep_trainable_in_float32`):
  hub checkpoints are bf16/fp16, and a step of 2e-5 (or a LoRA step at lr 1e-7) is below half an ulp of most of
  their weights, so an update applied in the checkpoint's dtype mostly rounds back to the old value.
- `last_complete_checkpoint` picks what a resumed stage starts from, skipping a checkpoint cut short by a kill.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import torch

from stic.errors import SticError


class TrainingSetupError(SticError, ValueError):
    """A stage setting that cannot work with this data or this number of processes; the message has the numbers."""


# ---------------------------------------------------------------------------------------------------------
# Resuming


def is_main_rank() -> bool:
    """Whether this is the run's main process (rank 0 of an `accelerate launch`), read without setting anything up."""
    return os.environ.get("RANK", "0") == "0"


_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "model.safetensors.index.json",
            "pytorch_model.bin", "pytorch_model.bin.index.json")


def checkpoint_gaps(folder: Path) -> list[str]:
    """What a Trainer checkpoint folder lacks to be resumed from (empty when complete). Trainer writes the weights,
    then the optimizer, then trainer_state.json, straight into the folder: a kill in between leaves it partial.
    DeepSpeed keeps weights and optimizer in global_step*/, FSDP in *_fsdp_* / optimizer_* folders."""
    names = {p.name: p for p in folder.iterdir()}
    sharded = any(n.startswith("global_step") for n in names)
    gaps = []
    try:
        json.loads(names["trainer_state.json"].read_text())["global_step"]
    except (KeyError, ValueError, TypeError, OSError):
        gaps.append("trainer_state.json")
    if not sharded and not any(n in names and names[n].stat().st_size > 0 for n in _WEIGHTS) \
            and not any("fsdp" in n for n in names):
        gaps.append("model weights")
    if not sharded and not any(n.startswith("optimizer") and (names[n].is_dir() or names[n].stat().st_size > 0)
                               for n in names):
        gaps.append("optimizer state")
    return gaps


def last_complete_checkpoint(output_dir: str, stage: str) -> str | None:
    """The newest checkpoint-N of `output_dir` that is whole, for `resume: true`; the console says which one, and
    which newer ones were skipped as partial. None (and a line saying so) when there is none."""
    folder = Path(output_dir)
    found = sorted((int(m.group(1)), p) for p in (folder.iterdir() if folder.is_dir() else [])
                   if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    skipped = []
    chosen = None
    for _step, path in reversed(found):
        gaps = checkpoint_gaps(path)
        if not gaps:
            chosen = path
            break
        skipped.append(f"{path.name} (partial, no {' or '.join(gaps)})")
    if is_main_rank():
        note = f"; skipped {', '.join(skipped)}" if skipped else ""
        if chosen is not None:
            print(f"{stage}: resuming from {chosen}{note}")
        else:
            print(f"{stage}: resume requested but {output_dir} has no complete checkpoint{note}; starting from step 0")
    return str(chosen) if chosen is not None else None


# ---------------------------------------------------------------------------------------------------------
# Global batch


def world_size() -> int:
    """The number of training processes: WORLD_SIZE (set by torchrun / accelerate launch), else accelerate's."""
    env = os.environ.get("WORLD_SIZE")
    if env:
        return int(env)
    from stic.models import process_state

    return process_state().num_processes


def gradient_accumulation_for(global_batch_size: int, per_device_train_batch_size: int, processes: int) -> int:
    """gradient_accumulation_steps that give `global_batch_size` sequences per optimizer step."""
    per_step = per_device_train_batch_size * processes
    if global_batch_size < 1 or global_batch_size % per_step:
        raise TrainingSetupError(
            f"global_batch_size {global_batch_size} is not a multiple of per_device_train_batch_size "
            f"{per_device_train_batch_size} x {processes} process{'es' if processes != 1 else ''} = {per_step}; "
            "change global_batch_size, per_device_train_batch_size or the number of processes")
    return global_batch_size // per_step


def check_training_numbers(cfg) -> None:
    """Parse-time refusal of sizes and rates TRL would take and fail on (or train nonsense with) only after the
    model has loaded."""
    low = [f"{key} must be at least 1, got {getattr(cfg, key)}" for key in
           ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
           if getattr(cfg, key) < 1]
    if cfg.learning_rate <= 0:
        low.append(f"learning_rate must be positive, got {cfg.learning_rate}")
    if low:
        raise ValueError("; ".join(low))
    check_training_length(cfg)


def check_global_batch(cfg) -> None:
    """Parse-time part of the check (independent of the number of processes)."""
    if cfg.global_batch_size is None:
        return
    if cfg.global_batch_size < 1:
        raise ValueError(f"global_batch_size must be at least 1, got {cfg.global_batch_size}")
    gradient_accumulation_for(cfg.global_batch_size, cfg.per_device_train_batch_size, 1)


def check_training_length(cfg) -> None:
    """Refuse a run that would train nothing: with max_steps unset (<= 0) the length is num_train_epochs, and 0
    epochs gives 0 steps, then saves the untrained adapter as if it had trained."""
    if cfg.max_steps > 0:
        return
    if not cfg.num_train_epochs > 0:
        raise ValueError(f"num_train_epochs must be positive when max_steps is unset (max_steps {cfg.max_steps}), "
                         f"got {cfg.num_train_epochs}: nothing would be trained")


def apply_global_batch(cfg, processes: int | None = None) -> dict:
    """Set cfg.gradient_accumulation_steps from cfg.global_batch_size (when set); returns the batch record
    for run_summary.json."""
    processes = world_size() if processes is None else processes
    if cfg.global_batch_size is not None:
        steps = gradient_accumulation_for(cfg.global_batch_size, cfg.per_device_train_batch_size, processes)
        if cfg.gradient_accumulation_steps not in (1, steps):
            raise TrainingSetupError(
                f"global_batch_size {cfg.global_batch_size} needs gradient_accumulation_steps {steps} on "
                f"{processes} process{'es' if processes != 1 else ''}, but the recipe sets "
                f"{cfg.gradient_accumulation_steps}; set one of the two")
        changed = steps != cfg.gradient_accumulation_steps
        cfg.gradient_accumulation_steps = steps
        if changed and getattr(cfg, "deepspeed", None):
            _refill_deepspeed_config(cfg)
    return {"global_batch_size": cfg.global_batch_size, "processes": processes,
            "per_device_train_batch_size": cfg.per_device_train_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "sequences_per_step": cfg.per_device_train_batch_size * processes * cfg.gradient_accumulation_steps}


def _refill_deepspeed_config(cfg) -> None:
    """A `deepspeed:` config file had its "auto" values filled when the config was built; fill them again from the
    new gradient_accumulation_steps, as transformers' Trainer does after changing training arguments."""
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    cfg.hf_deepspeed_config = HfTrainerDeepSpeedConfig(cfg.deepspeed)
    cfg.hf_deepspeed_config.trainer_config_process(cfg)
    cfg.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=cfg.hf_deepspeed_config)


# ---------------------------------------------------------------------------------------------------------
# Projector learning rate


def projector_parameters(model) -> list[tuple[str, object]]:
    """The trainable parameters of the vision-language projector: with PEFT its `modules_to_save` copy,
    in full fine-tuning the projector itself."""
    from stic.models import projector_module

    prefix = projector_module(model) + "."
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and n.startswith(prefix)]


class ProjectorGroupMixin:
    """Trainer mixin: the optimizer the Trainer builds (its weight-decay grouping untouched), with the
    projector's parameters moved out of each group into a group of their own at `projector_lr`."""

    projector_lr: float

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return super().create_optimizer(model)
        optimizer = super().create_optimizer(model)
        moved = {id(p) for _, p in projector_parameters(self.model if model is None else model)}
        if not moved:
            return optimizer
        extra = []
        for group in optimizer.param_groups:
            mine = [p for p in group["params"] if id(p) in moved]
            if mine:
                group["params"] = [p for p in group["params"] if id(p) not in moved]
                extra.append({**{k: v for k, v in group.items() if k != "params"}, "params": mine,
                              "lr": self.projector_lr})
        for group in extra:
            optimizer.add_param_group(group)
        return optimizer


def with_projector_group(trainer_cls: type, projector_lr: float) -> type:
    """`trainer_cls` whose optimizer trains the projector at `projector_lr` (built at call time, so the
    class is whatever `trl` holds then)."""
    return type(trainer_cls.__name__, (ProjectorGroupMixin, trainer_cls), {"projector_lr": float(projector_lr)})


def trainer_class(trainer_cls: type, cfg, text_only_rows: bool = True) -> type:
    """The trainer class a stage uses: float32 master weights, DDP's find_unused_parameters resolved (see below),
    and the projector group when the stage trains the projector. `text_only_rows`: whether any training row lacks
    an image."""
    trainer_cls = type(trainer_cls.__name__, (Float32MasterWeightsMixin, FindUnusedMixin, trainer_cls),
                       {"recipe_find_unused": cfg.ddp_find_unused_parameters, "text_only_rows": text_only_rows})
    if not cfg.train_projector:
        return trainer_cls
    lr = cfg.mm_projector_lr if cfg.mm_projector_lr is not None else cfg.learning_rate
    return with_projector_group(trainer_cls, lr)


# ---------------------------------------------------------------------------------------------------------
# Master weights: every trained parameter is stored and updated in float32
#
# PEFT upcasts LoRA weights to float32 but leaves `modules_to_save` (the trainable projector copy) in the model's
# dtype, TRL casts a QLoRA adapter to bf16, and a full fine-tune trains the checkpoint's own bf16/fp16 tensors.
# Single-process and DDP runs therefore upcast every trainable tensor here, after the trainer has built the PEFT
# model and before it builds the optimizer. Compute stays in the run's precision: under autocast (bf16/fp16:
# true) the matmuls cast the float32 weights down; without it, hooks on each upcast module cast its inputs up
# and its output back to the input's dtype, so the frozen half-precision modules around it see what they expect.
# FSDP and DeepSpeed keep their own float32 masters (accelerate's FSDP preparation upcasts trainable parameters
# when mixed_precision is set; DeepSpeed's bf16/fp16 optimizers hold float32 copies), and ZeRO-3 cannot gather
# mixed-dtype parameters, so there the trainer is left as it is and a half-precision run without mixed
# precision is refused.

HALF = (torch.bfloat16, torch.float16)


class MasterWeightsError(SticError, ValueError):
    """Trainable half-precision weights that nothing would keep float32 master copies of."""


def _cast_floats(value, dtype):
    """`value` with its floating tensors (also inside tuples, lists and dicts) cast to `dtype`."""
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(_cast_floats(v, dtype) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):  # a dict, or a ModelOutput (a dict whose fields are its keyword arguments)
        return type(value)(**{k: _cast_floats(v, dtype) for k, v in value.items()})
    return value


def _first_float_dtype(values):
    for v in values:
        if torch.is_tensor(v) and v.is_floating_point():
            return v
    return None


def _upcast_inputs(module, args, kwargs):
    first = _first_float_dtype([*args, *kwargs.values()])
    module._stic_input_dtype = None
    if first is None or first.dtype == torch.float32 or torch.is_autocast_enabled(first.device.type):
        return None  # autocast chooses the compute dtype itself
    module._stic_input_dtype = first.dtype
    return _cast_floats(args, torch.float32), _cast_floats(kwargs, torch.float32)


def _restore_output(module, args, output):
    dtype = getattr(module, "_stic_input_dtype", None)
    return None if dtype is None else _cast_floats(output, dtype)


def keep_trainable_in_float32(model, select=None) -> list[str]:
    """Cast every trainable bf16/fp16 parameter of `model` (or, with `select(name)`, those it selects, trainable or
    not) to float32 in place (the Parameter objects stay, so PEFT and the optimizer see the same tensors), with
    casting hooks on the modules that own them. Returns the names of the parameters cast."""
    cast = []
    for module_name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.dtype in HALF and (
            p.requires_grad if select is None else select(f"{module_name}.{n}"))]
        if not own:
            continue
        for n, p in own:
            p.data = p.data.float()
            cast.append(f"{module_name}.{n}" if module_name else n)
        if not getattr(module, "_stic_fp32_hooks", False):
            module.register_forward_pre_hook(_upcast_inputs, with_kwargs=True)
            module.register_forward_hook(_restore_output)
            module._stic_fp32_hooks = True
    return cast


def trainable_dtypes(model) -> dict[str, int]:
    """{dtype: number of trainable elements}, for the run summary."""
    counts: dict[str, int] = {}
    for p in model.parameters():
        if p.requires_grad:
            key = str(p.dtype).removeprefix("torch.")
            counts[key] = counts.get(key, 0) + p.numel()
    return counts


def precision_record(model_cfg, loaded_dtype, trainer) -> dict:
    """What run_summary.json says of precision: the recipe's model.dtype, the dtype the weights were loaded in,
    the compute precision (mixed_precision: autocast) and who keeps the float32 master weights."""
    return {"model_dtype": model_cfg.dtype, "loaded": str(loaded_dtype).removeprefix("torch."),
            "mixed_precision": trainer.accelerator.mixed_precision,
            "master_weights": getattr(trainer, "master_weights", None)}


class Float32MasterWeightsMixin:
    """Trainer mixin: float32 master weights for every trainable parameter (see above); what was done is in
    `self.master_weights`, for the run summary."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = self.model
        half = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                       if p.requires_grad and p.dtype in HALF})
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            strategy = "FSDP" if getattr(self, "is_fsdp_enabled", False) else "DeepSpeed"
            if half and self.accelerator.mixed_precision == "no":
                raise MasterWeightsError(
                    f"{strategy} without mixed precision would update the trainable {'/'.join(half)} weights in "
                    f"{'/'.join(half)} (a small step rounds away); set bf16: true (or fp16: true) in the stage's "
                    f"section so {strategy} mixed precision keeps float32 master weights, or model.dtype: float32")
            self.master_weights = {"by": f"{strategy} mixed precision ({self.accelerator.mixed_precision})"}
            return
        cast = keep_trainable_in_float32(model)
        self.master_weights = {"by": "stic", "cast_to_float32": len(cast), "trainable": trainable_dtypes(model)}


# ---------------------------------------------------------------------------------------------------------
# DDP's find_unused_parameters
#
# TRL's DPOTrainer and SFTTrainer set ddp_find_unused_parameters=True for every vision-language model (a text-only
# row leaves the vision side without gradients), which costs DDP an extra traversal of the autograd graph every
# step. It is needed only when a trainable parameter can miss its gradient in some batch: one outside the language
# model (the projector, the vision tower) while some rows have no image. LoRA on the language model, or full
# fine-tuning with the vision tower frozen, uses every trainable parameter in every forward; so does a trained
# projector when every row has an image. Stage 2's instruction data can hold text-only records, so a projector
# trained there keeps the search. A recipe that sets ddp_find_unused_parameters keeps its value.


def find_unused_parameters(model, text_only_rows: bool) -> bool:
    """Whether DDP must search for parameters without a gradient: some trainable parameter lies outside the
    language model and its head (found by structure: Idefics3's is `text_model`) while some row has no image.
    A model whose language model cannot be found keeps the search."""
    from stic.models import ModelSetupError, language_model_name, output_head_name

    if not text_only_rows:
        return False
    try:
        used = (language_model_name(model) + ".", (output_head_name(model) or "lm_head") + ".")
    except ModelSetupError:
        return True
    return any(p.requires_grad and not n.startswith(used) for n, p in model.named_parameters())


def has_text_only_rows(ds) -> bool:
    """Whether any row of a training dataset has no image (without decoding any)."""
    import datasets

    if "images" not in ds.column_names:
        return True
    raw = ds.cast_column("images", datasets.List(datasets.Image(decode=False)))["images"]
    return any(not images for images in raw)


class FindUnusedMixin:
    """Trainer mixin: ddp_find_unused_parameters from the model the trainer holds (PEFT-wrapped already) when the
    recipe leaves it unset, in place of TRL's True. Where it came from is in `self.find_unused_source`."""

    recipe_find_unused: bool | None = None
    text_only_rows: bool = True

    def _build_accelerator_args(self, **kwargs):  # called by Trainer.__init__ before the Accelerator exists
        if self.recipe_find_unused is None:
            reentrant = (self.args.gradient_checkpointing_kwargs or {}).get("use_reentrant")
            # reentrant activation checkpointing fails with the search, so it stays off there (as TRL keeps it)
            self.args.ddp_find_unused_parameters = (not reentrant
                                                    and find_unused_parameters(self.model, self.text_only_rows))
            self.find_unused_source = "stic"
        else:
            self.args.ddp_find_unused_parameters = self.recipe_find_unused
            self.find_unused_source = "recipe"
        return super()._build_accelerator_args(**kwargs)


# ---------------------------------------------------------------------------------------------------------
# max_length


def image_token_id(processor) -> int | None:
    tid = getattr(processor, "image_token_id", None)
    if tid is None and getattr(processor, "image_token", None):
        tid = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return tid


def prompt_token_counts(processor, messages: list[dict], images: list) -> tuple[int, int]:
    """(image tokens, other prompt tokens) of a prompt, rendered as generation renders it (BatchGenerator.encode:
    TRL's multimodal messages, the processor's chat template with the generation prompt, no extra special
    tokens, the processor expanding the image placeholders)."""
    from trl.data_utils import prepare_multimodal_messages

    conv = prepare_multimodal_messages(copy.deepcopy(list(messages)), images=list(images))
    text = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    kwargs = {"images": [list(images)]} if images else {}
    ids = processor(text=[text], return_tensors="pt", add_special_tokens=False, **kwargs)["input_ids"][0].tolist()
    tid = image_token_id(processor)
    n_image = sum(1 for t in ids if t == tid) if tid is not None else 0
    return n_image, len(ids) - n_image


def _image_pixels(ds) -> list[int]:
    """Width x height of each row's images (summed), from the file headers, without decoding the pixels."""
    import io

    import datasets
    from PIL import Image

    if "images" not in ds.column_names:
        return [0] * len(ds)
    raw = ds.cast_column("images", datasets.List(datasets.Image(decode=False)))["images"]
    out = []
    for images in raw:
        total = 0
        for img in images or []:
            src = io.BytesIO(img["bytes"]) if img.get("bytes") else img.get("path")
            if src is not None:
                with Image.open(src) as im:
                    total += im.width * im.height
        out.append(total)
    return out


def sample_rows(ds, prompt_chars: list[int], k: int = 2) -> list[int]:
    """Rows whose prompt is longest (text) or whose images are largest (image tokens grow with the size on
    dynamic-resolution models), plus the first row."""
    pixels = _image_pixels(ds)
    by_text = sorted(range(len(ds)), key=lambda i: -prompt_chars[i])[:k]
    by_pixels = sorted(range(len(ds)), key=lambda i: -pixels[i])[:k]
    return sorted({0, *by_text, *by_pixels})


def longest_prompt(processor, ds, prompts: list[list[dict]]) -> dict:
    """Image and prompt tokens of the sampled row with the most of both together."""
    chars = [sum(len(m["content"]) if isinstance(m.get("content"), str) else 0 for m in p) for p in prompts]
    best = None
    for i in sample_rows(ds, chars):
        images = ds[i]["images"] if "images" in ds.column_names else []
        n_image, n_prompt = prompt_token_counts(processor, prompts[i], images or [])
        if best is None or n_image + n_prompt > best["image_tokens"] + best["prompt_tokens"]:
            best = {"row": i, "image_tokens": n_image, "prompt_tokens": n_prompt}
    return best


def longest_text_tokens(processor, texts: list[str]) -> int:
    if not texts:
        return 0
    ids = processor.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return max(len(x) for x in ids)


def generation_budget(values: list[str]) -> int | None:
    """The largest max_new_tokens of selfgen's `generation` records (JSON: {chosen: {...}, rejected: {...}})."""
    budget = None
    for text in set(v for v in values if v):
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            continue
        for side in record.values():
            if isinstance(side, dict) and isinstance(side.get("max_new_tokens"), int):
                budget = max(budget or 0, side["max_new_tokens"])
    return budget


def check_max_length(section: str, max_length: int | None, need: dict) -> dict:
    """Refuse `max_length` below image + prompt + answer tokens. `need` holds image_tokens, prompt_tokens,
    answer_tokens and answer_source; returns it with the total and max_length, for run_summary.json."""
    total = need["image_tokens"] + need["prompt_tokens"] + need["answer_tokens"]
    record = {**need, "total": total, "max_length": max_length}
    if max_length is not None and max_length < total:
        raise TrainingSetupError(
            f"{section}.max_length {max_length} is below the longest training sequence: {need['image_tokens']} image "
            f"tokens + {need['prompt_tokens']} prompt tokens + {need['answer_tokens']} answer tokens "
            f"({need['answer_source']}) = {total}; set {section}.max_length to at least {total}, or to null "
            "(no truncation)")
    return record
