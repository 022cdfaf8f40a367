"""`stic preflight`: is stage 1 wired right, before the GPU-hours are spent?

The faults of VLM preference training are silent: the run trains, the loss falls, and the result is wrong (image
inputs that never reach the forward, image tokens cut by `max_length`, answers without EOS, a projector updated
in bf16, a reference that is not the base). Preflight loads what stage 1 loads through the stage's own code
(`stic.dpo.build_trainer`), collates the recipe's longest rows (by text and by image size) with TRL's own
collator, and runs forward passes on that batch on this process's device:

  image_tokens   each sequence holds every image token its image expands to (none cut by max_length), and the
                 model accepts them (placeholders = features)
  model_inputs   every input the processor produces for the rows that the model's forward takes reaches it, with
                 per-image and per-sequence shapes that agree
  tokens         BOS once at the start where the template starts with it, EOS closing every trained answer, and
                 the loss mask on answer tokens only
  parameters     what trains, how many, in which dtype (float32 master weights); quantised modules outside the
                 language model
  reference      the step-0 DPO log-ratio (policy against reference) is 0
  image_used     log p(answer | image) - log p(answer | blank image), chosen and rejected: a model answering
                 without looking scores 0
  update         the share of one step at the stage's learning rates that its trainable tensors can hold

    stic preflight --recipe recipes/X.yaml [--json]

Each check passes, warns or fails; `stic preflight` exits 2 on a fail, with one line per fail naming the fix.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
import tempfile
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stic.dpo import collate, image_margin, sequence_logps, training_batch
from stic.errors import one_line

PASS, WARN, FAIL = "pass", "warn", "fail"


@dataclasses.dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""
    numbers: dict = dataclasses.field(default_factory=dict)
    stage: str = "dpo"


# ---------------------------------------------------------------------------------------------------------
# The batch: the longest rows, through the stage's collator


def longest_rows(dataset, k: int = 2) -> list[int]:
    """The rows with the most text (prompt + both answers) and with the largest images."""
    from stic.training import sample_rows

    def chars(row_messages):
        return sum(len(m["content"]) for m in row_messages if isinstance(m.get("content"), str))

    lengths = [chars(p) + chars(c) + chars(r)
               for p, c, r in zip(dataset["prompt"], dataset["chosen"], dataset["rejected"])]
    return sample_rows(dataset, lengths, k)


# ---------------------------------------------------------------------------------------------------------
# The checks


def check_image_tokens(trainer, processor, examples, batch, forward_error: str | None) -> Check:
    from stic.training import image_token_id, prompt_token_counts

    if forward_error is not None:
        return Check("image_tokens", FAIL, f"the forward refused the batch: {forward_error}",
                     "the image placeholders do not match the image features: check max_length and the processor")
    tid = image_token_id(processor)
    if tid is None:
        return Check("image_tokens", PASS, "the processor has no image token")
    got = (batch["input_ids"] == tid).sum(dim=1).tolist()
    want = [prompt_token_counts(processor, e["prompt"], e["images"])[0] for e in examples] * 2  # chosen, rejected
    cut = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
    numbers = {"image_tokens_per_sequence": got, "expected": want}
    if cut:
        return Check("image_tokens", FAIL, f"sequences {cut} hold {[got[i] for i in cut]} image tokens of "
                     f"{[want[i] for i in cut]}", "raise dpo.max_length (or null) so no image token is cut", numbers)
    return Check("image_tokens", PASS, f"{min(got)}-{max(got)} image tokens per sequence, none cut", numbers=numbers)


def forward_arguments(model, batch: dict) -> tuple[dict, str | None]:
    """{name: shape} of the tensors that reach the HF model's forward on `batch`, and a forward error if any."""
    from peft import PeftModel

    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    seen: dict = {}

    def spy(module, args, kwargs):
        seen.update({k: tuple(v.shape) for k, v in kwargs.items() if torch.is_tensor(v)})

    handle = inner.register_forward_pre_hook(spy, with_kwargs=True)
    kwargs = {k: v for k, v in batch.items() if k != "completion_mask"}
    try:
        with torch.no_grad():
            model(**kwargs, use_cache=False)
        error = None
    except Exception as err:  # noqa: BLE001  (any forward error is a finding, reported by the checks)
        error = one_line(err)
    finally:
        handle.remove()
    return seen, error


def check_model_inputs(processor, model, examples, seen: dict) -> Check:
    """What the processor produces for the rows (and the model's forward takes) against what reached the forward."""
    import inspect

    from peft import PeftModel
    from trl.data_utils import apply_chat_template, prepare_multimodal_messages

    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    accepted = set(inspect.signature(inner.forward).parameters)
    texts, images = [], []
    for e in examples:
        conv = {"prompt": prepare_multimodal_messages(copy.deepcopy(e["prompt"]), images=e["images"])}
        texts.append(apply_chat_template(conv, processor)["prompt"])
        images.append(e["images"])
    produced = processor(images=images, text=texts, padding=True, return_tensors="pt", add_special_tokens=False)
    needed = {k for k in produced if k in accepted}
    missing = sorted(needed - set(seen))
    n_images = 2 * sum(len(i) for i in images)  # the collator repeats each row's images for chosen and rejected
    rows = 2 * len(examples)
    problems = []
    for key in ("image_sizes", "image_grid_thw"):
        if key in seen and seen[key][0] != n_images:
            problems.append(f"{key} has {seen[key][0]} rows for {n_images} images")
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in seen and seen[key][0] != rows:
            problems.append(f"{key} has {seen[key][0]} rows for {rows} sequences")
    numbers = {"reached_forward": sorted(seen), "processor_produced": sorted(produced)}
    if missing:
        return Check("model_inputs", FAIL, f"{', '.join(missing)} produced by the processor never reach the forward",
                     "the collator drops these inputs: update trl, or pass them through the collator", numbers)
    if problems:
        return Check("model_inputs", FAIL, "; ".join(problems), "the batch's image inputs do not match its images",
                     numbers)
    return Check("model_inputs", PASS, f"{', '.join(sorted(needed))} reach the forward", numbers=numbers)


def check_tokens(processor, examples, batch) -> Check:
    tok = processor.tokenizer
    from stic.models import _PROBE

    eos_ids = {tok.eos_token_id}
    problems = []
    rendered = tok.apply_chat_template(_PROBE, chat_template=processor.chat_template, tokenize=False)
    template_bos = tok.bos_token is not None and rendered.startswith(tok.bos_token)
    answers = [e["chosen"][-1]["content"] for e in examples] + [e["rejected"][-1]["content"] for e in examples]
    for i, (ids, attn, mask) in enumerate(zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(),
                                              batch["completion_mask"].tolist())):
        real = [t for t, a in zip(ids, attn) if a]
        if template_bos and (real[:1] != [tok.bos_token_id] or real[1:2] == [tok.bos_token_id]):
            problems.append(f"sequence {i} does not start with exactly one BOS")
        answer = [t for t, m in zip(ids, mask) if m]
        ends = [j for j, t in enumerate(answer) if t in eos_ids]
        # EOS closes the answer; only whitespace may follow (LLaVA-1.6-Mistral's template adds a space after </s>)
        if not ends or tok.decode(answer[ends[-1] + 1:]).strip():
            problems.append(f"sequence {i}'s answer does not end with EOS")
            continue
        text = tok.decode(answer[:ends[-1]], skip_special_tokens=False).strip()
        if text != answers[i].strip():
            problems.append(f"sequence {i}'s loss mask covers {text[:40]!r}, not its answer")
    if problems:
        return Check("tokens", FAIL, "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else ""),
                     "the chat template must close each assistant turn with EOS (stic.models.trained_chat_template)")
    return Check("tokens", PASS, f"{'one BOS first, ' if template_bos else ''}EOS closes all {len(answers)} answers, "
                 "loss on answer tokens only")


def check_parameters(trainer) -> Check:
    from stic.models import (ModelSetupError, language_model_name, output_head_name, projector_module,
                             vision_tower_name)

    model = trainer.model

    def prefix(find) -> str | None:
        try:
            return find(model) + "."
        except ModelSetupError:
            return None

    lm, projector, vision = prefix(language_model_name), prefix(projector_module), prefix(vision_tower_name)
    head = (output_head_name(model) or "lm_head") + "."

    def group(name: str) -> str:
        if lm and name.startswith(lm):
            return "language_model"
        if projector and name.startswith(projector):  # first: Qwen2.5-VL's projector lies inside its vision encoder
            return "projector"
        if vision and name.startswith(vision):
            return "vision"
        return "lm_head" if name.startswith(head) else "other"

    counts: dict = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = f"{group(name)} {str(p.dtype).removeprefix('torch.')}"
            counts[key] = counts.get(key, 0) + p.numel()
    quantised = sorted({group(n) for n, m in model.named_modules() if "4bit" in type(m).__name__
                        or "8bit" in type(m).__name__})
    half = [k for k in counts if not k.endswith("float32")]
    numbers = {"trainable": counts, "quantised_groups": quantised}
    sharded = getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)
    if half and not sharded:
        return Check("parameters", FAIL, f"trainable tensors held in half precision: {', '.join(half)}",
                     "train every parameter with float32 master weights (stic.training.keep_trainable_in_float32)",
                     numbers)
    if set(quantised) - {"language_model"}:
        return Check("parameters", FAIL, f"quantised outside the language model: {', '.join(quantised)}",
                     "keep the vision tower, projector and lm_head out of 4-bit (stic.models.quantization_skip_patterns)",
                     numbers)
    summary = ", ".join(f"{k}: {v:,}" for k, v in sorted(counts.items()))
    return Check("parameters", PASS, summary or "nothing trains", numbers=numbers)


def check_reference(trainer, batch, tolerance: float = 1e-3) -> Check:
    policy, reference = sequence_logps(trainer, batch), sequence_logps(trainer, batch, reference=True)
    ratio = (policy - reference).abs()
    tokens = batch["completion_mask"].sum(dim=1).clamp(min=1).float()
    per_token = float((ratio / tokens).max())
    numbers = {"max_abs_log_ratio": float(ratio.max()), "max_per_token": per_token}
    if per_token > tolerance:
        return Check("reference", FAIL, f"step-0 log-ratio up to {float(ratio.max()):.4f} nats "
                     f"({per_token:.2e} per token)", "the reference must be the base the policy starts from "
                     "(adapter disabled, or dpo.ref_model = the base)", numbers)
    return Check("reference", PASS, f"step-0 log-ratio {float(ratio.max()):.2e} nats at most", numbers=numbers)


def check_image_used(trainer, examples, batch) -> Check:
    margin = image_margin(trainer, examples, batch)
    n = len(examples)
    numbers = {"chosen": [round(float(x), 4) for x in margin[:n]], "rejected": [round(float(x), 4) for x in margin[n:]],
               "mean": float(margin.mean())}
    detail = (f"log p(answer | image) - log p(answer | blank): chosen {float(margin[:n].mean()):+.3f}, "
              f"rejected {float(margin[n:].mean()):+.3f} nats")
    return judge_image_use(margin, detail, "check pixel_values in the collator and the forward", numbers)


def judge_image_use(margin: torch.Tensor, detail: str, where: str, numbers: dict) -> Check:
    """Exactly 0 everywhere: the pixels never reach the model (fail); a mean at or below 0: it answers without
    looking (warn)."""
    if float(margin.abs().max()) < 1e-6:
        return Check("image_used", FAIL, detail + ": the answers do not depend on the image at all",
                     f"the pixels never reach the model: {where}", numbers)
    if float(margin.mean()) <= 0:
        return Check("image_used", WARN, detail + ": the model answers without looking", numbers=numbers)
    return Check("image_used", PASS, detail, numbers=numbers)


def check_update(trainer) -> Check:
    """The share of each trainable tensor's elements that one step at its group's learning rate (Adam moves an
    element by about lr) changes in the dtype the tensor is held in."""
    held = total = 0
    lrs = {}
    optimizer = trainer.create_optimizer()
    for group in optimizer.param_groups:
        for p in group["params"]:
            w = p.detach()
            step = torch.full_like(w, group["lr"])
            moved = ((w + step) != w) | (w.abs() == 0)
            held, total = held + int(moved.sum()), total + w.numel()
            lrs[group["lr"]] = lrs.get(group["lr"], 0) + w.numel()
    trainer.optimizer = None  # the stage builds its own
    share = held / max(1, total)
    numbers = {"share_moved": share, "elements_by_lr": {str(k): v for k, v in lrs.items()}}
    if share < 0.99:
        return Check("update", FAIL, f"one step moves {share:.1%} of the trainable elements",
                     "keep float32 master weights for every trained tensor", numbers)
    return Check("update", PASS, f"one step moves {share:.1%} of the trainable elements", numbers=numbers)


# ---------------------------------------------------------------------------------------------------------
# Memory: what the recipe's launch holds per device


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by tensors that ops create inside the context. For the CPU, whose allocator keeps
    no statistics: each new storage counts until it is freed (a weak reference says when)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._held: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.is_sparse:
                self._count(t.untyped_storage())
        return out

    def _count(self, storage):
        key = storage.data_ptr()
        if key in self._held or not storage.nbytes():
            return
        self._held[key] = storage.nbytes()
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key):
        self.live -= self._held.pop(key, 0)


@contextlib.contextmanager
def peak_bytes(device: torch.device):
    """{"peak": bytes} allocated above the start, at the highest point of the `with` block."""
    got: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield got
        torch.cuda.synchronize(device)
        got["peak"] = torch.cuda.max_memory_allocated(device) - start
    else:
        with LiveBytes() as mode:
            yield got
        got["peak"] = mode.peak


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages (tied weights count once; a 4-bit weight counts its packed bytes)."""
    seen = {}
    for t in tensors:
        if t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def optimizer_state_bytes(params, optim: str) -> int:
    """Adam's two moments per trainable element, in the parameter's dtype (float32 masters), or one byte each for
    the 8-bit optimizers; SGD keeps none."""
    name = str(getattr(optim, "value", optim))
    if name.startswith("sgd"):
        return 0
    per_state = (lambda p: 1) if "8bit" in name else (lambda p: p.element_size())
    return sum(2 * p.numel() * per_state(p) for p in params)


def set_checkpointing(model, on: bool) -> None:
    import warnings

    from peft import PeftModel

    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing_(enable|disable). is deprecated")
    if on:
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif inner.is_activation_checkpointing:
        inner.activation_checkpointing_disable()


def measure_activations(trainer, batch, checkpointing: bool, device) -> int:
    """Peak bytes of one forward and backward of the batch (the stage's own loss), less the gradients it leaves."""
    model = trainer.model
    set_checkpointing(model, checkpointing)
    model.train()
    try:
        with peak_bytes(device) as got:
            trainer.compute_loss(model, batch).backward()
        grads = tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    return max(0, got["peak"] - grads)


def memory_estimate(trainer, batch, rows: int, per_device_rows: int, device) -> dict:
    """Bytes per device for a step of `per_device_rows` rows, DDP-style (each device holds the whole model):
    weights + gradients + the larger of the activations (measured on the `rows`-row batch, scaled linearly) and the
    optimizer states (created at the first step, after the activations are freed)."""
    model = trainer.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = tensor_bytes(list(model.parameters()) + list(model.buffers()))
    ref = getattr(trainer, "ref_model", None)
    if ref is not None and ref is not model:
        weights += tensor_bytes(list(ref.parameters()) + list(ref.buffers()))
    grads = tensor_bytes(trainable)
    optimizer = optimizer_state_bytes(trainable, trainer.args.optim)
    recipe_ckpt = bool(trainer.args.activation_checkpointing)
    scale = per_device_rows / rows
    out = {"weights_bytes": weights, "gradient_bytes": grads, "optimizer_bytes": optimizer,
           "rows_measured": rows, "per_device_rows": per_device_rows, "checkpointing": recipe_ckpt}
    for ckpt in (False, True):
        act = measure_activations(trainer, batch, ckpt, device) * scale
        key = "with_checkpointing" if ckpt else "without_checkpointing"
        out[f"activation_bytes_{key}"] = int(act)
        out[f"estimate_bytes_{key}"] = int(weights + grads + max(act, optimizer))
    set_checkpointing(model, recipe_ckpt)
    out["estimate_bytes"] = out["estimate_bytes_with_checkpointing" if recipe_ckpt
                               else "estimate_bytes_without_checkpointing"]
    return out


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def memory_fix(numbers: dict, capacity: int, section: str) -> str:
    """The knob that makes the step fit: checkpointing, then fewer rows per device, then 4-bit weights."""
    if not numbers["checkpointing"] and numbers["estimate_bytes_with_checkpointing"] <= capacity:
        return f"set {section}.activation_checkpointing: true"
    act = numbers["activation_bytes_with_checkpointing"] / max(1, numbers["per_device_rows"])
    fixed = numbers["weights_bytes"] + numbers["gradient_bytes"]
    rows = int((capacity - fixed) // act) if act and capacity > fixed + numbers["optimizer_bytes"] else 0
    if 1 <= rows < numbers["per_device_rows"]:
        return (f"set {section}.per_device_train_batch_size: {rows} with activation checkpointing "
                f"({section}.global_batch_size keeps the effective batch)")
    return "load the language model in 4-bit (model.load_in_4bit: true, QLoRA), or use more devices with FSDP"


def check_memory(trainer, batch, rows: int, section: str, device_memory: int | None = None) -> Check:
    """The estimate against the device's memory: this GPU's, or `device_memory` bytes (the card the run will use,
    when preflight runs elsewhere)."""
    device = next(trainer.model.parameters()).device
    per_device = trainer.args.per_device_train_batch_size
    try:
        numbers = memory_estimate(trainer, batch, rows, per_device, device)
    except torch.cuda.OutOfMemoryError:
        return Check("memory", FAIL, f"{rows} rows of the longest batch do not fit on {device} for one step",
                     f"set {section}.activation_checkpointing: true, lower {section}.per_device_train_batch_size, "
                     "or load the language model in 4-bit (model.load_in_4bit: true)")
    parts = (f"weights {_gib(numbers['weights_bytes'])}, gradients {_gib(numbers['gradient_bytes'])}, optimizer "
             f"{_gib(numbers['optimizer_bytes'])}, activations {_gib(numbers['activation_bytes_without_checkpointing'])}"
             f" ({_gib(numbers['activation_bytes_with_checkpointing'])} checkpointed) for {per_device} rows")
    estimate = numbers["estimate_bytes"]
    if device_memory:
        capacity, card = device_memory, "the device"
    elif device.type == "cuda":
        capacity, card = torch.cuda.get_device_properties(device).total_memory, torch.cuda.get_device_name(device)
    else:
        return Check("memory", PASS, f"{_gib(estimate)} per device: {parts} (no GPU here, and no --device-memory: "
                     "not compared)", numbers=numbers)
    numbers["device_bytes"] = capacity
    detail = f"{_gib(estimate)} of {_gib(capacity)} on {card}: {parts}"
    if estimate > 0.95 * capacity:
        return Check("memory", FAIL, detail, memory_fix(numbers, int(0.95 * capacity), section), numbers)
    if estimate > 0.85 * capacity:
        return Check("memory", WARN, detail + " (little headroom)", numbers=numbers)
    return Check("memory", PASS, detail, numbers=numbers)


# ---------------------------------------------------------------------------------------------------------
# The generation stages (selfgen, eval): the stage's model and prompts, a full batch of its largest images


def kv_cache_bytes(model, sequences: int, tokens: int) -> int:
    """Keys and values of `tokens` positions for `sequences` sequences, in the model's dtype."""
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * sequences * tokens * model.dtype.itemsize


def generation_memory(generator, requests, max_new_tokens: int, samples: int = 1) -> dict:
    """Bytes per device to generate a batch: the weights, the prefill of the batch (measured: its activations and
    the prompt's cache) and the cache of `max_new_tokens` more positions for every sequence sampled."""
    from stic.generation import SamplingConfig

    model = generator.model
    device = next(model.parameters()).device
    with peak_bytes(device) as got:
        generator.generate(requests, SamplingConfig(max_new_tokens=1))
    weights = tensor_bytes(list(model.parameters()) + list(model.buffers()))
    cache = kv_cache_bytes(model, len(requests) * samples, max_new_tokens)
    prefill = got["peak"] * samples
    return {"weights_bytes": weights, "prefill_bytes": prefill, "kv_cache_bytes": cache, "sequences":
            len(requests) * samples, "max_new_tokens": max_new_tokens, "estimate_bytes": weights + prefill + cache}


def check_generation_memory(generator, requests, max_new_tokens: int, samples: int, batch_key: str,
                            device_memory: int | None) -> Check:
    device = next(generator.model.parameters()).device
    try:
        numbers = generation_memory(generator, requests, max_new_tokens, samples)
    except torch.cuda.OutOfMemoryError:
        return Check("memory", FAIL, f"a batch of {len(requests)} largest images does not fit on {device}",
                     f"lower {batch_key}, or load the model in 4-bit (model.load_in_4bit: true)")
    estimate = numbers["estimate_bytes"]
    parts = (f"weights {_gib(numbers['weights_bytes'])}, prefill {_gib(numbers['prefill_bytes'])}, cache of "
             f"{numbers['sequences']} x {max_new_tokens} new tokens {_gib(numbers['kv_cache_bytes'])}")
    capacity = device_memory or (torch.cuda.get_device_properties(device).total_memory
                                 if device.type == "cuda" else None)
    if capacity is None:
        return Check("memory", PASS, f"{_gib(estimate)} per device: {parts} (no GPU here, and no --device-memory: "
                     "not compared)", numbers=numbers)
    numbers["device_bytes"] = capacity
    detail = f"{_gib(estimate)} of {_gib(capacity)}: {parts}"
    if estimate > 0.95 * capacity:
        fits = (0.95 * capacity - numbers["weights_bytes"]) / max(1, estimate - numbers["weights_bytes"])
        rows = int(len(requests) * fits)
        fix = (f"set {batch_key}: {rows}" if rows >= 1 else "load the model in 4-bit (model.load_in_4bit: true)")
        return Check("memory", FAIL, detail, fix, numbers)
    return Check("memory", WARN if estimate > 0.85 * capacity else PASS, detail, numbers=numbers)


def check_generation_image_used(generator, requests) -> Check:
    """log p(own answer | image) - log p(own answer | a blank image of the same size), on short greedy answers."""
    from PIL import Image

    from stic.generation import Request, SamplingConfig

    answers = [o.text for o in generator.generate(requests, SamplingConfig(max_new_tokens=24))]
    keep = [i for i, a in enumerate(answers) if a.strip()]
    if not keep:
        return Check("image_used", WARN, "the model answered nothing to measure")
    picked = [requests[i] for i in keep]
    blank = [Request(Image.new("RGB", r.image.size, (128, 128, 128)), r.prompt) for r in picked]
    texts = [answers[i] for i in keep]
    def logps(reqs):  # as TRL's collator trains an answer: the completion with its turn-end tokens
        return torch.tensor([a.total for a in generator.answer_logprobs(reqs, texts)])

    margin = logps(picked) - logps(blank)
    numbers = {"per_request": [round(float(x), 4) for x in margin], "mean": float(margin.mean())}
    detail = f"log p(answer | image) - log p(answer | blank): {float(margin.mean()):+.3f} nats"
    return judge_image_use(margin, detail, "check the processor's pixel_values and the forward", numbers)


def padding_effect(generator, request) -> float:
    """Largest change of a short request's first-token logits when it is left-padded in a batch beside a longer one
    (generation's own path), relative to their spread."""
    from stic.generation import Request

    def first_logits(requests):
        inputs = generator.encode(requests).to(next(generator.model.parameters()).device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(generator.model.dtype)
        out = generator.model.generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True,
                                       return_dict_in_generate=True, pad_token_id=generator.pad_id)
        return out.logits[0].float()

    short = Request(request.image, "Hi.")
    longer = Request(request.image, "Hi. " + " ".join(["Look at the picture closely."] * 8))
    alone = first_logits([short])[0]
    padded = first_logits([longer, short])[1]
    return float((alone - padded).abs().max() / alone.std().clamp(min=1e-6))


def check_generation_tokens(generator) -> Check:
    """BOS once where the template starts with it, and generation stops where the template ends a turn."""
    from stic.generation import Request
    from stic.models import _PROBE

    processor, tok = generator.processor, generator.processor.tokenizer
    ids = generator.encode([Request(None, "Q")])["input_ids"][0].tolist()
    rendered = tok.apply_chat_template(_PROBE, chat_template=processor.chat_template, tokenize=False)
    problems = []
    if tok.bos_token is not None and rendered.startswith(tok.bos_token) and ids.count(tok.bos_token_id) != 1:
        problems.append(f"the prompt holds {ids.count(tok.bos_token_id)} BOS tokens, not one")
    after = rendered.split("ANSWER", 1)[1]
    turn_end = tok(after, add_special_tokens=False)["input_ids"][:1]
    if turn_end and tok.convert_ids_to_tokens(turn_end[0]) in tok.all_special_tokens and \
            turn_end[0] not in generator.eos_ids:
        problems.append(f"the template ends a turn with {tok.convert_ids_to_tokens(turn_end[0])!r}, which is not "
                        f"among the generation's EOS ids {sorted(generator.eos_ids)}: answers would not stop")
    if problems:
        return Check("tokens", FAIL, "; ".join(problems), "fix the chat template or generation_config.eos_token_id")
    return Check("tokens", PASS, "one BOS where the template has it; generation stops at the template's turn end")


def generation_checks(generator, requests, max_new_tokens: int, samples: int, batch_key: str,
                      device_memory: int | None = None) -> list[Check]:
    from stic.generation import SamplingConfig
    from stic.training import image_token_id

    processor = generator.processor
    batch = generator.encode(requests)
    # what the processor makes of these requests, asked directly: the reference the generation inputs must match
    produced = processor(text=[generator.prompt_text(r.prompt, r.image) for r in requests],
                         images=[[r.image] for r in requests], padding=True, return_tensors="pt",
                         add_special_tokens=False)
    spied: dict = {}
    inner = generator.model

    def record(kwargs):
        spied.update({k: tuple(v.shape) for k, v in kwargs.items() if torch.is_tensor(v)})

    # generate encodes the images once, before the forward (transformers' mm_encoder_outputs): both calls count
    encoder = getattr(inner.base_model, "get_image_features", None)
    handle = inner.register_forward_pre_hook(lambda m, a, kw: record(kw), with_kwargs=True)
    if encoder is not None:  # generate picks the encoder's arguments by its signature: keep it (wraps)
        @functools.wraps(encoder)
        def recording_encoder(*args, **kwargs):
            record(kwargs)
            return encoder(*args, **kwargs)

        inner.base_model.get_image_features = recording_encoder
    try:
        generator.generate(requests, SamplingConfig(max_new_tokens=1))
        error = None
    except Exception as err:  # noqa: BLE001  (a refused batch is the finding)
        error = one_line(err)
    finally:
        handle.remove()
        if encoder is not None:
            del inner.base_model.get_image_features
    tid = image_token_id(processor)
    per_row = (batch["input_ids"] == tid).sum(dim=1).tolist() if tid is not None else []
    if error is not None:
        checks = [Check("image_tokens", FAIL, f"the forward refused the batch: {error}",
                        "the image placeholders do not match the image features: check the processor")]
    else:
        checks = [Check("image_tokens", PASS, f"{min(per_row, default=0)}-{max(per_row, default=0)} image tokens "
                        "per request; the model takes them", numbers={"image_tokens_per_request": per_row})]
    import inspect

    accepted = set(inspect.signature(inner.forward).parameters)
    # the padding mask may travel as position ids and the cache's own mask: padding_effect checks its effect
    needed = {k for k in produced if k in accepted} - {"attention_mask"}
    missing = sorted(needed - set(spied))
    numbers = {"reached_forward": sorted(spied), "processor_produced": sorted(produced)}
    if missing:
        checks.append(Check("model_inputs", FAIL, f"{', '.join(missing)} produced by the processor never reach the "
                            "model", "generate drops these inputs: update transformers", numbers))
    else:
        shift = padding_effect(generator, requests[0]) if error is None else 0.0
        numbers["padding_logit_shift"] = shift
        checks.append(Check("model_inputs", FAIL, f"left padding changes a request's first-token logits by {shift:.3f}",
                            "the padding mask does not reach attention: update transformers", numbers)
                      if shift > 1e-2 else
                      Check("model_inputs", PASS, f"{', '.join(sorted(needed))} reach the model; a left-padded request "
                            f"scores as alone (logits within {shift:.1e})", numbers=numbers))
    checks.append(check_generation_tokens(generator))
    if error is None:
        checks += [check_generation_image_used(generator, requests[:4]),
                   check_generation_memory(generator, requests, max_new_tokens, samples, batch_key, device_memory)]
    return checks


def largest_images(load, refs, n: int, scan: int = 256):
    """The `n` largest of the first `scan` images by pixel count (repeated when there are fewer)."""
    images = [load(ref) for ref in refs[:scan]]
    images.sort(key=lambda im: im.width * im.height, reverse=True)
    return [images[i % len(images)] for i in range(n)] if images else []


def preflight_selfgen(recipe, device_memory: int | None = None) -> list[Check]:
    """Selfgen's model and prompts on a full batch of its largest images: the longest prompt of its sets."""
    from stic.generation import BatchGenerator, Request
    from stic.images import ImageLoader, list_images
    from stic.models import load_model, load_processor, process_state

    cfg = recipe.selfgen
    if recipe.generation.backend != "local":
        return [Check("model_inputs", WARN, f"generation runs on the {recipe.generation.backend} server: its "
                      "inputs are the server's to check")]
    longest, new_tokens = selfgen_workload(cfg)
    images = largest_images(ImageLoader(cfg.images), list_images(cfg.images), cfg.batch_size)
    if not images:
        return [Check("image_tokens", FAIL, f"no image in {cfg.images.path}", "point selfgen.images at images")]
    generator = BatchGenerator(load_model(recipe.model, process_state().device), load_processor(recipe.model),
                               cfg.batch_size, cfg.group_by_length, recipe.model.system_prompt)
    return generation_checks(generator, [Request(im, longest) for im in images], new_tokens,
                             cfg.consistency_samples, "selfgen.batch_size", device_memory)


def selfgen_workload(cfg) -> tuple[str, int]:
    """(the longest prompt selfgen's pair source sends, the most new tokens any of its generations may make). The
    on-policy sources sample their candidates with consistency_sampling, one request each; self-questions ask with
    question_sampling, then answer a question of up to that length under a hallucination prompt."""
    from stic.prompts import load_prompts

    prompts = load_prompts(cfg.prompts)
    texts = [prompts.good, *prompts.caption, *prompts.hallucination]
    tokens = [cfg.chosen_sampling.max_new_tokens, cfg.rejected_sampling.max_new_tokens]
    if cfg.consistency_samples > 1 or cfg.pair_source in ("grounding", "self_feedback"):
        tokens.append(cfg.consistency_sampling.max_new_tokens)
    if cfg.pair_source == "self_questions":
        from stic.self_questions import load_question_prompts

        sets = load_question_prompts(cfg.prompts)
        question = " ".join(["what"] * cfg.question_sampling.max_new_tokens)  # about a token a word
        texts += [*sets.ask, *(p.format(question=question) for p in sets.hallucination)]
        tokens.append(cfg.question_sampling.max_new_tokens)
    return max(texts, key=len), max(tokens)


def extra_constructions(recipe) -> list[tuple[str, object]]:
    """(name, recipe) of each further pair construction `stic rounds` runs (rounds.extra_selfgen): selfgen-2, ..."""
    rounds = getattr(recipe, "rounds", None)
    if rounds is None or not rounds.extra_selfgen or recipe.selfgen is None:
        return []
    from stic.config import from_dict, to_dict, with_changes

    return [(f"selfgen-{i + 2}", dataclasses.replace(recipe, selfgen=from_dict(
        type(recipe.selfgen), with_changes(to_dict(recipe.selfgen), changes), f"rounds.extra_selfgen[{i}]")))
        for i, changes in enumerate(rounds.extra_selfgen)]


def preflight_eval(recipe, model_spec: str = "base", device_memory: int | None = None) -> list[Check]:
    """Eval's model (in its comparison's precision) on a full batch of the benchmarks' largest images and longest
    prompts, for the longest answers any configured benchmark asks for."""
    from stic.benchmarks import get_benchmark
    from stic.evaluate import load_eval_model, load_items, resolve_model
    from stic.generation import BatchGenerator, Request
    from stic.images import decode_image
    from stic.models import process_state

    cfg = recipe.eval
    items, missing = [], []
    for name in cfg.benchmarks:
        try:
            items += [(name, it) for it in load_items(dataclasses.replace(cfg, limit=64), name)]
        except Exception as err:  # noqa: BLE001  (missing data is reported, not raised)
            missing.append(f"{name} ({one_line(err)})")
    head = [Check("data", WARN if items else FAIL, f"cannot load {'; '.join(missing)}" if missing else
                  "every benchmark loads", "" if items else "point eval.data_root at the benchmarks",
                  {"unloadable": missing})] if missing else []
    if not items:
        return head
    model_cfg, adapters, _ = resolve_model(recipe, model_spec)
    model, processor = load_eval_model(recipe, model_cfg, adapters, process_state().device)
    generator = BatchGenerator(model, processor, cfg.batch_size, system_prompt=model_cfg.system_prompt)
    decoded = [(it.prompt, decode_image(it.image, max_pixels=2048 * 2048, max_decode_pixels=16384 * 16384))
               for _, it in items if it.image is not None]
    decoded.sort(key=lambda pi: (pi[1].width * pi[1].height, len(pi[0])), reverse=True)
    requests = [Request(decoded[i % len(decoded)][1], decoded[i % len(decoded)][0]) for i in range(cfg.batch_size)]
    new_tokens = max(get_benchmark(name).max_new_tokens for name, _ in items)
    return head + generation_checks(generator, requests, new_tokens, 1, "eval.batch_size", device_memory)


# ---------------------------------------------------------------------------------------------------------
# The run


def preflight_dpo(recipe, rows: int = 2, device_memory: int | None = None) -> list[Check]:
    """Stage 1's checks on the recipe's own data, model and trainer (nothing is written to its output_dir: the
    trainer gets a scratch folder, removed afterwards)."""
    import shutil

    scratch = tempfile.mkdtemp(prefix="stic-preflight-")
    try:
        return _dpo_checks(recipe, scratch, rows, device_memory)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def stand_in_pairs(recipe, root: str, rows: int = 4) -> str:
    """Pairs as selfgen will write them, before it has run: its largest images and prompt, both answers as long as
    its sampling allows (max_new_tokens words), so stage 1 is checked at its longest sequences."""
    import datasets

    from stic.images import ImageLoader, list_images
    from stic.prompts import load_prompts

    cfg = recipe.selfgen
    prompts = load_prompts(cfg.prompts)
    images = largest_images(ImageLoader(cfg.images), list_images(cfg.images), rows)
    answer = lambda n: " ".join(["detail"] * n)  # noqa: E731
    data = [{"prompt": [{"role": "user", "content": prompts.good}],
             "chosen": [{"role": "assistant", "content": answer(cfg.chosen_sampling.max_new_tokens)}],
             "rejected": [{"role": "assistant", "content": answer(cfg.rejected_sampling.max_new_tokens)}],
             "images": [im]} for im in images]
    os.makedirs(f"{root}/stand-in/data", exist_ok=True)
    datasets.Dataset.from_list(data).cast_column("images", datasets.List(datasets.Image())).to_parquet(
        f"{root}/stand-in/data/train-0.parquet")
    return f"{root}/stand-in"


def selfgen_pending(recipe) -> bool:
    """Stage 1 reads the recipe's selfgen folder (dpo.dataset, or one of its list) and selfgen has not written it."""
    if recipe.selfgen is None:
        return False
    sources = recipe.dpo.dataset if isinstance(recipe.dpo.dataset, list) else [recipe.dpo.dataset]
    return recipe.selfgen.output_dir in sources and not os.path.exists(recipe.selfgen.output_dir)


def dpo_setup(recipe, scratch: str, rows: int):
    """(processor, trainer, the longest examples, their batch) as stage 1 builds them, writing only to `scratch`.
    Before selfgen has written the recipe's pairs, stage 1 runs on stand-in pairs (`stand_in_pairs`)."""
    from stic.dpo import build_trainer, load_preference_dataset, prepare_stage
    from stic.models import load_processor

    dataset = recipe.dpo.dataset
    if selfgen_pending(recipe):  # the recipe's selfgen folder, alone or in a list, not written yet
        pending, stand_in = recipe.selfgen.output_dir, stand_in_pairs(recipe, scratch)
        dataset = ([stand_in if d == pending else d for d in dataset] if isinstance(dataset, list) else stand_in)
    cfg = dataclasses.replace(recipe.dpo, output_dir=scratch, report_to=[], resume=False, image_margin_probe=0,
                              dataset=dataset)
    recipe = dataclasses.replace(recipe, dpo=cfg)
    processor = load_processor(recipe.model)
    dataset = load_preference_dataset(cfg)
    prepare_stage(cfg, processor, dataset)
    trainer, _ = build_trainer(recipe, processor, dataset)
    trainer.model.eval()  # no dropout in the measurements
    examples = [dataset[i] for i in longest_rows(dataset, rows)]
    return processor, trainer, examples, collate(trainer, examples)


def _dpo_checks(recipe, scratch: str, rows: int, device_memory: int | None) -> list[Check]:
    from stic.training import TrainingSetupError

    head = []
    if selfgen_pending(recipe):
        head.append(Check("data", WARN, f"selfgen has not written {recipe.selfgen.output_dir} yet: checked on "
                          "stand-in pairs (its largest images and prompt, answers of max_new_tokens words)"))
    try:
        processor, trainer, examples, batch = dpo_setup(recipe, scratch, rows)
    except TrainingSetupError as err:
        return head + [Check("image_tokens", FAIL, one_line(err), "raise dpo.max_length (or null)")]
    seen, error = forward_arguments(trainer.model, batch)
    checks = [check_image_tokens(trainer, processor, examples, batch, error),
              check_model_inputs(processor, trainer.model, examples, seen),
              check_tokens(processor, examples, batch),
              check_parameters(trainer)]
    if error is None:  # the checks that need a forward
        checks += [check_reference(trainer, batch), check_image_used(trainer, examples, batch)]
    checks.append(check_update(trainer))
    if error is None:
        # a training step's batch: with dpo.conditional_weight, also the chosen answers on the corrupted image
        checks.append(check_memory(trainer, training_batch(trainer, examples), len(examples), "dpo", device_memory))
    return head + checks


# ---------------------------------------------------------------------------------------------------------
# Stage 2 (infuse-sft): its SFT trainer on the longest instruction rows, each with a description as long as the
# describe step may write


def check_sft_tokens(processor, train_rows, batch) -> Check:
    """The loss falls on the assistant answers alone, each closed by EOS (only whitespace after it)."""
    tok = processor.tokenizer
    problems = []
    for i, (ids, labels, row) in enumerate(zip(batch["input_ids"].tolist(), batch["labels"].tolist(), train_rows)):
        trained = [t for t, lab in zip(ids, labels) if lab != -100]
        answers = [m["content"].strip() for m in row["messages"] if m["role"] == "assistant"]
        text = tok.decode(trained, skip_special_tokens=False)
        if tok.eos_token and text.count(tok.eos_token) != len(answers):
            problems.append(f"row {i}: {text.count(tok.eos_token)} EOS in the loss for {len(answers)} answers")
            continue
        pieces = [p.strip() for p in (text.split(tok.eos_token) if tok.eos_token else [text]) if p.strip()]
        if pieces != answers:
            problems.append(f"row {i}: the loss covers {pieces[0][:40] if pieces else ''!r}, not its answers")
    if problems:
        return Check("tokens", FAIL, "; ".join(problems[:3]), "train on assistant tokens only "
                     "(infuse_sft.assistant_only_loss: true) with a template that closes each turn with EOS")
    return Check("tokens", PASS, "loss on the assistant answers only, each closed by EOS")


def preflight_infuse(recipe, device_memory: int | None = None, rows: int = 2) -> list[Check]:
    import shutil

    scratch = tempfile.mkdtemp(prefix="stic-preflight-")
    try:
        return _infuse_checks(recipe, scratch, rows, device_memory)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _infuse_checks(recipe, scratch: str, rows: int, device_memory: int | None) -> list[Check]:
    from pathlib import Path

    from trl import SFTTrainer

    from stic.infuse import (add_questioner_token, build_training_set, load_model_for_training, sft_sequence_need,
                             stage1_model_config)
    from stic.self_questions import IgnoreToken, questioner_turns
    from stic.instructions import load_instructions
    from stic.models import load_processor
    from stic.training import TrainingSetupError, check_max_length, has_text_only_rows, trainer_class

    cfg = dataclasses.replace(recipe.infuse_sft, output_dir=scratch, report_to=[], resume=False)
    head = []
    if cfg.stage1_adapter and not (Path(cfg.stage1_adapter) / "adapter_config.json").exists():
        head.append(Check("stage1", WARN, f"stage 1's adapter {cfg.stage1_adapter} does not exist yet: checked on "
                          "the base with a new adapter"))
        cfg = dataclasses.replace(cfg, stage1_adapter=None, adapter_mode="new")
    recipe = dataclasses.replace(recipe, infuse_sft=cfg)
    records, _ = load_instructions(cfg.data)
    if not records:
        return head + [Check("data", FAIL, f"no usable record in {cfg.data.path}", "point infuse_sft.data at the "
                             "instruction data")]
    records = sorted(records, key=lambda r: sum(len(m["content"]) for m in r["messages"]), reverse=True)[:rows]
    # the longest description the describe step may write: max_new_tokens words
    description = " ".join(["detail"] * cfg.describe.sampling.max_new_tokens)
    train_set, _ = build_training_set(records, {r["image"]: description for r in records if r["image"]},
                                      cfg.template, recipe.model.system_prompt, questioner_turns(cfg))
    processor = load_processor(stage1_model_config(recipe))
    questioner_token = add_questioner_token(recipe, processor)
    try:
        if cfg.max_length is not None:
            check_max_length("infuse_sft", cfg.max_length, sft_sequence_need(train_set, processor))
    except TrainingSetupError as err:
        return head + [Check("image_tokens", FAIL, one_line(err), "raise infuse_sft.max_length (or null)")]
    model, peft_config = load_model_for_training(recipe, questioner_token)
    trainer = trainer_class(SFTTrainer, cfg, has_text_only_rows(train_set))(
        model=model, args=cfg, train_dataset=train_set, processing_class=processor, peft_config=peft_config)
    if questioner_token:
        trainer.data_collator = IgnoreToken(trainer.data_collator, questioner_token[0])
    trainer.model.eval()
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer.data_collator(examples)
    device = next(trainer.model.parameters()).device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    seen, error = forward_arguments(trainer.model, {k: v for k, v in batch.items() if k != "labels"})
    if error is not None:
        checks = [Check("image_tokens", FAIL, f"the forward refused the batch: {error}",
                        "the image placeholders do not match the image features: check max_length and the processor")]
    else:
        checks = [Check("image_tokens", PASS, "the longest rows, with the longest description, fit whole")]
    import inspect

    from peft import PeftModel

    inner = trainer.model.get_base_model() if isinstance(trainer.model, PeftModel) else trainer.model
    accepted = set(inspect.signature(inner.forward).parameters)
    missing = sorted({k for k in batch if k in accepted and k != "labels"} - set(seen))
    checks.append(Check("model_inputs", FAIL, f"{', '.join(missing)} never reach the forward", "the collator drops "
                        "these inputs: update trl") if missing else
                  Check("model_inputs", PASS, f"{', '.join(sorted(seen))} reach the forward"))
    checks += [check_sft_tokens(processor, train_set, batch), check_parameters(trainer), check_update(trainer)]
    if error is None:
        checks.append(check_memory(trainer, batch, len(examples), "infuse_sft", device_memory))
    return head + checks


STAGES = ("selfgen", "dpo", "infuse-sft", "eval")


def preflight_stage(recipe, stage: str, device_memory: int | None = None, model_spec: str = "base") -> list[Check]:
    if stage == "selfgen":  # and each further construction of `stic rounds`, under its own name
        checks = preflight_selfgen(recipe, device_memory)
        for c in checks:
            c.stage = stage
        for name, extra in extra_constructions(recipe):
            more = preflight_selfgen(extra, device_memory)
            for c in more:
                c.stage = name
            checks += more
        return checks
    elif stage == "dpo":
        checks = preflight_dpo(recipe, device_memory=device_memory)
    elif stage == "infuse-sft":
        checks = preflight_infuse(recipe, device_memory)
    elif stage == "eval":
        checks = preflight_eval(recipe, model_spec, device_memory)
    else:
        raise ValueError(f"unknown stage {stage!r}")
    for c in checks:
        c.stage = stage
    return checks


def format_table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    stage = max(len(c.stage) for c in checks)
    return "\n".join(f"{c.stage:<{stage}}  {c.name:<{width}}  {c.status:<4}  {c.detail}" for c in checks)


def run_checks(recipe, stages=("dpo",), as_json: bool = False, device_memory_gib: float | None = None,
               model_spec: str = "base") -> list[Check]:
    """Every check of the stages, printed as one table (or JSON)."""
    import json

    device_memory = int(device_memory_gib * 2**30) if device_memory_gib else None
    checks = [c for stage in stages for c in preflight_stage(recipe, stage, device_memory, model_spec)]
    print(json.dumps([dataclasses.asdict(c) for c in checks], indent=1, default=str) if as_json
          else format_table(checks))
    return checks
