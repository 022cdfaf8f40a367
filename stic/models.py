"""All model loading: any Hugging Face image-text-to-text model with its own processor and chat template, its
dtype and device (with the CPU fallback when there is no GPU), LoRA settings, and trained adapters applied or
merged (in memory for inference, or into a standalone folder by `stic merge`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from stic.config import ModelSpec, option
from stic.errors import SticError

class ModelSetupError(SticError, RuntimeError):
    """A model setting that cannot work here (4-bit without a GPU, no layer to adapt, ...)."""


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name_or_path: str) -> str:
    """Hub id or local folder as given; `tiny:<family>[@seed]` is built offline on first use."""
    if name_or_path.startswith("tiny:"):
        from stic.tiny import tiny_model_path

        return str(tiny_model_path(name_or_path))
    return name_or_path


def torch_dtype(cfg: ModelSpec, device: torch.device):
    if cfg.dtype != "auto":
        return _DTYPES[cfg.dtype]
    # bf16 where the hardware has it, full precision on CPU (bf16 matmuls are slow there)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_processor(cfg: ModelSpec, raw: bool = False):
    """The model's processor, its chat template adjusted for special tokens (`trained_chat_template`). `raw`: as
    published, for saving beside weights that others load with the published conventions."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(
        resolve_model_path(cfg.name_or_path), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    if processor.tokenizer.pad_token is None:  # e.g. Mistral-based LLaVA-NeXT ships without one
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    if getattr(processor, "chat_template", None) and not raw:
        processor.chat_template = trained_chat_template(processor)
    return processor


_PROBE = [{"role": "user", "content": [{"type": "text", "text": "Q"}]},
          {"role": "assistant", "content": [{"type": "text", "text": "ANSWER"}]}]


def trained_chat_template(processor) -> str:
    """The processor's chat template, adjusted so that every sequence looks as the model was trained on it.

    Generation and TRL's collators render with this template and tokenize with `add_special_tokens=False`, so
    the template alone decides the special tokens:
    - templates without `{% generation %}` markers get TRL's training version (llava-next, Qwen2.5-VL, SmolVLM),
      which stage 2's assistant-only loss needs;
    - an assistant turn that ends without EOS (llava-1.5's HF template ends it with a space) ends with EOS, as
      LLaVA's own training format (`ASSISTANT: answer</s>`), so both stages train the model to stop;
    - a tokenizer that adds BOS by itself (Llama/Mistral: `<s>`) while the template does not emit it gets
      `{{ bos_token }}` first (llava-hf templates omit it; the models were trained with it).
    """
    import re

    from trl.chat_template_utils import get_training_chat_template

    template = processor.chat_template
    try:
        template = get_training_chat_template(processor) or template
    except ValueError:
        pass  # a template TRL has no training version of: used as it is
    tok = processor.tokenizer

    def render(t: str) -> str:
        return tok.apply_chat_template(_PROBE, chat_template=t, tokenize=False)

    eos = tok.eos_token
    if eos and eos not in render(template).split("ANSWER", 1)[-1]:
        if "endgeneration" not in template:
            import warnings

            warnings.warn("the chat template ends assistant turns without EOS and has no {% generation %} block to "
                          "add it to: trained answers will not teach the model to stop", stacklevel=2)
        else:  # the answer's trailing space (llava-1.5) gives way to EOS; otherwise EOS closes the generation block
            patched = re.sub(r"\+\s*' '\s*}}(\s*{%-?\s*endgeneration)", r"+ eos_token }}\1", template, count=1)
            if patched == template:
                patched = re.sub(r"({%-?\s*endgeneration)", r"{{ eos_token }}\1", template, count=1)
            template = patched
    bos = tok.bos_token
    adds_bos = bos is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]
    if adds_bos and not render(template).startswith(bos):
        template = "{{ bos_token }}" + template
    return template


def load_model(cfg: ModelSpec, device: torch.device | str | None = None):
    """The model in eval mode on `device` (or spread by `device_map`), with dtype/attention/4-bit from `cfg`."""
    from transformers import AutoModelForImageTextToText

    device = torch.device(device) if device is not None else torch.device("cpu")
    kwargs: dict = {"dtype": torch_dtype(cfg, device), "revision": cfg.revision,
                    "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.load_in_4bit:
        if device.type != "cuda":
            raise ModelSetupError("model.load_in_4bit needs a CUDA GPU (bitsandbytes NF4); set it to false on CPU")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"],
            # the projector stays in full precision, so it can be trained (train_projector), as LLaVA keeps it
            llm_int8_skip_modules=["lm_head", *PROJECTOR_NAMES],
        )
        kwargs["device_map"] = cfg.device_map or {"": device.index or 0}
    elif cfg.device_map:
        kwargs["device_map"] = cfg.device_map
    elif device.type == "cuda":  # straight onto the GPU, without a full copy in host memory first
        kwargs["device_map"] = {"": device}
    model = AutoModelForImageTextToText.from_pretrained(resolve_model_path(cfg.name_or_path), **kwargs)
    if "device_map" not in kwargs:
        model.to(device)
    return model.eval()


# -------------------------------------------------------------------------------------------------------------
# Processes and devices: CUDA where there is one, the CPU otherwise


DIST_TIMEOUT_ENV = "STIC_DIST_TIMEOUT_S"


def dist_timeout_kwargs() -> dict:
    """{"timeout": timedelta} from $STIC_DIST_TIMEOUT_S (seconds a collective waits for the other processes before
    the run fails; torch's default: 10 min under NCCL, 30 min under gloo), {} when unset. PartialState passes it
    to init_process_group; it takes effect only in the call that creates the process group."""
    import os
    from datetime import timedelta

    raw = os.environ.get(DIST_TIMEOUT_ENV)
    if not raw:
        return {}
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ModelSetupError(f"{DIST_TIMEOUT_ENV}={raw!r}: give a positive number of seconds")
    return {"timeout": timedelta(seconds=seconds)}


def process_state():
    """accelerate's state of this process. Without CUDA a CPU one, so that processes started by `accelerate launch`
    (torchrun) on a GPU-less machine join over gloo."""
    from accelerate import PartialState

    kwargs = dist_timeout_kwargs()
    return PartialState(cpu=True, **kwargs) if not torch.cuda.is_available() else PartialState(**kwargs)


def train_on_cpu_without_cuda(args) -> None:
    """A training stage's TRL config on a machine without CUDA: `use_cpu` (lets `accelerate launch` processes join
    over gloo) and bf16 off unless the recipe sets it."""
    if not torch.cuda.is_available():
        args.use_cpu = True
        args.bf16 = False if args.bf16 is None else args.bf16


def require_cuda_for_4bit(cfg: ModelSpec) -> None:
    """Refuse QLoRA training before anything loads on a machine that cannot run bitsandbytes' NF4."""
    if cfg.load_in_4bit and not torch.cuda.is_available():
        raise ModelSetupError("QLoRA (model.load_in_4bit: true) needs a CUDA GPU; set it to false to train on CPU")


def distributed_strategy(args=None) -> str:
    """How this training process runs: "fsdp", "zero3" (DeepSpeed ZeRO-3), "deepspeed" (ZeRO-1/2), "ddp" or
    "single". From `accelerate launch`'s environment (ACCELERATE_USE_FSDP, ACCELERATE_USE_DEEPSPEED,
    ACCELERATE_DEEPSPEED_ZERO_STAGE, WORLD_SIZE) and, when given, the stage's TRL config (its own `fsdp` and
    `deepspeed` keys). Read before any process group exists, so nothing is initialised here."""
    import os

    env = os.environ
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or getattr(args, "fsdp", None):
        return "fsdp"
    ds_config = getattr(args, "hf_deepspeed_config", None)
    if ds_config is not None:
        return "zero3" if ds_config.is_zero3() else "deepspeed"
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")  # unset with a deepspeed_config_file: assume 3
        return "deepspeed" if stage in ("0", "1", "2") else "zero3"
    return "ddp" if int(env.get("WORLD_SIZE", "1")) > 1 else "single"


def refuse_sharding_without_cuda(args=None) -> None:
    """Refuse FSDP and DeepSpeed on a machine without CUDA, before anything loads. accelerate (1.15) turns a CPU
    run's state into FSDP or DEEPSPEED only from a GPU state (`AcceleratorState.__init__`: MULTI_CPU never becomes
    FSDP, and `use_cpu` skips DeepSpeed), so fsdp.yaml or zero3.yaml with `use_cpu` silently trains plain DDP over
    gloo. Those strategies are checked on GPUs only."""
    strategy = distributed_strategy(args)
    if strategy in ("fsdp", "zero3", "deepspeed") and not torch.cuda.is_available():
        name = "FSDP" if strategy == "fsdp" else "DeepSpeed"
        raise ModelSetupError(f"{name} needs CUDA GPUs: without them accelerate would run plain DDP over gloo "
                              "instead; launch with recipes/accelerate/ddp.yaml on this machine")


def training_device(cfg: ModelSpec, args=None) -> torch.device | str:
    """Where a model to be trained loads.

    Straight onto this process's GPU where the strategy keeps a whole model per GPU (one process, DDP, ZeRO-1/2):
    loading every rank's copy on the CPU first costs host memory per process (8 ranks x a 7B model in bf16:
    ~120 GB) only for the Trainer to move it. The Trainer leaves a model already on its device in place
    (`Trainer.__init__`: a one-device `hf_device_map` equal to args.device is not model parallel, and
    `_move_model_to_device` skips a model with an `hf_device_map`). On the CPU for FSDP (its
    cpu_ram_efficient_loading keeps real weights on rank 0 alone and shards them at prepare) and ZeRO-3 (which
    partitions as it prepares, and refuses a device_map). A 4-bit model always loads on the GPU: it is quantised
    as it loads. `args`, the stage's TRL config, gives the device (initialising the process group with the
    recipe's ddp_timeout) and its own fsdp/deepspeed keys."""
    require_cuda_for_4bit(cfg)
    if not torch.cuda.is_available():
        return "cpu"
    if not cfg.load_in_4bit and distributed_strategy(args) in ("fsdp", "zero3"):
        return "cpu"
    return args.device if args is not None else process_state().device


def training_model_config(cfg: ModelSpec) -> ModelSpec:
    """`cfg` for a model to be trained: `dtype: auto` stays float32 on a GPU too (not bf16, as it resolves for
    inference there), the precision these stages trained in when the model always loaded on the CPU first; a
    bf16 model needs an explicit `dtype: bfloat16`. A 4-bit model keeps `auto` (its compute dtype)."""
    if cfg.dtype == "auto" and not cfg.load_in_4bit:
        return dataclasses.replace(cfg, dtype="float32")
    return cfg


# -------------------------------------------------------------------------------------------------------------
# Adapters, shared by the training stages


@dataclasses.dataclass
class LoraOptions:
    """LoRA settings of a training stage (mixed into its TRL config). Defaults: the paper's r 128, alpha 256."""

    use_peft: bool = option(True, help="train a LoRA adapter; false: full fine-tuning")
    lora_r: int = option(128, help="LoRA rank")
    lora_alpha: int = option(256, help="LoRA scaling alpha")
    lora_dropout: float = option(0.05, help="dropout on the LoRA input")
    lora_target_modules: list[str] | None = option(
        None, help="module names to adapt; None: every linear layer of the language model (the vision tower and "
                   "lm_head stay frozen)")
    train_projector: bool = option(
        False, help="also train the vision-language projector (fully, next to the adapter)")
    mm_projector_lr: float | None = option(
        None, help="the projector's learning rate (its own optimizer parameter group); None: the stage's "
                   "learning_rate")

    def __post_init__(self):
        if self.mm_projector_lr is not None:
            if not self.train_projector:
                raise ValueError("mm_projector_lr is set but train_projector is false; set train_projector: true "
                                 "or remove mm_projector_lr")
            if self.mm_projector_lr <= 0:
                raise ValueError(f"mm_projector_lr must be positive, got {self.mm_projector_lr}")
        parent = getattr(super(), "__post_init__", None)  # the TRL config this is mixed into, if any
        if parent is not None:
            parent()


def language_model_linear_regex(model) -> str:
    """A PEFT target regex for the language model's linear layers (not the vision tower, projector, lm_head)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "language_model" in name and "lm_head" not in name:
            names.add(name.rsplit(".", 1)[-1])
    if not names:
        raise ModelSetupError(f"found no linear layer under a 'language_model' module in {type(model).__name__}; "
                           "set lora_target_modules in the recipe")
    return rf".*language_model.*\.({'|'.join(sorted(names))})"


PROJECTOR_NAMES = ("multi_modal_projector", "visual.merger", "connector", "mm_projector")


def projector_module(model) -> str:
    names = dict(model.named_modules())
    for candidate in PROJECTOR_NAMES:
        found = [n for n in names if n == candidate or n.endswith("." + candidate)]
        if found:
            return found[0]
    raise ModelSetupError(f"no projector module ({', '.join(PROJECTOR_NAMES)}) in {type(model).__name__}")


def lora_config(cfg: LoraOptions, model):
    from peft import LoraConfig

    targets = cfg.lora_target_modules or language_model_linear_regex(model)
    return LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
        modules_to_save=[projector_module(model)] if cfg.train_projector else None, task_type="CAUSAL_LM",
    )


# -------------------------------------------------------------------------------------------------------------
# Trained adapters at inference: keep the update that low precision would erase
#
# Stage 1 trains at lr 1e-7; the LoRA weight change it leaves (rms ~1e-5) is below half a bf16 ulp of typical
# 7B weights (~0.02), so merging it into bf16 weights rounds most of it back to the base. Adapters are therefore
# merged in float32, and the merged model is cast to the run's dtype only when the update survives that cast.

SURVIVAL_FLOOR = 0.99  # share of the update a dtype must keep before a merged model is stored or run in it


def update_kept(base: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> tuple[float, float]:
    """(sum q*delta, sum delta^2) where q is what remains of `delta` once base + delta is stored in `dtype`.

    Their ratio is the share of the update that survives: 1 when the cast keeps it, 0 when every element
    rounds back to the base, between where it keeps part (the projection of what is left onto the update)."""
    base32, delta32 = base.detach().float(), delta.detach().float()
    kept = (base32 + delta32).to(dtype).float() - base32.to(dtype).float()
    return float((kept * delta32).sum()), float((delta32 * delta32).sum())


def adapter_survival(peft_model, dtype: torch.dtype) -> dict:
    """How much of a PeftModel's (unmerged) update survives merging and storing in `dtype`.

    Covers every LoRA layer (its delta weight) and every fully trained module (modules_to_save, e.g. the
    projector: trained minus original weights)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    num = den = 0.0
    layers = 0
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and hasattr(module.get_base_layer(), "weight"):
            for name in module.active_adapters:
                if name not in module.lora_A:
                    continue
                n, d = update_kept(module.get_base_layer().weight, module.get_delta_weight(name), dtype)
                num, den, layers = num + n, den + d, layers + 1
        elif isinstance(module, ModulesToSaveWrapper):
            original = dict(module.original_module.named_parameters())
            for name in module.active_adapters:
                if name not in module.modules_to_save:
                    continue
                for pname, p in module.modules_to_save[name].named_parameters():
                    n, d = update_kept(original[pname], p - original[pname].to(p.dtype), dtype)
                    num, den, layers = num + n, den + d, layers + 1
    kept = num / den if den > 0 else 1.0
    return {"dtype": str(dtype).removeprefix("torch."), "kept": round(kept, 6), "update_rms_sq_sum": den,
            "tensors": layers}


def merged_folder_config(cfg: ModelSpec, path: str) -> ModelSpec:
    """The model config for a model folder in place of `cfg`'s model. A folder written by `stic merge` is loaded in
    the precision it was stored in (a float32 merge cast back to bf16 on loading would lose the update again) and
    never quantised."""
    cfg = dataclasses.replace(cfg, name_or_path=str(path))
    report = Path(path) / "merge_report.json"
    if report.exists():
        cfg = dataclasses.replace(cfg, dtype=json.loads(report.read_text())["dtype"], load_in_4bit=False)
    return cfg


def _float32_base(cfg: ModelSpec, device):
    """The base in float32 and unquantised, to merge adapters into. FlashAttention-2 has no float32 kernels: SDPA."""
    fp32 = dataclasses.replace(cfg, dtype="float32", load_in_4bit=False)
    if cfg.attn_implementation == "flash_attention_2":
        fp32 = dataclasses.replace(fp32, attn_implementation="sdpa")
    return load_model(fp32, device)


def load_adapted_model(cfg: ModelSpec, adapters: list[str], device) -> tuple[object, list[dict]]:
    """The model with trained adapters applied in order, for inference (eval, DaR, stage-2 descriptions).

    Each adapter is merged into float32 weights. The result is cast to the run's dtype (`model.dtype`) only if
    every adapter keeps at least 99% of its update there; otherwise it stays in float32 and a line says why.
    `model.merged_dtype` forces a dtype. A 4-bit base keeps its adapters unmerged (merging into NF4 weights
    would erase them). Returns (model, one survival report per adapter)."""
    from peft import PeftModel

    device = torch.device(device) if device is not None else torch.device("cpu")
    if not adapters:
        return load_model(cfg, device), []
    if cfg.load_in_4bit:
        if len(adapters) > 1:
            raise ModelSetupError("a 4-bit model takes one adapter at inference; merge stage 1 in float32 first "
                                  "(stic merge --dtype float32) and load the merged folder without load_in_4bit")
        # unmerged on the quantised weights, computing in float32: a bf16 activation would round the
        # adapter's small output away
        print("note: 4-bit model: the adapter runs unmerged, with float32 compute")
        base = load_model(dataclasses.replace(cfg, dtype="float32"), device)
        return PeftModel.from_pretrained(base, adapters[0]).eval(), []
    target = torch_dtype(cfg, device) if cfg.merged_dtype == "auto" else _DTYPES[cfg.merged_dtype]
    model = _float32_base(cfg, device)
    reports = []
    for adapter in adapters:
        peft_model = PeftModel.from_pretrained(model, adapter)
        reports.append({"adapter": adapter, **adapter_survival(peft_model, target)})
        model = peft_model.merge_and_unload()
    worst = min(r["kept"] for r in reports)
    if cfg.merged_dtype == "auto" and worst < SURVIVAL_FLOOR:
        print(f"note: {worst:.1%} of the adapter update would survive {reports[0]['dtype']}; "
              "running the adapted model in float32 (set model.merged_dtype to choose)")
    else:
        model = model.to(target)
    return model.eval(), reports


def load_for_inference(cfg: ModelSpec, adapters: list[str], device) -> tuple[object, object]:
    """(model, processor) to generate with: the base with `adapters` merged in order (`load_adapted_model`), e.g.
    [stage-2] for a continued adapter, [stage-1, stage-2] for a new stage-2 adapter on the merged stage-1 model."""
    model, _ = load_adapted_model(cfg, adapters, device)
    return model, load_processor(cfg)


class MergeRefused(SticError, RuntimeError):
    """The output dtype would erase too much of the adapter's update."""


def merge_adapter(model_cfg: ModelSpec, adapter_dir: str, out_dir: str, dtype: str | None = None,
                  force: bool = False) -> tuple[Path, dict]:
    """Write base + adapter as one standalone model folder that plain transformers (and vLLM etc.) load.

    The merge is done in float32. `dtype` is the stored precision (default: `model.dtype`, or the checkpoint's
    own dtype when that is `auto`). The share of the update that survives it is reported in
    `merge_report.json`; below 99% the merge is refused unless `force`, since a bf16 copy of a stage-1 model
    trained at lr 1e-7 is mostly the base model again."""
    from peft import PeftModel

    if model_cfg.load_in_4bit:
        model_cfg = dataclasses.replace(model_cfg, load_in_4bit=False)  # merge into full-precision weights
    if dtype is None and model_cfg.dtype == "auto":  # the checkpoint's own precision, read before loading
        from transformers import AutoConfig

        stored = AutoConfig.from_pretrained(resolve_model_path(model_cfg.name_or_path), revision=model_cfg.revision,
                                            trust_remote_code=model_cfg.trust_remote_code)
        stored = getattr(stored, "dtype", None) or getattr(stored.get_text_config(), "dtype", None)
        dtype = str(stored or "float32")
    elif dtype is None:
        dtype = model_cfg.dtype
    base = _float32_base(model_cfg, "cpu")
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise MergeRefused(f"--dtype {dtype}: choose float32, bfloat16 or float16")
    peft_model = PeftModel.from_pretrained(base, adapter_dir)
    report = {"adapter": adapter_dir, "base": model_cfg.name_or_path,
              **adapter_survival(peft_model, _DTYPES[dtype]),
              "float16_kept": adapter_survival(peft_model, torch.float16)["kept"],
              "bfloat16_kept": adapter_survival(peft_model, torch.bfloat16)["kept"]}
    print(f"merge: {report['kept']:.2%} of the adapter's update survives {dtype} "
          f"(bfloat16 {report['bfloat16_kept']:.2%}, float16 {report['float16_kept']:.2%}, float32 100%)")
    if report["kept"] < SURVIVAL_FLOOR and not force:
        raise MergeRefused(f"only {report['kept']:.2%} of the adapter's update survives {dtype} (< 99%); merge "
                           "with --dtype float32 (or float16 if it keeps enough), or pass --force to write it anyway")
    merged = peft_model.merge_and_unload().to(_DTYPES[dtype])
    out = Path(out_dir)
    merged.save_pretrained(out)
    load_processor(model_cfg, raw=True).save_pretrained(out)  # the template as published: the folder is standard
    (out / "merge_report.json").write_text(json.dumps({**report, "forced": force and report["kept"] < SURVIVAL_FLOOR},
                                                      indent=2) + "\n")
    return out, report
