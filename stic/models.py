"""Load any Hugging Face image-text-to-text model with its own processor and chat template."""

from __future__ import annotations

import dataclasses

import torch

from stic.config import ModelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name_or_path: str) -> str:
    """Hub id or local folder as given; `tiny:<family>[@seed]` is built offline on first use."""
    if name_or_path.startswith("tiny:"):
        from stic.tiny import tiny_model_path

        return str(tiny_model_path(name_or_path))
    return name_or_path


def torch_dtype(cfg: ModelConfig, device: torch.device):
    if cfg.dtype != "auto":
        return _DTYPES[cfg.dtype]
    # bf16 where the hardware has it, full precision on CPU (bf16 matmuls are slow there)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_processor(cfg: ModelConfig):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(
        resolve_model_path(cfg.name_or_path), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    if processor.tokenizer.pad_token is None:  # e.g. Mistral-based LLaVA-NeXT ships without one
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor


def load_model(cfg: ModelConfig, device: torch.device | str | None = None):
    """The model in eval mode on `device` (or spread by `device_map`), with dtype/attention/4-bit from `cfg`."""
    from transformers import AutoModelForImageTextToText

    device = torch.device(device) if device is not None else torch.device("cpu")
    kwargs: dict = {"dtype": torch_dtype(cfg, device), "revision": cfg.revision,
                    "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.load_in_4bit:
        if device.type != "cuda":
            raise RuntimeError("model.load_in_4bit needs a CUDA GPU (bitsandbytes NF4); set it to false on CPU")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"],
        )
        kwargs["device_map"] = cfg.device_map or {"": device.index or 0}
    elif cfg.device_map:
        kwargs["device_map"] = cfg.device_map
    model = AutoModelForImageTextToText.from_pretrained(resolve_model_path(cfg.name_or_path), **kwargs)
    if "device_map" not in kwargs:
        model.to(device)
    return model.eval()


# -------------------------------------------------------------------------------------------------------------
# Adapters, shared by the training stages


@dataclasses.dataclass
class LoraOptions:
    """LoRA settings of a training stage (mixed into its TRL config). Defaults: the paper's r 128, alpha 256."""

    use_peft: bool = True
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    # None: every linear layer of the language model (the vision tower and lm_head stay frozen)
    lora_target_modules: list[str] | None = None
    train_projector: bool = False  # also train the vision-language projector (fully, next to the adapter)


def language_model_linear_regex(model) -> str:
    """A PEFT target regex for the language model's linear layers (not the vision tower, projector, lm_head)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "language_model" in name and "lm_head" not in name:
            names.add(name.rsplit(".", 1)[-1])
    if not names:
        raise RuntimeError(f"found no linear layer under a 'language_model' module in {type(model).__name__}; "
                           "set lora_target_modules in the recipe")
    return rf".*language_model.*\.({'|'.join(sorted(names))})"


PROJECTOR_NAMES = ("multi_modal_projector", "visual.merger", "connector", "mm_projector")


def projector_module(model) -> str:
    names = dict(model.named_modules())
    for candidate in PROJECTOR_NAMES:
        found = [n for n in names if n == candidate or n.endswith("." + candidate)]
        if found:
            return found[0]
    raise RuntimeError(f"no projector module ({', '.join(PROJECTOR_NAMES)}) in {type(model).__name__}")


def lora_config(cfg: LoraOptions, model):
    from peft import LoraConfig

    targets = cfg.lora_target_modules or language_model_linear_regex(model)
    return LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
        modules_to_save=[projector_module(model)] if cfg.train_projector else None, task_type="CAUSAL_LM",
    )
