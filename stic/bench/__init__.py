"""Benchmarks of the toolkit itself (speed and memory), run as scripts: not used by the stages.

    python -m stic.bench.selfgen   the batched selfgen engine vs one image at a time, or vs an endpoint
    python -m stic.bench.dpo       DPO step time and peak memory, LoRA vs full, with and without grad ckpt
"""
