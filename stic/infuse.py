"""Stage 2: description-infused fine-tuning, and describe-and-respond (DaR).

1. Take a seeded subset of the model's old instruction data (paper: 5k samples of LLaVA's SFT mix).
2. The stage-1 model describes each image with an ordinary captioning prompt, on the image, using the
   same sharded, resumable engine as selfgen (`store.run_sharded`).
3. The first user turn becomes `Image description: {description}\\n{instruction}`; answers and later turns
   stay as they were.
4. TRL's SFTTrainer trains on the result for one epoch, the loss on assistant tokens only, continuing the
   stage-1 adapter (as the paper does) or a new adapter on a merged stage-1 model.

At inference `describe_and_respond` does the same two steps: describe (with the image), then answer the
question with the description infused exactly as in training (with the image again).

    accelerate launch -m stic infuse-sft --recipe recipes/X.yaml
    stic dar --recipe recipes/X.yaml --image photo.jpg --question "What is on the table?"
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path
from typing import Literal

import torch
from trl import SFTConfig

from stic.config import ModelConfig, parse_section, to_dict
from stic.generation import BatchGenerator, Output, Request, SamplingConfig
from stic.images import ImageRef
from stic.instructions import (InstructionDataConfig, SubsetConfig, choose_subset, composition,
                               load_instructions)
from stic.models import LoraOptions, lora_config
from stic.prompts import CAPTION_PROMPTS

DEFAULT_TEMPLATE = "Image description: {description}\n{instruction}"
DESCRIBE_PROMPT = CAPTION_PROMPTS[2]  # an ordinary captioning prompt: "Give a detailed description of this image."


def infuse_instruction(instruction: str, description: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The first user turn of stage 2 and of DaR. One function, so training and inference cannot drift."""
    return template.format(description=description.strip(), instruction=instruction)


@dataclasses.dataclass
class DescribeConfig:
    prompt: str = DESCRIBE_PROMPT
    sampling: SamplingConfig = dataclasses.field(default_factory=lambda: SamplingConfig(max_new_tokens=256))
    batch_size: int = 8
    images_per_part: int = 64


@dataclasses.dataclass
class InfuseSFTConfig(LoraOptions, SFTConfig):
    """SFTConfig (every TRL option works) plus the stage's keys."""

    output_dir: str = "outputs/infuse_sft"
    data: InstructionDataConfig = dataclasses.field(default_factory=InstructionDataConfig)
    subset: SubsetConfig = dataclasses.field(default_factory=SubsetConfig)
    describe: DescribeConfig = dataclasses.field(default_factory=DescribeConfig)
    template: str = DEFAULT_TEMPLATE
    # The stage-1 model: base (model:) + this adapter, or a merged stage-1 folder (then model: is ignored)
    stage1_adapter: str | None = "outputs/dpo"
    stage1_model: str | None = None
    # continue: keep training the stage-1 adapter (the paper). new: a fresh adapter on the stage-1 model
    adapter_mode: Literal["continue", "new"] = "continue"
    descriptions_dir: str | None = None  # default: <output_dir>/descriptions
    overwrite_descriptions: bool = False
    resume: bool = False  # continue SFT from the last checkpoint in output_dir (descriptions always resume)
    plot: bool = True
    num_train_epochs: float = 1.0
    assistant_only_loss: bool = True
    report_to: str | list[str] = dataclasses.field(default_factory=lambda: ["tensorboard"])
    logging_steps: float = 1

    def __post_init__(self):
        if "{description}" not in self.template or "{instruction}" not in self.template:
            raise ValueError("template must contain {description} and {instruction}")
        if self.stage1_adapter and self.stage1_model:
            raise ValueError("set stage1_adapter or stage1_model, not both")
        if self.adapter_mode == "continue" and not self.stage1_adapter:
            raise ValueError("adapter_mode: continue needs stage1_adapter")
        if not torch.cuda.is_available():
            self.use_cpu = True
            self.bf16 = False if self.bf16 is None else self.bf16
        super().__post_init__()

    def to_dict(self):  # TrainingArguments serialises itself to JSON for logs and checkpoints
        d = super().to_dict()
        for key in ("data", "subset", "describe"):
            d[key] = to_dict(getattr(self, key))
        return d


@dataclasses.dataclass
class Recipe:
    model: ModelConfig
    infuse_sft: InfuseSFTConfig


def parse_recipe(data: dict) -> Recipe:
    return Recipe(model=parse_section(data, "model", ModelConfig),
                  infuse_sft=parse_section(data, "infuse_sft", InfuseSFTConfig))


# ---------------------------------------------------------------------------------------------------------
# The stage-1 model


def stage1_model_config(recipe: Recipe) -> ModelConfig:
    cfg = recipe.infuse_sft
    if cfg.stage1_model:
        return dataclasses.replace(recipe.model, name_or_path=cfg.stage1_model, load_in_4bit=False)
    return recipe.model


def load_stage1_for_inference(recipe: Recipe, device):
    """The model that writes the descriptions: base + stage-1 adapter merged in memory, or a merged folder."""
    from stic.models import load_adapted_model, load_processor

    mcfg = stage1_model_config(recipe)
    adapters = [recipe.infuse_sft.stage1_adapter] if recipe.infuse_sft.stage1_adapter else []
    model, _ = load_adapted_model(mcfg, adapters, device)  # merged in fp32: the lr-1e-7 update survives
    return model, load_processor(mcfg)


# ---------------------------------------------------------------------------------------------------------
# Step 2: descriptions, one per distinct image, through the shared sharded engine


def description_features():
    import datasets

    text = datasets.Value("string")
    return datasets.Features({"image_id": text, "description": text, "finish_reason": text,
                              "num_tokens": datasets.Value("int32"), "prompt": text})


def describe_images(recipe: Recipe, records: list[dict]) -> dict[str, str]:
    """{image key: description} for every image of `records`; resumable, sharded over processes."""
    from stic.images import decode_image
    from stic.store import ShardedOutput, run_sharded

    cfg = recipe.infuse_sft
    out = cfg.descriptions_dir or str(Path(cfg.output_dir) / "descriptions")
    by_key: dict[str, dict] = {}
    for r in records:
        if r["image"]:
            by_key.setdefault(r["image"], r)
    refs = [ImageRef(id=key, path=rec.get("image_path")) for key, rec in sorted(by_key.items())]

    def load(ref):
        rec = by_key[ref.id]
        return decode_image(rec.get("image_bytes") or rec["image_path"], max_pixels=2048 * 2048,
                            max_decode_pixels=16384 * 16384)

    def make_worker(device):
        model, processor = load_stage1_for_inference(recipe, device)
        engine = BatchGenerator(model, processor, cfg.describe.batch_size)

        def worker(items, on_batch):
            outs = engine.generate([Request(img, cfg.describe.prompt) for _, img in items], cfg.describe.sampling,
                                   seed=cfg.seed, on_batch=on_batch)
            rows = [{"image_id": key, "description": o.text, "finish_reason": o.finish_reason,
                     "num_tokens": o.num_tokens, "prompt": cfg.describe.prompt} for (key, _), o in zip(items, outs)]
            return rows, []

        return worker

    run_config = {"stage": "describe", "model": to_dict(stage1_model_config(recipe)),
                  "stage1_adapter": cfg.stage1_adapter, "describe": to_dict(cfg.describe)}
    if refs:
        run_sharded(name="describe", out_dir=out, refs=refs, run_config=run_config, load=load,
                    make_worker=make_worker, features=description_features(), id_column="image_id",
                    items_per_part=cfg.describe.images_per_part, overwrite=cfg.overwrite_descriptions)
    import pyarrow.parquet as pq

    descriptions: dict[str, str] = {}
    for part in ShardedOutput(out).part_files():
        table = pq.read_table(part, columns=["image_id", "description"]).to_pylist()
        descriptions.update({r["image_id"]: r["description"] for r in table})
    return descriptions


# ---------------------------------------------------------------------------------------------------------
# Step 3: infusion


def infuse_record(record: dict, description: str | None, template: str) -> dict:
    """Messages with the first user turn infused; answers and later turns untouched."""
    messages = [dict(m) for m in record["messages"]]
    if description is not None:
        first = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[first]["content"] = infuse_instruction(messages[first]["content"], description, template)
    return {"id": record["id"], "messages": messages,
            "images": [record.get("image_bytes") or record["image_path"]] if record["image"] else []}


def build_training_set(records, descriptions, template):
    import datasets

    rows, missing = [], []
    for rec in records:
        if rec["image"] and rec["image"] not in descriptions:
            missing.append(rec["id"])  # its image could not be read when describing
            continue
        rows.append(infuse_record(rec, descriptions.get(rec["image"]), template))
    ds = datasets.Dataset.from_list(
        [{"id": r["id"], "messages": r["messages"],
          "images": [{"bytes": i, "path": None} if isinstance(i, bytes) else {"bytes": None, "path": i}
                     for i in r["images"]]} for r in rows],
        features=datasets.Features({
            "id": datasets.Value("string"),
            "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
            "images": datasets.List(datasets.Image()),
        }),
    )
    return ds, missing


# ---------------------------------------------------------------------------------------------------------
# Step 4: SFT


def load_model_for_training(recipe: Recipe):
    from peft import PeftModel

    from stic.models import load_adapted_model, load_model

    cfg = recipe.infuse_sft
    mcfg = stage1_model_config(recipe)
    if mcfg.load_in_4bit and not torch.cuda.is_available():
        raise RuntimeError("QLoRA (model.load_in_4bit: true) needs a CUDA GPU; set it to false to train on CPU")
    if cfg.adapter_mode == "new" and cfg.stage1_adapter:
        # a new adapter on top of the stage-1 model: fold stage 1 in first, in fp32 unless its update survives
        # the model's dtype (merged into bf16 weights, an lr-1e-7 update rounds back to the base)
        if mcfg.load_in_4bit:
            raise RuntimeError("adapter_mode: new on a 4-bit model: merge stage 1 first (stic merge) and set "
                               "infuse_sft.stage1_model to the merged folder")
        model, _ = load_adapted_model(mcfg, [cfg.stage1_adapter], "cpu")
        return model, (lora_config(cfg, model) if cfg.use_peft else None)
    if mcfg.load_in_4bit:
        from accelerate import PartialState

        model = load_model(mcfg, PartialState().device)
    else:
        model = load_model(mcfg, "cpu")  # the Trainer places it
    if cfg.adapter_mode == "continue":
        return PeftModel.from_pretrained(model, cfg.stage1_adapter, is_trainable=True), None
    return model, (lora_config(cfg, model) if cfg.use_peft else None)


def run_infuse_sft(recipe: Recipe) -> dict | None:
    from accelerate import PartialState
    from trl import SFTTrainer

    from stic.models import load_processor

    cfg = recipe.infuse_sft
    state = PartialState(cpu=True) if not torch.cuda.is_available() else PartialState()
    records, skipped = load_instructions(cfg.data)
    if not records:
        raise ValueError(f"no usable record in {cfg.data.path} ({len(skipped)} skipped)")
    subset = choose_subset(records, cfg.subset)
    started = time.time()
    descriptions = describe_images(recipe, subset)
    state.wait_for_everyone()
    train_set, undescribed = build_training_set(subset, descriptions, cfg.template)
    if state.is_main_process:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "skipped_records.jsonl", "w") as fh:
            for s in skipped:
                fh.write(json.dumps(s) + "\n")
        with open(out / "infused_samples.jsonl", "w") as fh:
            for row in train_set.select(range(min(20, len(train_set)))):
                fh.write(json.dumps({"id": row["id"], "messages": row["messages"]}) + "\n")

    processor = load_processor(stage1_model_config(recipe))
    model, peft_config = load_model_for_training(recipe)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=train_set, processing_class=processor,
                         peft_config=peft_config)
    resume_from = None
    if cfg.resume and Path(cfg.output_dir).is_dir():
        from transformers.trainer_utils import get_last_checkpoint

        resume_from = get_last_checkpoint(cfg.output_dir)
    result = trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model(cfg.output_dir)
    summary = None
    if trainer.accelerator.is_main_process:
        processor.save_pretrained(cfg.output_dir)
        summary = {
            "stage": "infuse_sft",
            "model": to_dict(stage1_model_config(recipe)),
            "stage1_adapter": cfg.stage1_adapter,
            "adapter_mode": cfg.adapter_mode,
            "data": {"source": cfg.data.path, "usable_records": len(records), "skipped_records": len(skipped),
                     "skipped_by_reason": dict(Counter("missing image file" if s["reason"].startswith("missing image")
                                                       else s["reason"] for s in skipped))},
            "subset": {**to_dict(cfg.subset), "composition": composition(subset)},
            "descriptions": {"images": len({r["image"] for r in subset if r["image"]}),
                             "records_without_description": undescribed},
            "trained_records": len(train_set),
            "template": cfg.template,
            "processes": trainer.accelerator.num_processes,
            "global_step": trainer.state.global_step,
            "train_metrics": result.metrics,
            "seconds": round(time.time() - started, 1),
        }
        out = Path(cfg.output_dir)
        history = trainer.state.log_history
        (out / "log_history.json").write_text(json.dumps(history, indent=1) + "\n")
        if cfg.plot:
            summary["plot"] = str(_plot_loss(history, out / "training_curves.png"))
        (out / "run_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        print(f"infuse-sft: {len(train_set)} records, {trainer.state.global_step} steps; saved to {out}")
    trainer.accelerator.wait_for_everyone()
    return summary


def _plot_loss(history, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    if pts:
        ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None)
    ax.set_title("stage 2 SFT loss")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------
# DaR


def load_for_dar(model_cfg: ModelConfig, adapters: list[str], device):
    """Base model with adapters merged in order: [stage-2] for a continued adapter, [stage-1, stage-2] for a
    new stage-2 adapter trained on the merged stage-1 model."""
    from stic.models import load_adapted_model, load_processor

    model, _ = load_adapted_model(model_cfg, adapters, device)
    return model, load_processor(model_cfg)


def default_dar_adapters(recipe: Recipe) -> list[str]:
    cfg = recipe.infuse_sft
    if cfg.adapter_mode == "continue" or not cfg.stage1_adapter:
        return [cfg.output_dir]
    return [cfg.stage1_adapter, cfg.output_dir]


def describe_and_respond(engine: BatchGenerator, images, questions: list[str], *,
                         describe_prompt: str = DESCRIBE_PROMPT, template: str = DEFAULT_TEMPLATE,
                         describe_sampling: SamplingConfig | None = None,
                         answer_sampling: SamplingConfig | None = None) -> list[tuple[str, Output]]:
    """For each (image, question): describe the image (with the image), then answer the question infused with
    that description (with the image again). Returns [(description, answer output)]."""
    describe_sampling = describe_sampling or SamplingConfig(max_new_tokens=256)
    answer_sampling = answer_sampling or SamplingConfig(max_new_tokens=128)
    descriptions = engine.generate([Request(img, describe_prompt) for img in images], describe_sampling)
    infused = [Request(img, infuse_instruction(q, d.text, template))
               for img, q, d in zip(images, questions, descriptions)]
    answers = engine.generate(infused, answer_sampling)
    return [(d.text, a) for d, a in zip(descriptions, answers)]
