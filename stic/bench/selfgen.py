"""Benchmark: the batched selfgen engine against a one-image-at-a-time loop, same model, images and settings.

    python -m stic.bench.selfgen [--images 32] [--batch-size 16] [--max-new-tokens 32] [--shape tiny|7b]
    python -m stic.bench.selfgen --backend openai [--endpoint URL] [--model models/shapesworld-base] [--images 64]

`--backend openai` compares the local batched engine with an OpenAI-compatible endpoint instead (a `transformers
serve` of `--model` on CPU, started here, unless `--endpoint` names a running server of that model): the requests
of a selfgen run (chosen and rejected, with the corrupted pixels of the corruption branch) over ShapesWorld scenes,
greedy on both sides, and how many images got identical answers from both.

Both sides decode greedily with EOS disabled, so they generate the same number of tokens and the ratio
measures throughput alone. `--shape 7b` builds a randomly initialised model with LLaVA-1.5-7B's shapes
(CLIP ViT-L/14 at 336 px, Llama-7B) on a CUDA GPU.
"""

from __future__ import annotations

import argparse
import time

import torch

from stic.generation import BatchGenerator, Request, SamplingConfig, conversation
from stic.images import ImageLoader, ImageSourceConfig, list_images
from stic.prompts import CAPTION_PROMPTS


def build(shape: str, device: str):
    from stic.tiny import build_tiny_model

    model, processor = build_tiny_model("llava")
    if shape == "tiny":
        return model.to(device), processor
    if not device.startswith("cuda"):
        raise SystemExit("--shape 7b needs a CUDA GPU")
    from transformers import LlavaForConditionalGeneration

    from stic.bench.common import llava_config_and_processor

    config, processor = llava_config_and_processor(
        processor.tokenizer, processor.chat_template,
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    projection_dim=768),
        text=dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
        image_size=336, patch_size=14)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16).eval()
    return model, processor


def one_at_a_time(model, processor, requests, max_new_tokens):
    """A plain loop: one image and prompt per generate call."""
    tokens = 0
    for r in requests:
        text = processor.apply_chat_template(conversation(r.prompt, r.image), add_generation_prompt=True,
                                             tokenize=False)
        inputs = processor(text=[text], images=[[r.image]], return_tensors="pt", add_special_tokens=False)
        inputs = inputs.to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=processor.tokenizer.pad_token_id)
        tokens += out.shape[1] - inputs["input_ids"].shape[1]
    return tokens


def selfgen_requests(n: int, seed: int = 0):
    """The chosen and rejected requests selfgen sends for n ShapesWorld scenes (greedy, the recipe's prompts)."""
    import random

    from stic.prompts import PromptsConfig, load_prompts
    from stic.selfgen import PairGenerator, SelfGenConfig
    from stic.shapes.world import render, sample_scene

    rng = random.Random(seed)
    items = [(f"scene{i:03d}", render(sample_scene(rng, f"scene{i:03d}"))) for i in range(n)]
    folder = "recipes/shapesworld/"
    prompts = load_prompts(PromptsConfig(good_prompt_file=folder + "careful_prompt.txt",
                                         caption_prompts_file=folder + "caption_prompts.txt",
                                         hallucination_prompts_file=folder + "hallucination_prompts.txt"))
    pairs = PairGenerator(None, SelfGenConfig(seed=seed, corruptions=["lower_resolution", "gaussian_blur",
                                                                     "color_jitter"]), prompts, "bench")
    chosen = [Request(image, prompts.good) for _, image in items]
    rejected = [pairs.rejected_request(pairs.plan(image_id), image)[0] for image_id, image in items]
    return chosen + rejected


def compare_endpoint(args) -> None:
    """Local batched vs endpoint on the same selfgen requests; prints throughput side by side and the parity."""
    import contextlib

    from stic.config import BackendConfig, ModelSpec
    from stic.models import load_model, load_processor
    from stic.serving import OpenAIGenerator, transformers_serve

    n = args.images or 64
    requests = selfgen_requests(n)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    mcfg = ModelSpec(name_or_path=args.model, dtype="float32")
    local = BatchGenerator(load_model(mcfg, args.device), load_processor(mcfg), batch_size=args.batch_size)
    server = contextlib.nullcontext(args.endpoint) if args.endpoint else transformers_serve(args.model)
    with server as url:
        remote = OpenAIGenerator(BackendConfig(backend="openai", endpoints=[url], max_concurrency=args.concurrency),
                                 model=args.model)
        local.generate(requests[:2], sampling)  # warm-up on both sides
        remote.generate(requests[:2], sampling)
        results = {}
        for name, engine in (("local batched", local), ("endpoint", remote)):
            tokens = [0]
            t0 = time.perf_counter()
            outs = engine.generate(requests, sampling, on_batch=lambda _n, k: tokens.__setitem__(0, tokens[0] + k))
            results[name] = (time.perf_counter() - t0, tokens[0], outs)
    print(f"model: {args.model} on {args.device}; {n} ShapesWorld images, {len(requests)} selfgen requests (chosen + "
          f"rejected), greedy, up to {args.max_new_tokens} new tokens; local bs={args.batch_size}, endpoint "
          f"{'at ' + args.endpoint if args.endpoint else '(transformers serve, CPU, started here)'} with "
          f"{args.concurrency} requests in flight")
    print(f"{'':<22}{'seconds':>9}{'images/s':>11}{'tokens/s':>11}")
    for name, (secs, toks, _) in results.items():
        print(f"{name:<22}{secs:>9.2f}{n / secs:>11.2f}{toks / secs:>11.1f}")
    (ls, _, lo), (es, _, eo) = results["local batched"], results["endpoint"]
    print(f"endpoint / local (images/s ratio): {ls / es:.2f}x")
    same = [lo[i].text == eo[i].text and lo[n + i].text == eo[n + i].text for i in range(n)]
    print(f"identical answers: {sum(same)}/{n} images ({100 * sum(same) / n:.1f}%); "
          f"{sum(a.text == b.text for a, b in zip(lo, eo))}/{len(lo)} answers")
    for i in [i for i, ok in enumerate(same) if not ok][:5]:
        for k in (i, n + i):
            if lo[k].text != eo[k].text:
                print(f"  differs, request {k}: local {lo[k].text!r} | endpoint {eo[k].text!r}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=None, help="default: 32 (local), 64 (openai)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: 32 (local), 48 (openai)")
    ap.add_argument("--shape", choices=["tiny", "7b"], default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", choices=["local", "openai"], default="local")
    ap.add_argument("--endpoint", help="openai: a running server's /v1 URL (default: start transformers serve)")
    ap.add_argument("--model", default="models/shapesworld-base", help="openai: the model on both sides")
    ap.add_argument("--concurrency", type=int, default=8, help="openai: requests in flight")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.backend == "openai":
        args.max_new_tokens = args.max_new_tokens or 48
        return compare_endpoint(args)
    args.images, args.max_new_tokens = args.images or 32, args.max_new_tokens or 32

    model, processor = build(args.shape, args.device)
    model.generation_config.eos_token_id = None  # fixed-length outputs on both sides
    src = ImageSourceConfig(max_pixels=640 * 480)
    loader, refs = ImageLoader(src), list_images(src)
    photos = [loader(r) for r in refs]
    requests = [Request(photos[i % len(photos)], CAPTION_PROMPTS[i % len(CAPTION_PROMPTS)])
                for i in range(args.images)]
    engine = BatchGenerator(model, processor, batch_size=args.batch_size)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    engine.generate(requests[:2], sampling)  # warm-up (allocator, kernels)
    one_at_a_time(model, processor, requests[:1], args.max_new_tokens)

    sync(); t0 = time.perf_counter()
    loop_tokens = one_at_a_time(model, processor, requests, args.max_new_tokens)
    sync(); loop_s = time.perf_counter() - t0

    sync(); t0 = time.perf_counter()
    outs = engine.generate(requests, sampling)
    sync(); batched_s = time.perf_counter() - t0
    batched_tokens = sum(o.num_tokens for o in outs)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.shape} LLaVA ({n_params / 1e6:.1f}M parameters) on {args.device}; "
          f"{args.images} images, {args.max_new_tokens} new tokens each, threads={torch.get_num_threads()}")
    print(f"{'':<22}{'seconds':>9}{'images/s':>11}{'tokens/s':>11}")
    print(f"{'one at a time':<22}{loop_s:>9.2f}{args.images / loop_s:>11.2f}{loop_tokens / loop_s:>11.1f}")
    print(f"{f'batched (bs={args.batch_size})':<22}{batched_s:>9.2f}{args.images / batched_s:>11.2f}"
          f"{batched_tokens / batched_s:>11.1f}")
    print(f"speed-up (images/s ratio): {loop_s / batched_s:.2f}x")


if __name__ == "__main__":
    main()
