"""The GPU check: the toolkit's own stages on real-shaped 7B models with random weights, built in code from the
published configs (no download: the GPU machine may have no network at all).

    make gpu-check [ARGS="--families llava --layers 8"]      # or: python -m stic.bench.gpu_check ...

Families (the model folder: std-0.02 random weights in bf16, stic/tiny.py's offline tokenizer and template, the
published image processor settings):
  llava        llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px (576 image tokens) + Llama-2-7B (32 x 4096),
               the mlp2x_gelu projector, vocabulary 32064
  llava_next   llava-hf/llava-v1.6-mistral-7b-hf: the same CLIP + Mistral-7B-Instruct-v0.2, anyres grid pinpoints
  qwen2_5_vl   Qwen/Qwen2.5-VL-7B-Instruct: its config.json (3584 wide, 28 layers; vision tower 32 deep)

Per family, each in its own process (clean peak memory), through the stages' own code on the family's recipe
(recipes/<model>.yaml, its model pointed at the folder, `max_steps` steps, no accumulation):
  preflight      `stic preflight`'s checks (stic.preflight.preflight_dpo), and check 8's memory estimate
  selfgen        images/s and tokens/s, batched against one image at a time (stic.bench.selfgen's loop), greedy
                 with EOS off, beside the decode roofline: (language-model weight bytes + KV cache read per step)
                 / the card's HBM bandwidth (by device name: H100, H200, A100; --hbm-tbps overrides)
  stage 1        `--steps` steps with LoRA, then with QLoRA (bitsandbytes NF4): peak memory
                 (torch.cuda.max_memory_allocated) against preflight's estimate for the same recipe
  FSDP           the same steps under `accelerate launch` with recipes/accelerate/fsdp.yaml on 2 GPUs

Prints one table and writes JSON (--out). Without CUDA the CPU-runnable rows run (shrink the models with
--layers and --width-divisor) and the GPU-only ones read "skipped: no GPU".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from stic.errors import SticError, one_line

REPO = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------------------------------------------
# The published shapes (config.json of each hub checkpoint; LLaVA-NeXT's language model is the text config of
# mistralai/Mistral-7B-Instruct-v0.2, its vocabulary grown by <image> and <pad> and padded to a multiple of 64)

CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768)
LLAMA2_7B = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
MISTRAL_7B = dict(vocab_size=32064, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6}, sliding_window=None)
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
QWEN2_5_VL_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                       rms_norm_eps=1e-6, tie_word_embeddings=False,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
QWEN2_5_VL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                         patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                         fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")
QWEN2_5_VL_PIXELS = dict(min_pixels=3136, max_pixels=12845056)  # preprocessor_config.json

# family: (hub id, its parameter count as published (the hub page; Qwen: safetensors total_size / 2), recipe)
PUBLISHED = {
    "llava": ("llava-hf/llava-1.5-7b-hf", 7.06e9, "llava-1.5-7b.yaml"),
    "llava_next": ("llava-hf/llava-v1.6-mistral-7b-hf", 7.57e9, "llava-v1.6-mistral-7b.yaml"),
    "qwen2_5_vl": ("Qwen/Qwen2.5-VL-7B-Instruct", 8_292_166_656, "qwen2.5-vl-7b.yaml"),
}
FAMILIES = tuple(PUBLISHED)

# HBM bandwidth in bytes/s by device name, from the vendors' datasheets; the first pattern all of whose words
# occur in torch.cuda.get_device_name() wins
HBM_BANDWIDTH = [
    (("H200",), 4.8e12),
    (("H100", "NVL"), 3.9e12), (("H100", "PCIe"), 2.0e12), (("H100",), 3.35e12),
    (("A100", "80GB", "PCIe"), 1.935e12), (("A100", "80GB"), 2.039e12), (("A100",), 1.555e12),
]


class GpuCheckError(SticError, RuntimeError):
    """The check cannot start here (a missing package, an unknown family); the message says which."""


def hbm_bandwidth(device_name: str, override_tbps: float | None = None) -> float | None:
    """Bytes/s of the card's memory: the override (TB/s) when given, else from HBM_BANDWIDTH; None if unknown."""
    if override_tbps:
        return override_tbps * 1e12
    words = device_name.replace("-", " ").split()
    for pattern, bandwidth in HBM_BANDWIDTH:
        if all(p in words for p in pattern):
            return bandwidth
    return None


def decode_roofline(weight_bytes: int, kv_bytes_per_token: int, context: float, batch: int,
                    bandwidth: float) -> float:
    """The most tokens/s a memory-bound decode step can give: each step reads every weight of the language model
    once and each sequence's KV cache at `context` tokens, and yields one token per sequence."""
    step_s = (weight_bytes + batch * kv_bytes_per_token * context) / bandwidth
    return batch / step_s


# ---------------------------------------------------------------------------------------------------------
# Real-shaped models


def _narrow_text(text: dict, layers: int | None, divisor: int, min_vocab: int) -> dict:
    """A text config cut to `layers` deep and 1/divisor wide (head count, MLP, vocabulary; head size kept, so
    rotary sections still fit). divisor 1 and no layers: the config as published."""
    heads = max(1, text["num_attention_heads"] // divisor)
    kv = max(1, text["num_key_value_heads"] // divisor)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    vocab = -(-(text["vocab_size"] // divisor) // 64) * 64  # padded to 64, as the published vocabularies are
    return {**text, "num_hidden_layers": min(layers or text["num_hidden_layers"], text["num_hidden_layers"]),
            "num_attention_heads": heads, "num_key_value_heads": kv if heads % kv == 0 else 1,
            "hidden_size": head_dim * heads, "intermediate_size": text["intermediate_size"] // divisor,
            "vocab_size": max(vocab, min_vocab)}


def _narrow_vision(vision: dict, layers: int | None, divisor: int, depth_key: str, heads_key: str) -> dict:
    heads = max(1, vision[heads_key] // divisor)
    head_dim = vision["hidden_size"] // vision[heads_key]
    return {**vision, depth_key: min(layers or vision[depth_key], vision[depth_key]), heads_key: heads,
            "hidden_size": head_dim * heads, "intermediate_size": vision["intermediate_size"] // divisor}


def real_processor(family: str):
    """The family's processor with the published image settings around stic/tiny.py's offline tokenizer and chat
    template (the real tokenizers cannot be downloaded here; their vocabulary only sizes the embeddings)."""
    from transformers import (CLIPImageProcessor, LlavaNextImageProcessor, LlavaNextProcessor, LlavaProcessor,
                              Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    from stic.tiny import build_tiny_model

    _, tiny = build_tiny_model(family)
    tokenizer, template = tiny.tokenizer, tiny.chat_template
    side = CLIP_L_336["image_size"]
    clip = dict(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    patches = dict(patch_size=CLIP_L_336["patch_size"], vision_feature_select_strategy="default",
                   num_additional_image_tokens=1)
    if family == "llava":
        return LlavaProcessor(image_processor=CLIPImageProcessor(**clip), tokenizer=tokenizer, chat_template=template,
                              **patches)
    if family == "llava_next":
        return LlavaNextProcessor(
            image_processor=LlavaNextImageProcessor(**clip, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS),
            tokenizer=tokenizer, chat_template=template, **patches)
    if family == "qwen2_5_vl":
        return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**QWEN2_5_VL_PIXELS), tokenizer=tokenizer,
                                   video_processor=Qwen2VLVideoProcessor(**QWEN2_5_VL_PIXELS), chat_template=template)
    raise GpuCheckError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")


def real_config(family: str, tokenizer, layers: int | None = None, width_divisor: int = 1):
    """The published config of `family` (cut with `layers`/`width_divisor`), its special-token ids the tokenizer's."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig, MistralConfig,
                              Qwen2_5_VLConfig)

    tid = tokenizer.convert_tokens_to_ids
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if family in ("llava", "llava_next"):
        vision = CLIPVisionConfig(**_narrow_vision(CLIP_L_336, layers, width_divisor, "num_hidden_layers",
                                                   "num_attention_heads"))
        shared = dict(vision_config=vision, image_token_id=tid("<image>"), vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=False)
        if family == "llava":
            text = LlamaConfig(**_narrow_text(LLAMA2_7B, layers, width_divisor, len(tokenizer)), **ids)
            return LlavaConfig(text_config=text, **shared)
        text = MistralConfig(**_narrow_text(MISTRAL_7B, layers, width_divisor, len(tokenizer)), **ids)
        return LlavaNextConfig(text_config=text, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, **shared)
    if family == "qwen2_5_vl":
        text = _narrow_text(QWEN2_5_VL_TEXT, layers, width_divisor, len(tokenizer))
        vision = _narrow_vision(QWEN2_5_VL_VISION, layers, width_divisor, "depth", "num_heads")
        vision["out_hidden_size"] = text["hidden_size"]
        return Qwen2_5_VLConfig(
            text_config={**text, "bos_token_id": tid("<|endoftext|>"), "eos_token_id": tid("<|im_end|>"),
                         "pad_token_id": tid("<|endoftext|>")},
            vision_config=vision, image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
            vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"),
            tie_word_embeddings=False)
    raise GpuCheckError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")


def count_parameters(config) -> int:
    """Parameters of the model `config` describes, built on the meta device (no memory)."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return sum(p.numel() for p in model.parameters())


def real_shaped_model(family: str, out_dir: str | os.PathLike, layers: int | None = None, width_divisor: int = 1,
                      device: str = "cpu", seed: int = 0) -> Path:
    """A model folder as a hub checkpoint of `family` is stored: the published shapes (cut with `layers`,
    `width_divisor`), every Linear weight drawn at std 0.02 (as stic.tiny.hub_shaped_model), saved in bf16 with the
    real processor settings. Built on `device` (a GPU builds 7B in seconds); an existing folder is reused."""
    from transformers import AutoModelForImageTextToText

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    processor = real_processor(family)
    config = real_config(family, processor.tokenizer, layers, width_divisor)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 0.02, generator=gen)
    tok = processor.tokenizer
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    tmp = out.with_name(f".{out.name}-partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="5GB")  # shards as the hub's
    processor.save_pretrained(tmp)
    (tmp / "stic_real_shaped.json").write_text(json.dumps(
        {"family": family, "published": PUBLISHED[family][0], "layers": layers, "width_divisor": width_divisor}) + "\n")
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------------------
# Data and recipes

# image sizes of the rows (w, h): a photo, the widest aspect an anyres grid takes, a portrait and a square
IMAGE_SIZES = [(640, 480), (1008, 336), (480, 640), (336, 336)]
WORDS = ("the red car is parked near a small tree while two people walk along the street under a grey sky "
         "and a dog sits by the door of a white house with blue windows").split()


def photos(n: int) -> list:
    """n images with structure (gradients, a block, noise) at IMAGE_SIZES in turn."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        w, h = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 40 * i % 255)], -1)
        img = img + rng.integers(0, 32, img.shape)
        img[h // 4:h // 2, w // 3:w // 2] = rng.integers(0, 255, 3)
        out.append(Image.fromarray(img.clip(0, 255).astype(np.uint8)))
    return out


def preference_data(root: Path, n: int = 8) -> Path:
    """n preference rows in selfgen's format (parquet parts under root/data), ~80-word answers."""
    import datasets
    import numpy as np

    datasets.disable_progress_bars()
    rng = np.random.default_rng(1)
    text = lambda k: " ".join(rng.choice(WORDS, size=k))
    rows = [{"prompt": [{"role": "user", "content": "Describe the image in detail."}],
             "chosen": [{"role": "assistant", "content": text(80)}],
             "rejected": [{"role": "assistant", "content": text(80)}], "images": [image]}
            for image in photos(n)]
    (root / "data").mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).cast_column("images", datasets.List(datasets.Image())).to_parquet(
        str(root / "data" / "train-0.parquet"))
    return root


def write_recipe(family: str, model_dir: Path, data: Path, run_dir: Path, path: Path, steps: int,
                 qlora: bool = False, cuda: bool = True) -> Path:
    """The family's recipe with its model pointed at `model_dir`, `steps` optimizer steps of one micro-batch
    each, nothing saved but the run's summary. Everything else (LoRA r, rates, checkpointing, sdpa) as shipped."""
    import yaml

    shipped = REPO / "recipes" / PUBLISHED[family][2]
    if not shipped.is_file():
        raise GpuCheckError(f"{shipped} not found: run the check from a checkout of the toolkit")
    data_ = yaml.safe_load(shipped.read_text())
    data_["model"].update(name_or_path=str(model_dir), dtype="auto", load_in_4bit=qlora)
    data_["dpo"].update(output_dir=str(run_dir), dataset=str(data), max_steps=steps, global_batch_size=None,
                        gradient_accumulation_steps=1, save_strategy="no", report_to=[], plot=False,
                        logging_steps=max(1, steps // 2))
    if not cuda:
        data_["dpo"]["bf16"] = False  # float32 on a CPU, where bf16 autocast only slows it down
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data_, sort_keys=False))
    return path


def load_recipe(path: str):
    from stic.config import load_recipe_dict
    from stic.dpo import parse_recipe

    return parse_recipe(load_recipe_dict(path, default_section="dpo"))


# ---------------------------------------------------------------------------------------------------------
# The workers: one measurement each, in its own process; each prints one RESULT line of JSON


def work_build(args) -> dict:
    t0 = time.perf_counter()
    real_shaped_model(args.family, args.model_dir, args.layers, args.width_divisor,
                      "cuda" if torch.cuda.is_available() else "cpu")
    return {"seconds": round(time.perf_counter() - t0, 1)}


def work_preflight(args) -> dict:
    from stic.preflight import preflight_dpo

    t0 = time.perf_counter()
    checks = preflight_dpo(load_recipe(args.recipe))
    memory = next((c for c in checks if c.name == "memory"), None)
    return {"seconds": round(time.perf_counter() - t0, 1),
            "checks": {c.name: c.status for c in checks},
            "details": {c.name: c.detail for c in checks},
            "estimate_bytes": memory.numbers.get("estimate_bytes") if memory else None}


def work_selfgen(args) -> dict:
    from stic.bench.selfgen import one_at_a_time
    from stic.generation import BatchGenerator, Request, SamplingConfig
    from stic.models import language_model_name, load_model, load_processor, output_head_name
    from stic.prompts import CAPTION_PROMPTS

    torch.set_grad_enabled(False)
    recipe = load_recipe(args.recipe)
    cuda = torch.cuda.is_available()
    model = load_model(recipe.model, "cuda" if cuda else "cpu")
    processor = load_processor(recipe.model)
    model.generation_config.eos_token_id = None  # fixed-length answers on both sides: the ratio is throughput
    images = photos(args.images)
    requests = [Request(images[i], CAPTION_PROMPTS[i % len(CAPTION_PROMPTS)]) for i in range(args.images)]
    engine = BatchGenerator(model, processor, batch_size=args.batch_size)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    engine.generate(requests[:2], sampling)  # warm-up (allocator, kernels)
    sync(); t0 = time.perf_counter()
    loop_tokens = one_at_a_time(model, processor, requests, args.max_new_tokens)
    sync(); loop_s = time.perf_counter() - t0
    sync(); t0 = time.perf_counter()
    engine.generate(requests, sampling)
    sync(); batched_s = time.perf_counter() - t0

    # the bytes one decode step reads: the language model's weights and lm_head (the vision tower runs once per
    # image, in prefill) and the KV cache at the mean context (prompt with its image tokens + half the answer)
    decoder = model.get_submodule(language_model_name(model))
    head = model.get_submodule(output_head_name(model) or "lm_head")
    weight_bytes = sum(p.numel() * p.element_size() for m in (decoder, head) for p in m.parameters())
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * model.dtype.itemsize
    prompt_tokens = [engine.encode([r])["input_ids"].shape[1] for r in requests]
    context = sum(prompt_tokens) / len(prompt_tokens) + args.max_new_tokens / 2
    return {"images": args.images, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
            "one_at_a_time": {"seconds": round(loop_s, 3), "images_per_s": args.images / loop_s,
                              "tokens_per_s": loop_tokens / loop_s},
            # with EOS off every answer runs to max_new_tokens
            "batched": {"seconds": round(batched_s, 3), "images_per_s": args.images / batched_s,
                        "tokens_per_s": args.images * args.max_new_tokens / batched_s},
            "decode_weight_bytes": weight_bytes, "kv_bytes_per_token": kv_per_token, "mean_context": context}


def work_train(args) -> dict:
    from stic.dpo import run_dpo

    recipe = load_recipe(args.recipe)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    summary = run_dpo(recipe)
    seconds = time.perf_counter() - t0
    metrics = (summary or {}).get("train_metrics") or {}
    return {"seconds": round(seconds, 1), "steps": (summary or {}).get("global_step"),
            "train_runtime": metrics.get("train_runtime"),
            "rank": int(os.environ.get("RANK", "0")),
            "peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}


WORKERS = {"build": work_build, "preflight": work_preflight, "selfgen": work_selfgen, "train": work_train}


def run_worker(args, task: str, family: str, model_dir: Path, recipe: Path | None = None,
               launch: list[str] | None = None) -> list[dict]:
    """Run `task` in a fresh process (or under `launch`, e.g. accelerate launch); its RESULT lines, one per rank.
    A failure raises GpuCheckError with the last error line of its output."""
    cmd = [*(launch or [sys.executable]), "-m", "stic.bench.gpu_check", "--worker", task, "--family", family,
           "--model-dir", str(model_dir), "--images", str(args.images), "--batch-size", str(args.batch_size),
           "--max-new-tokens", str(args.max_new_tokens), "--width-divisor", str(args.width_divisor),
           *(["--layers", str(args.layers)] if args.layers else []), *(["--recipe", str(recipe)] if recipe else [])]
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    results = [json.loads(line[len("RESULT "):]) for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    if res.returncode or not results:
        lines = [ln.strip() for ln in (res.stderr + res.stdout).splitlines() if ln.strip()]
        last = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else "no output")
        raise GpuCheckError(f"{task} exited {res.returncode}: {last[:300]}")
    return results


# ---------------------------------------------------------------------------------------------------------
# The run: which rows run here, the table, the JSON


def plan(gpus: int, have_bitsandbytes: bool) -> dict[str, str | None]:
    """Each row of the table and why it is skipped on this machine (None: it runs)."""
    no_gpu = "skipped: no GPU" if gpus == 0 else None
    return {"model": None, "preflight": None, "selfgen one at a time": None, "selfgen batched": None,
            "decode roofline": no_gpu, "stage 1 LoRA": None,
            "stage 1 QLoRA": no_gpu or (None if have_bitsandbytes else "skipped: bitsandbytes not installed"),
            "FSDP (2 GPUs)": no_gpu or ("skipped: one GPU" if gpus < 2 else None)}


def gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.1f} GiB"


def memory_row(result: dict, estimate: float | None) -> tuple[str, dict]:
    peak = result["peak_bytes"]
    ratio = peak / estimate if peak and estimate else None
    trained = f" (training {result['train_runtime']:.0f} s)" if result.get("train_runtime") else ""
    detail = (f"{result['steps']} steps in {result['seconds']:.0f} s{trained}; peak {gib(peak)}, preflight "
              f"estimate {gib(estimate)}" + (f" (peak/estimate {ratio:.2f})" if ratio else ""))
    return detail, {**result, "estimate_bytes": estimate, "peak_over_estimate": ratio}


def check_family(args, family: str, skips: dict, bandwidth: float | None, cuda: bool) -> list[dict]:
    """Every row of one family, in table order. A step that fails becomes an "error" row (its last error line)
    and the next step runs."""
    rows: list[dict] = []
    work = Path(args.work)
    cut = (f"-L{args.layers}" if args.layers else "") + (f"-w{args.width_divisor}" if args.width_divisor > 1 else "")
    model_dir = work / "models" / f"{family}{cut}"
    data = work / "data"
    if not (data / "data").exists():
        preference_data(data)

    def add(check, status, detail="", **numbers):
        rows.append({"family": family, "check": check, "status": status, "detail": detail, "numbers": numbers})
        print(f"  {family}: {check}: {status}", file=sys.stderr, flush=True)

    def step(checks: tuple[str, ...], fn):
        """Run fn (which adds the rows of `checks`) unless this machine skips them; its failure: error rows."""
        if skips[checks[0]]:
            for check in checks:
                add(check, skips[check])
            return None
        try:
            return fn()
        except GpuCheckError as err:
            for check in checks:
                add(check, "error", one_line(err))
            return None

    def worker(task, recipe=None, launch=None):
        return run_worker(args, task, family, model_dir, recipe, launch)

    def recipe(variant: str) -> Path:
        run = work / "runs" / f"{family}-{variant}"
        shutil.rmtree(run, ignore_errors=True)  # stage 1 refuses a finished run's folder
        return write_recipe(family, model_dir, data, run, work / "recipes" / f"{family}-{variant}.yaml",
                            args.steps, qlora=variant == "qlora", cuda=cuda)

    def build():
        processor = real_processor(family)
        config = real_config(family, processor.tokenizer, args.layers, args.width_divisor)
        params, layers = count_parameters(config), config.get_text_config().num_hidden_layers
        built = worker("build")[0]
        hub, published, _ = PUBLISHED[family]
        size = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
        add("model", "ok", f"{size} parameters, {layers} layers ({hub}: {published / 1e9:.2f}B); built in "
                           f"{built['seconds']:.0f} s", params=params, layers=layers, **built)
        return built

    def preflight(check, path):
        result = worker("preflight", path)[0]
        statuses = list(result["checks"].values())
        worst = next(s for s in ("fail", "warn", "pass") if s in statuses)
        counts = ", ".join(f"{statuses.count(s)} {s}" for s in ("pass", "warn", "fail") if s in statuses)
        flagged = [name for name, s in result["checks"].items() if s != "pass"]
        add(check, worst, counts + (f" ({', '.join(flagged)})" if flagged else "")
            + f"; memory estimate {gib(result['estimate_bytes'])}", **result)
        return result

    def selfgen():
        result = worker("selfgen", lora)[0]
        for check, key, batch in (("selfgen one at a time", "one_at_a_time", 1),
                                  ("selfgen batched", "batched", args.batch_size)):
            r = result[key]
            add(check, "ok", f"bs={batch}: {r['images_per_s']:.2f} images/s, {r['tokens_per_s']:.1f} tokens/s",
                **r, batch_size=batch)
        return result

    def roofline():
        if gen is None:
            return add("decode roofline", "error", "no selfgen figures to compare")
        if bandwidth is None:
            return add("decode roofline", "n/a", "unknown card: pass --hbm-tbps")
        batches = (1, args.batch_size)
        bound = {b: decode_roofline(gen["decode_weight_bytes"], gen["kv_bytes_per_token"], gen["mean_context"], b,
                                    bandwidth) for b in batches}
        measured = {1: gen["one_at_a_time"]["tokens_per_s"], args.batch_size: gen["batched"]["tokens_per_s"]}
        add("decode roofline", "ok", "; ".join(f"bs={b}: at most {bound[b]:.0f} tokens/s, measured "
                                               f"{100 * measured[b] / bound[b]:.0f}% of it" for b in batches),
            hbm_bytes_per_s=bandwidth, weight_bytes=gen["decode_weight_bytes"],
            kv_bytes_per_token=gen["kv_bytes_per_token"], mean_context=gen["mean_context"],
            tokens_per_s_bound={str(b): v for b, v in bound.items()})

    def train(check, path, estimate):
        result = worker("train", path)[0]
        detail, numbers = memory_row(result, estimate)
        add(check, "ok", detail, **numbers)

    def qlora():
        path = recipe("qlora")
        estimate = preflight("preflight (QLoRA)", path)["estimate_bytes"]
        train("stage 1 QLoRA", path, estimate)

    def fsdp():
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--config_file",
                  str(REPO / "recipes" / "accelerate" / "fsdp.yaml"), "--num_processes", "2"]
        ranks = worker("train", recipe("fsdp"), launch)
        peak = max(r["peak_bytes"] or 0 for r in ranks)
        add("FSDP (2 GPUs)", "ok", f"{ranks[0]['steps']} steps in {ranks[0]['seconds']:.0f} s on {len(ranks)} "
                                   f"processes; peak per GPU {gib(peak)}", ranks=ranks, peak_bytes=peak)

    if step(("model",), build) is not None:
        lora = recipe("lora")
        pre = step(("preflight",), lambda: preflight("preflight", lora))
        gen = step(("selfgen one at a time", "selfgen batched"), selfgen)
        step(("decode roofline",), roofline)
        step(("stage 1 LoRA",), lambda: train("stage 1 LoRA", lora, (pre or {}).get("estimate_bytes")))
        step(("stage 1 QLoRA",), qlora)
        step(("FSDP (2 GPUs)",), fsdp)
    if not args.keep_models:
        shutil.rmtree(model_dir, ignore_errors=True)
    return rows


def format_table(rows: list[dict]) -> str:
    widths = [max(len(r[k]) for r in rows) for k in ("family", "check", "status")]
    return "\n".join(f"{r['family']:<{widths[0]}}  {r['check']:<{widths[1]}}  {r['status']:<{widths[2]}}  "
                     f"{r['detail']}".rstrip() for r in rows)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "tokenizers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    ap.add_argument("--layers", type=int, default=None,
                    help="cut the language model and vision tower to N layers (default: the published depth)")
    ap.add_argument("--width-divisor", type=int, default=1,
                    help="divide widths (heads, MLP, vocabulary) by K, head size kept: for a CPU smoke run")
    ap.add_argument("--steps", type=int, default=10, help="stage-1 optimizer steps per run")
    ap.add_argument("--images", type=int, default=32, help="selfgen: images per timed run")
    ap.add_argument("--batch-size", type=int, default=16, help="selfgen: the batched engine's batch size")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="selfgen: tokens generated per image")
    ap.add_argument("--hbm-tbps", type=float, default=None, help="the card's memory bandwidth in TB/s "
                                                                 "(default: from the device name)")
    ap.add_argument("--out", default="outputs/gpu-check/gpu_check.json", help="the JSON report")
    ap.add_argument("--work", default=None, help="models, data and runs (default: the folder of --out)")
    ap.add_argument("--keep-models", action="store_true", help="keep each family's model folder (7B: ~15 GB)")
    ap.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--family", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--recipe", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(WORKERS[args.worker](args)), flush=True)
        return 0
    if min(args.steps, args.images, args.batch_size, args.max_new_tokens, args.width_divisor) < 1 or (
            args.layers is not None and args.layers < 1):
        raise GpuCheckError("--steps, --images, --batch-size, --max-new-tokens, --width-divisor and --layers must "
                            "be at least 1")
    found = versions()
    missing = [name for name in ("transformers", "trl", "peft", "accelerate", "datasets") if found[name] is None]
    if missing:
        raise GpuCheckError(f"missing Python packages: {', '.join(missing)}; install the wheels of `make gpu-wheels` "
                            "(README: GPU check)")
    args.work = str(Path(args.work or Path(args.out).parent).resolve())  # the workers run in the repository
    gpus = torch.cuda.device_count()
    device = torch.cuda.get_device_name(0) if gpus else "cpu"
    bandwidth = hbm_bandwidth(device, args.hbm_tbps) if gpus else None
    skips = plan(gpus, found["bitsandbytes"] is not None)
    rows = [row for family in args.families for row in check_family(args, family, skips, bandwidth, gpus > 0)]

    print(f"GPU check on {device}" + (f" x{gpus}" if gpus > 1 else "") + (
        f", HBM {bandwidth / 1e12:.2f} TB/s" if bandwidth else "") + f"; layers {args.layers or 'as published'}, "
        f"width 1/{args.width_divisor}; selfgen {args.images} images x {args.max_new_tokens} tokens; "
        f"stage 1 {args.steps} steps")
    print(format_table(rows))
    settings = {k: getattr(args, k) for k in ("families", "layers", "width_divisor", "steps", "images", "batch_size",
                                              "max_new_tokens", "hbm_tbps")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "gpus": gpus, "hbm_bytes_per_s": bandwidth, "versions": found,
                               "settings": settings, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 1 if any(r["status"] in ("error", "fail") for r in rows) else 0


def cli(argv=None) -> int:
    """main, with a bad setting or a missing package as one line and exit status 2."""
    try:
        return main(argv)
    except SticError as err:
        print(f"gpu-check: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
