"""All model loading: any Hugging Face image-text-to-text model with its own processor and chat template, its
dtype and device (with the CPU fallback when there is no GPU), LoRA settings, and trained adapters applied or
merged (in memory for inference, or into a standalone folder by `stic merge`)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
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
    check_model_source(name_or_path)
    return name_or_path


def check_model_source(name_or_path: str, key: str = "model.name_or_path") -> None:
    """Refuse a model that is neither a folder nor a hub id that can resolve, before transformers fails on it
    with a traceback. Online, a hub id is left to the hub (its own error names it)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise ModelSetupError(f"{key} {name_or_path} is a file, not a model folder or hub id")
    parts = name_or_path.split("/")
    hub_like = (not name_or_path.startswith((".", "/", "~")) and 1 <= len(parts) <= 2 and all(parts))
    if not hub_like:
        raise ModelSetupError(f"{key} {name_or_path}: no such folder")
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        raise ModelSetupError(f"{key} {name_or_path}: no such folder, and not in the hub cache (HF_HUB_OFFLINE "
                              "is set, so it cannot be downloaded)")


def stored_dtype(cfg: ModelSpec) -> torch.dtype:
    """The precision the checkpoint is stored in, from its config.json (float32 when it names none)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(cfg.name_or_path), revision=cfg.revision,
                                        trust_remote_code=cfg.trust_remote_code)
    stored = getattr(config, "dtype", None) or getattr(config.get_text_config(), "dtype", None)
    stored = str(stored or "float32").removeprefix("torch.")
    return _DTYPES.get(stored, torch.float32)


def torch_dtype(cfg: ModelSpec, device: torch.device | str | None = None) -> torch.dtype:
    """`model.dtype` as a torch dtype. `auto` is the checkpoint's own precision wherever a GPU computes, including a
    model that loads on the CPU for the Trainer to move (bf16 becomes fp16 on a GPU without bf16); float32 on a
    machine without CUDA, where bf16 matmuls are the bottleneck."""
    if cfg.dtype != "auto":
        return _DTYPES[cfg.dtype]
    if not torch.cuda.is_available():
        return torch.float32
    stored = stored_dtype(cfg)
    return torch.float16 if stored == torch.bfloat16 and not torch.cuda.is_bf16_supported() else stored


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
            # only the language model is quantised: the vision tower, projector (trainable: train_projector) and
            # lm_head stay in full precision, as in LLaVA's QLoRA
            llm_int8_skip_modules=model_skip_patterns(cfg),
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
    lora_vision: bool = option(
        False, help="also adapt the vision encoder with LoRA, as SQ-LLaVA trains it (its base weights stay "
                    "frozen); in stage 2's continue mode: keep training the vision LoRA of the stage-1 adapter")
    lora_vision_r: int = option(32, help="LoRA rank of the vision encoder's layers (SQ-LLaVA: 32)")
    lora_vision_alpha: int = option(64, help="LoRA scaling alpha of the vision encoder's layers (SQ-LLaVA: 64)")
    lora_vision_target_modules: list[str] | None = option(
        None, help="layer names inside the vision encoder to adapt (e.g. [q_proj, v_proj]; Qwen2.5-VL: [qkv]); "
                   "None: every linear layer of the vision encoder, not the projector")

    def __post_init__(self):
        if self.use_peft and (self.lora_r < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1):
            raise ValueError(f"lora_r must be at least 1, lora_alpha positive and lora_dropout in [0, 1), got "
                             f"{self.lora_r}, {self.lora_alpha} and {self.lora_dropout}")
        if self.lora_vision and not self.use_peft:
            raise ValueError("lora_vision needs use_peft: true (full fine-tuning keeps the vision encoder frozen)")
        if self.lora_vision and (self.lora_vision_r < 1 or self.lora_vision_alpha <= 0):
            raise ValueError(f"lora_vision_r must be at least 1 and lora_vision_alpha positive, got "
                             f"{self.lora_vision_r} and {self.lora_vision_alpha}")
        if self.lora_vision_target_modules is not None and not self.lora_vision:
            raise ValueError("lora_vision_target_modules is set but lora_vision is false; set lora_vision: true "
                             "or remove lora_vision_target_modules")
        if self.mm_projector_lr is not None:
            if not self.train_projector:
                raise ValueError("mm_projector_lr is set but train_projector is false; set train_projector: true "
                                 "or remove mm_projector_lr")
            if self.mm_projector_lr <= 0:
                raise ValueError(f"mm_projector_lr must be positive, got {self.mm_projector_lr}")
        parent = getattr(super(), "__post_init__", None)  # the TRL config this is mixed into, if any
        if parent is not None:
            parent()


def _qualified_name(model, target) -> str | None:
    return next((n for n, m in model.named_modules() if m is target), None) if target is not None else None


def language_model_name(model) -> str:
    """Qualified name of the text decoder, found by structure (`get_decoder()`), not by a name: `model.language_model`
    (LLaVA, LLaVA-NeXT, Qwen2.5-VL), `model.text_model` (Idefics3/SmolVLM)."""
    get_decoder = getattr(model, "get_decoder", None)
    name = _qualified_name(model, get_decoder()) if get_decoder is not None else None
    if not name:  # none, or the whole model (transformers' fallback): the text model cannot be told apart
        raise ModelSetupError(f"cannot find the language model of {type(model).__name__} (no get_decoder() "
                              "submodule); set lora_target_modules in the recipe")
    return name


def output_head_name(model) -> str | None:
    get_head = getattr(model, "get_output_embeddings", None)
    return _qualified_name(model, get_head()) if get_head is not None else None


def language_model_linears(model) -> list[str]:
    """Qualified names of every nn.Linear inside the language model (never the output head)."""
    prefix, head = language_model_name(model) + ".", output_head_name(model)
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith(prefix) and n != head]


def language_model_linear_regex(model) -> str:
    """A PEFT target regex (PEFT fullmatches it against qualified names) selecting exactly the language model's
    linear layers: not the vision tower, projector or lm_head."""
    import re

    linears = language_model_linears(model)
    if not linears:
        raise ModelSetupError(f"found no linear layer in the language model of {type(model).__name__}; "
                              "set lora_target_modules in the recipe")
    return _exact_regex(model, language_model_name(model), linears)


def _exact_regex(model, prefix: str, linears: list[str]) -> str:
    """A PEFT target regex that fullmatches exactly the qualified names `linears`, all under `prefix`: by their last
    name, else by their last name and layer number, else (another module shares a last name with one of them, which
    PEFT would refuse or adapt) every name listed."""
    import re

    leaves = "|".join(map(re.escape, sorted({n.rsplit(".", 1)[-1] for n in linears})))
    layers = sorted({int(m.group(1)) for n in linears if (m := re.search(r"\.(?:layers|blocks)\.(\d+)\.", n))})
    numbers = "|".join(map(str, layers))
    candidates = [rf"{re.escape(prefix)}\.(?:.*\.)?({leaves})"]
    if layers:
        candidates.append(rf"{re.escape(prefix)}\.(?:.*\.)?(?:layers|blocks)\.({numbers})\.(?:.*\.)?({leaves})")
    names = [n for n, _ in model.named_modules()]
    for regex in candidates:
        if {n for n in names if re.fullmatch(regex, n)} == set(linears):
            return regex
    return "|".join(map(re.escape, linears))


# The vision encoder, by the name each family gives it: LLaVA and LLaVA-NeXT `vision_tower`, Qwen2.5-VL `visual`
# (which holds the projector, `visual.merger`), Idefics3/SmolVLM `vision_model`.
VISION_TOWER_NAMES = ("vision_tower", "visual", "vision_model")


def vision_tower_name(model) -> str:
    """Qualified name of the vision encoder (the outermost module with one of VISION_TOWER_NAMES)."""
    names = [n for n, _ in model.named_modules()]
    for candidate in VISION_TOWER_NAMES:
        found = [n for n in names if n == candidate or n.endswith("." + candidate)]
        if found:
            return found[0]
    raise ModelSetupError(f"no vision encoder ({', '.join(VISION_TOWER_NAMES)}) in {type(model).__name__}; "
                          "lora_vision cannot find the layers to adapt")


def vision_layers_read(model) -> int | None:
    """How many encoder layers of the vision encoder reach the image features: LLaVA and LLaVA-NeXT read the hidden
    state `vision_feature_layer` (-2: the one before the last layer), so the layers after it never reach the loss.
    None: every layer (Qwen2.5-VL, Idefics3)."""
    config = getattr(model, "config", None)
    feature = getattr(config, "vision_feature_layer", None)
    depth = getattr(getattr(config, "vision_config", None), "num_hidden_layers", None)
    if feature is None or depth is None:
        return None
    read = [feature] if isinstance(feature, int) else list(feature)
    return max(f if f >= 0 else depth + 1 + f for f in read)  # hidden state h is the output of layer h - 1


def vision_linears(model) -> list[str]:
    """Qualified names of the nn.Linear layers of the vision encoder whose output the model uses: not a projector
    inside it (Qwen's merger), nor a layer after the one LLaVA takes its features from (it would get no gradient,
    and DDP refuses a trainable parameter without one)."""
    import re

    prefix = vision_tower_name(model) + "."
    try:
        projector = projector_module(model) + "."
    except ModelSetupError:
        projector = None
    read = vision_layers_read(model)

    def used(name: str) -> bool:
        layer = re.search(r"\.layers\.(\d+)\.", name[len(prefix) - 1:])
        return read is None or layer is None or int(layer.group(1)) < read

    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefix)
            and not (projector and n.startswith(projector)) and used(n)]


def vision_linear_regex(model, leaves: list[str] | None = None) -> str:
    """A PEFT target regex selecting the vision encoder's linear layers (those named `leaves`, else all)."""
    linears = vision_linears(model)
    if leaves:
        found = {n.rsplit(".", 1)[-1] for n in linears}
        missing = [leaf for leaf in leaves if leaf not in found]
        if missing:
            raise ModelSetupError(f"lora_vision_target_modules: no layer {', '.join(missing)} in the vision encoder "
                                  f"of {type(model).__name__} (it has: {', '.join(sorted(found))})")
        linears = [n for n in linears if n.rsplit(".", 1)[-1] in leaves]
    if not linears:
        raise ModelSetupError(f"found no linear layer in the vision encoder of {type(model).__name__}")
    return _exact_regex(model, vision_tower_name(model), linears)


def quantization_skip_patterns(model_or_config, trust_remote_code: bool = False) -> list[str]:
    """`llm_int8_skip_modules` that keep all but the language model out of 4-bit: every module beside the text
    decoder on the way to it (vision tower, projector, lm_head), by qualified name.

    transformers' bitsandbytes quantizer tests each module with `should_convert_module`, which matches a pattern
    from the start of the qualified name or as its suffix, so a bare `multi_modal_projector` would not spare
    `model.multi_modal_projector.linear_1`. A config is instantiated on the meta device to read the structure."""
    model = model_or_config
    if not isinstance(model, torch.nn.Module):
        from transformers import AutoModelForImageTextToText

        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(
                model_or_config, trust_remote_code=trust_remote_code)
    decoder = language_model_name(model)
    patterns, path = [], ""
    for part in decoder.split("."):  # each module on the way down: its other children stay unquantised
        parent = model.get_submodule(path)
        for child_name, child in parent.named_children():
            if child_name != part and any(isinstance(m, torch.nn.Linear) for m in child.modules()):
                patterns.append(f"{path}.{child_name}" if path else child_name)
        path = f"{path}.{part}" if path else part
    head = output_head_name(model)
    if head and not any(head == p or head.startswith(p + ".") for p in patterns):
        patterns.append(head)
    return patterns


def model_skip_patterns(cfg: ModelSpec) -> list[str]:
    """`quantization_skip_patterns` of the model `cfg` names, read from its config (no weights loaded)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(cfg.name_or_path), revision=cfg.revision,
                                        trust_remote_code=cfg.trust_remote_code)
    return quantization_skip_patterns(config, trust_remote_code=cfg.trust_remote_code)


PROJECTOR_NAMES = ("multi_modal_projector", "visual.merger", "connector", "mm_projector")


def projector_module(model) -> str:
    names = dict(model.named_modules())
    for candidate in PROJECTOR_NAMES:
        found = [n for n in names if n == candidate or n.endswith("." + candidate)]
        if found:
            return found[0]
    raise ModelSetupError(f"no projector module ({', '.join(PROJECTOR_NAMES)}) in {type(model).__name__}")


def lora_config(cfg: LoraOptions, model):
    """One LoraConfig for the stage: the language model's layers at lora_r/lora_alpha and, with lora_vision, the
    vision encoder's at lora_vision_r/lora_vision_alpha (PEFT's rank_pattern/alpha_pattern), in one adapter."""
    from peft import LoraConfig

    targets = cfg.lora_target_modules or language_model_linear_regex(model)
    vision = {}
    if cfg.lora_vision:
        import re

        regex = vision_linear_regex(model, cfg.lora_vision_target_modules)
        # names in lora_target_modules keep PEFT's meaning (the name, or its last parts) outside the vision encoder
        language = targets if isinstance(targets, str) else rf"(?:.*\.)?(?:{'|'.join(map(re.escape, targets))})"
        targets = rf"(?!{re.escape(vision_tower_name(model))}\.)(?:{language})|(?:{regex})"
        vision = {"rank_pattern": {regex: cfg.lora_vision_r}, "alpha_pattern": {regex: cfg.lora_vision_alpha}}
    return LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
        modules_to_save=[projector_module(model)] if cfg.train_projector else None, task_type="CAUSAL_LM", **vision,
    )


# -------------------------------------------------------------------------------------------------------------
# Trained adapters at inference: keep the update that low precision would erase
#
# Stage 1 trains at lr 1e-7; the LoRA weight change it leaves (rms ~1e-5) is below half a bf16 ulp of typical
# 7B weights (~0.02), so merging it into bf16 weights rounds most of it back to the base, and an fp16 copy of a
# bf16 base distorts it. Adapters are therefore merged in float32, and a comparison (the base and its adapted
# models) runs in the model's dtype only when every adapter's update survives it; otherwise all of it runs in
# float32.

MAX_UPDATE_ERROR = 0.03  # largest relative error ||q - delta|| / ||delta|| a dtype may put on an adapter's update


def update_error_terms(base: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> tuple[float, float]:
    """(sum (q - delta)^2, sum delta^2), where q = round(base + delta) - round(base) in `dtype` is the change a run
    sees between the base and the adapted model when both are evaluated in `dtype`.

    sqrt of their ratio is the relative error of the update: 0 when the cast keeps it, about 1 when it rounds away,
    and more when rounding adds noise larger than the update (a base not on the dtype's grid, e.g. fp16 weights
    run in bf16). A projection (sum q*delta) would average that noise away and report the update as kept."""
    base32, delta32 = base.detach().float(), delta.detach().float()
    q = (base32 + delta32).to(dtype).float() - base32.to(dtype).float()
    return float((q - delta32).pow(2).sum()), float(delta32.pow(2).sum())


def adapter_survival(peft_model, dtype: torch.dtype) -> dict:
    """How exactly a PeftModel's (unmerged) update survives merging and running in `dtype`: its relative `error`.

    Covers every LoRA layer (its delta weight) and every fully trained module (modules_to_save, e.g. the
    projector: trained minus original weights)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    err = den = 0.0
    layers = 0
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and hasattr(module.get_base_layer(), "weight"):
            for name in module.active_adapters:
                if name not in module.lora_A:
                    continue
                e, d = update_error_terms(module.get_base_layer().weight, module.get_delta_weight(name), dtype)
                err, den, layers = err + e, den + d, layers + 1
        elif isinstance(module, ModulesToSaveWrapper):
            original = dict(module.original_module.named_parameters())
            for name in module.active_adapters:
                if name not in module.modules_to_save:
                    continue
                for pname, p in module.modules_to_save[name].named_parameters():
                    e, d = update_error_terms(original[pname], p.float() - original[pname].float(), dtype)
                    err, den, layers = err + e, den + d, layers + 1
    error = (err / den) ** 0.5 if den > 0 else 0.0
    return {"dtype": str(dtype).removeprefix("torch."), "error": round(error, 6), "update_sq_sum": den,
            "tensors": layers}


def merged_folder_config(cfg: ModelSpec, path: str) -> ModelSpec:
    """The model config for a model folder in place of `cfg`'s model. A folder written by `stic merge`, or by a full
    fine-tune, is loaded in the precision it was stored or trained in (a float32 result cast back to bf16 on
    loading would lose the update again) and never quantised."""
    cfg = dataclasses.replace(cfg, name_or_path=str(path))
    for record in (MERGE_REPORT, TRAINED_PRECISION):
        if (Path(path) / record).exists():
            return dataclasses.replace(cfg, dtype=json.loads((Path(path) / record).read_text())["dtype"],
                                       load_in_4bit=False)
    return cfg


MERGE_REPORT = "merge_report.json"
# A full fine-tune keeps its trained weights in float32 (master weights) while config.json names the dtype of the
# first parameter (the frozen bf16 vision tower): this file says which precision to load the folder in.
TRAINED_PRECISION = "trained_precision.json"


def record_trained_precision(model, out_dir: str) -> None:
    """After a full fine-tune: the folder's weights are loaded back in float32 if any trained tensor is float32."""
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    if torch.float32 in trained:
        (Path(out_dir) / TRAINED_PRECISION).write_text(json.dumps(
            {"dtype": "float32", "why": "trained with float32 master weights; a bf16/fp16 load rounds the update "
                                        "away"}, indent=2) + "\n")


def _float32_base(cfg: ModelSpec, device):
    """The base in float32 and unquantised, to merge adapters into. FlashAttention-2 has no float32 kernels: SDPA."""
    fp32 = dataclasses.replace(cfg, dtype="float32", load_in_4bit=False)
    if cfg.attn_implementation == "flash_attention_2":
        fp32 = dataclasses.replace(fp32, attn_implementation="sdpa")
    return load_model(fp32, device)


def adapter_token_rows(adapter: str) -> int | None:
    """The embedding rows an adapter's own tokens need (stage 2's questioner_token: PEFT trainable_token_indices),
    None for an adapter without tokens of its own (or not a local folder)."""
    path = Path(adapter) / "adapter_config.json"
    indices = json.loads(path.read_text()).get("trainable_token_indices") if path.is_file() else None
    if not indices:
        return None
    ids = [i for v in indices.values() for i in v] if isinstance(indices, dict) else list(indices)
    return max(ids) + 1


def grow_token_embeddings(model, rows: int, known_rows: int, reset_from: int | None = None) -> dict:
    """Grow the input embeddings (and an untied output head) to at least `rows` rows. Rows from `reset_from`
    (default: the first new one) start at the mean of the first `known_rows` rows: deterministic, unlike
    transformers' mean_resizing, which draws them at random around that mean."""
    before = model.get_input_embeddings().weight.shape[0]
    if rows > before:
        model.resize_token_embeddings(rows, mean_resizing=False)
    start = before if reset_from is None else reset_from
    layers = [model.get_input_embeddings()]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not layers[0].weight:
        layers.append(head)
    with torch.no_grad():
        for layer in layers:
            layer.weight[start:rows] = layer.weight[:known_rows].float().mean(0).to(layer.weight.dtype)
    return {"rows_before": before, "rows": model.get_input_embeddings().weight.shape[0]}


def grow_embeddings_for(model, adapter: str) -> None:
    """Grow the base's embeddings to hold the adapter's own tokens before it is applied (as stage 2 grew them; the
    adapter holds the trained input rows)."""
    rows = adapter_token_rows(adapter)
    before = model.get_input_embeddings().weight.shape[0]
    if rows and rows > before:
        grow_token_embeddings(model, rows, before)


def adapter_processor(cfg: ModelSpec, adapters: list[str], raw: bool = False):
    """The processor to use with `adapters`: the one saved beside the last adapter that added tokens (stage 2 saves
    it with its questioner token), otherwise the base's."""
    from transformers import AutoProcessor

    own = [a for a in adapters if adapter_token_rows(a)]
    if not own:
        return load_processor(cfg, raw=raw)
    processor = AutoProcessor.from_pretrained(own[-1])
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    if not raw and getattr(processor, "chat_template", None):
        processor.chat_template = trained_chat_template(processor)
    return processor


def load_adapted_model(cfg: ModelSpec, adapters: list[str], device,
                       compared_with: list[str] = ()) -> tuple[object, dict]:
    """The model with trained adapters applied in order, for inference (eval, DaR, stage-2 descriptions).

    Each adapter is merged into float32 weights. The result runs in the model's dtype (`model.dtype`) only if
    every adapter's update survives it (relative error at most MAX_UPDATE_ERROR); otherwise in float32, and a line
    says why. `compared_with` names the adapters of the other models of one comparison (the base's eval judges
    the recipe's stage-1 and stage-2 adapters), so that the base and every adapted model run in one precision.
    `model.merged_dtype` forces a dtype. A 4-bit base keeps its adapter unmerged (merging into NF4 weights would
    erase it). Returns (model, precision record: the dtype it runs in and one survival report per adapter)."""
    from peft import PeftModel

    device = torch.device(device) if device is not None else torch.device("cpu")
    target = torch_dtype(cfg, device) if cfg.merged_dtype == "auto" else _DTYPES[cfg.merged_dtype]
    others = [a for a in dict.fromkeys(compared_with) if a not in adapters]
    if cfg.load_in_4bit:
        if len(adapters) > 1:
            raise ModelSetupError("a 4-bit model takes one adapter at inference; merge stage 1 in float32 first "
                                  "(stic merge --dtype float32) and load the merged folder without load_in_4bit")
        # unmerged on the quantised weights, computing in float32: a bf16 activation would round the
        # adapter's small output away. The base alone computes in float32 as well, for one precision per comparison.
        model = load_model(dataclasses.replace(cfg, dtype="float32"), device)
        if adapters:
            print("note: 4-bit model: the adapter runs unmerged, with float32 compute")
            grow_embeddings_for(model, adapters[0])
            model = PeftModel.from_pretrained(model, adapters[0]).eval()
        return model, {"dtype": "nf4 (float32 compute)", "adapters": [{"adapter": a} for a in adapters]}
    if target == torch.float32:
        others = []  # nothing to judge: float32 keeps every update
    name = str(target).removeprefix("torch.")
    if not adapters and not others:  # the base alone, in the dtype every model of its comparison would run in
        model = _float32_base(cfg, device) if target == torch.float32 else load_model(
            dataclasses.replace(cfg, dtype=name), device)
        return model, {"dtype": name, "target": name, "adapters": []}
    model = _float32_base(cfg, device)
    reports = []
    for adapter in others:  # judged, not applied
        originals = dict(model.named_modules())
        grow_embeddings_for(model, adapter)
        peft_model = PeftModel.from_pretrained(model, adapter)
        reports.append({"adapter": adapter, "applied": False, **adapter_survival(peft_model, target)})
        model = peft_model.unload()
        # unload() hands back a trained modules_to_save copy (the projector) in place of the original: put the
        # base's own modules back, so the adapter leaves nothing behind
        for name, module in list(model.named_modules()):
            if name and name in originals and originals[name] is not module:
                model.set_submodule(name, originals[name])
    for adapter in adapters:
        grow_embeddings_for(model, adapter)
        peft_model = PeftModel.from_pretrained(model, adapter)
        reports.append({"adapter": adapter, **adapter_survival(peft_model, target)})
        model = peft_model.merge_and_unload()
    worst = max(reports, key=lambda r: r["error"])
    if cfg.merged_dtype == "auto" and worst["error"] > MAX_UPDATE_ERROR:
        print(f"note: {name} would change the update of {worst['adapter']} by {worst['error']:.0%} (relative "
              f"error, limit {MAX_UPDATE_ERROR:.0%}); running {'the base' if not adapters else 'the adapted model'} "
              "in float32, as every model of this comparison (set model.merged_dtype to choose)")
    else:
        model = model.to(target)
    return model.eval(), {"dtype": str(model.dtype).removeprefix("torch."), "target": name,
                          "max_update_error": MAX_UPDATE_ERROR, "adapters": reports}


def load_for_inference(cfg: ModelSpec, adapters: list[str], device,
                       compared_with: list[str] = ()) -> tuple[object, object]:
    """(model, processor) to generate with: the base with `adapters` merged in order (`load_adapted_model`), e.g.
    [stage-2] for a continued adapter, [stage-1, stage-2] for a new stage-2 adapter on the merged stage-1 model.
    The precision it runs in is the model's `stic_precision` attribute."""
    model, precision = load_adapted_model(cfg, adapters, device, compared_with)
    model.stic_precision = precision
    return model, adapter_processor(cfg, adapters)


class MergeRefused(SticError, RuntimeError):
    """The output dtype would erase too much of the adapter's update."""


def merge_adapter(model_cfg: ModelSpec, adapter_dir: str, out_dir: str, dtype: str | None = None,
                  force: bool = False, overwrite: bool = False, fallback_dtype: str | None = None) -> tuple[Path, dict]:
    """Write base + adapter as one standalone model folder that plain transformers (and vLLM etc.) load.

    The merge is done in float32. `dtype` is the stored precision (default: `model.dtype`, or the checkpoint's
    own dtype when that is `auto`). The share of the update that survives it is reported in
    `merge_report.json`; below 99% the merge is refused unless `force`, since a bf16 copy of a stage-1 model
    trained at lr 1e-7 is mostly the base model again.

    The folder is written beside `out_dir` and renamed into place with its report, so it exists whole or not at
    all. An existing `out_dir` is replaced only if it is an earlier complete merge and `overwrite` is set.

    `fallback_dtype` (`stic rounds` passes float32): where `dtype` would be refused, store in it instead of refusing;
    the report's `requested_dtype` keeps the dtype asked for."""
    from stic.locks import output_lock

    out = Path(out_dir)
    with output_lock(out):  # one merge at a time writes out_dir and its partial sibling
        _check_merge_target(out, overwrite)
        return _merge(model_cfg, adapter_dir, out, dtype, force, fallback_dtype)


def _check_merge_target(out: Path, overwrite: bool) -> None:
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not (out / MERGE_REPORT).is_file():
        raise MergeRefused(f"{out} exists and is not a complete merge (no {MERGE_REPORT}); nothing was written: "
                           "choose another --output, or move it away")
    if not overwrite:
        raise MergeRefused(f"{out} already holds a merged model; pass --overwrite to replace it, or choose another "
                           "--output")


def _merge(model_cfg: ModelSpec, adapter_dir: str, out: Path, dtype: str | None, force: bool,
           fallback_dtype: str | None = None) -> tuple[Path, dict]:
    from peft import PeftModel

    if model_cfg.load_in_4bit:
        model_cfg = dataclasses.replace(model_cfg, load_in_4bit=False)  # merge into full-precision weights
    if dtype is None and model_cfg.dtype == "auto":  # the checkpoint's own precision, read before loading
        dtype = str(stored_dtype(model_cfg))
    elif dtype is None:
        dtype = model_cfg.dtype
    base = _float32_base(model_cfg, "cpu")
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise MergeRefused(f"--dtype {dtype}: choose float32, bfloat16 or float16")
    grow_embeddings_for(base, adapter_dir)
    peft_model = PeftModel.from_pretrained(base, adapter_dir)
    report = {"adapter": adapter_dir, "base": model_cfg.name_or_path,
              **adapter_survival(peft_model, _DTYPES[dtype]),
              "float16_error": adapter_survival(peft_model, torch.float16)["error"],
              "bfloat16_error": adapter_survival(peft_model, torch.bfloat16)["error"]}
    print(f"merge: storing in {dtype} changes the adapter's update by {report['error']:.2%} (relative error; "
          f"bfloat16 {report['bfloat16_error']:.2%}, float16 {report['float16_error']:.2%}, float32 0%)")
    if report["error"] > MAX_UPDATE_ERROR and not force and fallback_dtype not in (None, dtype):
        print(f"merge: storing in {fallback_dtype} instead, which keeps the update")
        report = {**report, "requested_dtype": dtype, **adapter_survival(peft_model, _DTYPES[fallback_dtype])}
        dtype = fallback_dtype
    if report["error"] > MAX_UPDATE_ERROR and not force:
        raise MergeRefused(f"{dtype} would change the adapter's update by {report['error']:.0%} (relative error, "
                           f"limit {MAX_UPDATE_ERROR:.0%}); merge with --dtype float32 (or float16 if it keeps the "
                           "update), or pass --force to write it anyway")
    merged = peft_model.merge_and_unload().to(_DTYPES[dtype])
    partial, replaced = out.parent / f".{out.name}.partial", out.parent / f".{out.name}.replaced"
    shutil.rmtree(partial, ignore_errors=True)  # left by a merge killed while writing
    merged.save_pretrained(partial)
    # the template as published: the folder is standard (with the adapter's own tokens, if it added any)
    adapter_processor(model_cfg, [adapter_dir], raw=True).save_pretrained(partial)
    (partial / MERGE_REPORT).write_text(json.dumps(
        {**report, "forced": force and report["error"] > MAX_UPDATE_ERROR}, indent=2) + "\n")
    if out.exists():  # an earlier merge (checked above) or an empty folder: moved aside, then dropped
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(out, replaced)
    os.replace(partial, out)
    shutil.rmtree(replaced, ignore_errors=True)
    return out, report
