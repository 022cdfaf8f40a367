"""Benchmark: DPO step time and peak memory, LoRA vs full fine-tuning, with and without gradient checkpointing.

    python -m stic.bench.dpo [--steps 6] [--batch-size 4] [--text-layers 8] [--hidden 512]

Each configuration runs in its own process so peak memory is measured cleanly: resident set size on the
CPU (ru_maxrss), allocated memory on a GPU. The model is a LLaVA of the given size with random weights;
the data are fixed synthetic pairs with ~100-token answers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

CONFIGS = [("LoRA", True, False), ("LoRA + grad ckpt", True, True), ("full", False, False),
           ("full + grad ckpt", False, True)]


def build_model(hidden: int, layers: int):
    import torch
    from transformers import LlavaForConditionalGeneration

    from stic.bench.common import llava_config_and_processor
    from stic.tiny import build_tiny_model

    _, tiny_proc = build_tiny_model("llava")
    tok = tiny_proc.tokenizer
    config, processor = llava_config_and_processor(
        tok, tiny_proc.chat_template,
        vision=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                    projection_dim=128),
        text=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                  num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8),
        image_size=64, patch_size=8)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    return model, processor


def dataset(n: int):
    import datasets
    import numpy as np
    from PIL import Image

    words = "the red car is parked near a small tree while two people walk along the street".split()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
        text = lambda k: " ".join(rng.choice(words, size=k))
        rows.append({"prompt": [{"role": "user", "content": "Describe the image."}],
                     "chosen": [{"role": "assistant", "content": text(100)}],
                     "rejected": [{"role": "assistant", "content": text(100)}], "images": [img]})
    return datasets.Dataset.from_list(rows)


def worker(args) -> dict:
    import torch
    from transformers import TrainerCallback
    from trl import DPOTrainer

    from stic.dpo import DPOStageConfig, freeze_for_full_finetune, lora_config

    model, processor = build_model(args.hidden, args.text_layers)
    ref = None
    if not args.peft:
        ref, _ = build_model(args.hidden, args.text_layers)
        freeze_for_full_finetune(model, train_projector=False)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = tempfile.mkdtemp()
    cfg = DPOStageConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                         activation_checkpointing=args.gc, report_to=[], save_strategy="no", max_length=None,
                         learning_rate=1e-5, lora_r=16, lora_alpha=32, logging_steps=1, plot=False,
                         disable_tqdm=True)
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=dataset(args.steps * args.batch_size),
                         processing_class=processor, peft_config=lora_config(cfg, model) if args.peft else None,
                         callbacks=[Timer()])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {
        "step_s": statistics.median(times[1:]),  # the first step pays one-off costs
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_load_mib": base_rss,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "trainable": trainable,
        "params": sum(p.numel() for p in model.parameters()),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--text-layers", type=int, default=8)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--peft", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--gc", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print("BENCH " + json.dumps(worker(args)), flush=True)
        return

    results = {}
    for name, peft, gc in CONFIGS:
        cmd = [sys.executable, "-m", "stic.bench.dpo", "--worker", "--peft", str(int(peft)), "--gc", str(int(gc)),
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--hidden", str(args.hidden),
               "--text-layers", str(args.text_layers)]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith("BENCH ")), None)
        if res.returncode or line is None:
            raise SystemExit(f"{name} failed:\n{res.stderr[-3000:]}")
        results[name] = json.loads(line[6:])
        print(f"  measured {name}", file=sys.stderr)

    first = next(iter(results.values()))
    gpu = first["peak_gpu_mib"] is not None
    print(f"DPO step, LLaVA with {first['params'] / 1e6:.1f}M parameters, batch {args.batch_size} pairs, "
          f"~100-token answers, median of {args.steps - 1} steps, {'GPU' if gpu else 'CPU'}")
    mem_col = "peak GPU MiB" if gpu else "peak RSS MiB"
    print(f"{'config':<20}{'trainable':>12}{'step s':>9}{mem_col:>14}{'time x':>8}{'mem x':>8}")
    ref = results["LoRA"]
    mem = lambda r: r["peak_gpu_mib"] if gpu else r["peak_rss_mib"]
    for name, r in results.items():
        print(f"{name:<20}{r['trainable'] / 1e6:>11.2f}M{r['step_s']:>9.3f}{mem(r):>14.0f}"
              f"{r['step_s'] / ref['step_s']:>8.2f}{mem(r) / mem(ref):>8.2f}")
    print("time x / mem x: relative to LoRA without gradient checkpointing, measured in this run")


if __name__ == "__main__":
    main()
