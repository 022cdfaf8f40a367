"""Stage 2: description-infused fine-tuning, and describe-and-respond (DaR).

1. Take a seeded subset of the model's old instruction data (paper: 5k samples of LLaVA's SFT mix).
2. The stage-1 model describes each image with an ordinary captioning prompt, on the image, using the
   same sharded, resumable engine as selfgen (`store.run_sharded`).
3. The first user turn becomes `Image description: {description}\\n{instruction}`; answers and later turns
   stay as they were, except that with `self_questioning: delta` a share delta of the later user turns become
   questioner turns whose question is trained as well (SQ-LLaVA; see stic/self_questions.py).
4. TRL's SFTTrainer trains on the result for one epoch, the loss on assistant tokens only, continuing the
   stage-1 adapter (as the paper does) or a new adapter on a merged stage-1 model.

At inference `describe_and_respond` does the same two steps: describe (with the image), then answer the
question with the description infused exactly as in training (with the image again).

    accelerate launch -m stic infuse-sft --recipe recipes/X.yaml
    stic dar --recipe recipes/X.yaml --image photo.jpg --question "What is on the table?"
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

from stic.config import ModelSpec, to_dict
from stic.generation import BatchGenerator, Output, Request, SamplingConfig, stable_seed
from stic.images import ImageRef
from stic.instructions import composition, load_instructions, select_subset
from stic.models import (ModelSetupError, lora_config, process_state, refuse_sharding_without_cuda,
                         require_cuda_for_4bit, training_device)
from stic.recipe import DEFAULT_TEMPLATE, DescribeConfig, InfuseSFTConfig, Recipe  # noqa: F401  (re-exported)
from stic.recipe import parse_recipe as parse_whole_recipe
from stic.report import skip_reasons, write_infuse_report, write_infused_data_report
from stic.self_questions import IgnoreToken, QuestionerTurns, questioner_turns
from stic.training import has_text_only_rows, precision_record, trainer_class


def parse_recipe(data: dict) -> Recipe:
    """The recipe with the sections stage 2 uses built; the others are only checked (building a TRL
    section runs TrainingArguments' setup, which belongs to the command that trains with it)."""
    return parse_whole_recipe(data, build=("infuse_sft",))


def infuse_instruction(instruction: str, description: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The first user turn of stage 2 and of DaR. One function, so training and inference cannot drift."""
    return template.format(description=description.strip(), instruction=instruction)


# ---------------------------------------------------------------------------------------------------------
# The stage-1 model


def stage1_model_config(recipe: Recipe) -> ModelSpec:
    cfg = recipe.infuse_sft
    if cfg.stage1_model:
        from stic.models import merged_folder_config

        return dataclasses.replace(merged_folder_config(recipe.model, cfg.stage1_model), load_in_4bit=False)
    return recipe.model


def load_stage1_for_inference(recipe: Recipe, device):
    """The model that writes the descriptions: base + stage-1 adapter merged in memory, or a merged folder."""
    from stic.models import load_for_inference

    adapters = [recipe.infuse_sft.stage1_adapter] if recipe.infuse_sft.stage1_adapter else []
    return load_for_inference(stage1_model_config(recipe), adapters, device)  # merged in fp32: the update survives


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

    from stic.serving import make_engine, run_identity, served_model

    adapters = [cfg.stage1_adapter] if cfg.stage1_adapter else []
    model_name = served_model(recipe.generation, stage1_model_config(recipe), adapters, job="infuse_sft.describe")

    def make_worker(device):
        engine = make_engine(recipe.generation, model_name, recipe.model.system_prompt, lambda: BatchGenerator(
            *load_stage1_for_inference(recipe, device), cfg.describe.batch_size,
            system_prompt=recipe.model.system_prompt))

        def worker(items, on_batch):
            prompts = [cfg.describe.prompt_for(key, cfg.seed) for key, _ in items]
            outs = engine.generate([Request(img, p, stable_seed(cfg.seed, key)) for (key, img), p in zip(items, prompts)],
                                   cfg.describe.sampling, on_batch=on_batch)
            rows = [{"image_id": key, "description": o.text, "finish_reason": o.finish_reason,
                     "num_tokens": o.num_tokens, "prompt": p} for (key, _), o, p in zip(items, outs, prompts)]
            return rows, []

        return worker

    run_config = {"stage": "describe", "model": to_dict(stage1_model_config(recipe)),
                  "stage1_adapter": cfg.stage1_adapter, "describe": to_dict(cfg.describe)}
    backend = run_identity(recipe.generation, model_name)
    if backend:
        run_config["generation"] = backend
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


def infuse_record(record: dict, description: str | None, template: str, system_prompt: str | None = None) -> dict:
    """Messages with the first user turn infused; answers and later turns untouched. `system_prompt` (the
    recipe's model.system_prompt) goes first when the record has no system message of its own."""
    messages = [dict(m) for m in record["messages"]]
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    if description is not None:
        first = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[first]["content"] = infuse_instruction(messages[first]["content"], description, template)
    return {"id": record["id"], "messages": messages,
            "images": [record.get("image_bytes") or record["image_path"]] if record["image"] else []}


def build_training_set(records, descriptions, template, system_prompt: str | None = None,
                       questioning: QuestionerTurns | None = None):
    """The infused records as a dataset; `questioning` (infuse_sft.self_questioning) turns later user turns of
    records with an image into questioner turns."""
    import datasets

    rows, missing = [], []
    for rec in records:
        if rec["image"] and rec["image"] not in descriptions:
            missing.append(rec["id"])  # its image could not be read when describing
            continue
        row = infuse_record(rec, descriptions.get(rec["image"]), template, system_prompt)
        if questioning and rec["image"]:
            row["messages"], _ = questioning.apply(row["messages"], row["id"])
        rows.append(row)
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


def add_questioner_token(recipe: Recipe, processor) -> tuple[int, int] | None:
    """infuse_sft.questioner_token added to the processor's tokenizer: (its id, the tokenizer's size before), which
    load_model_for_training grows the embeddings for; None when the recipe adds no token."""
    from stic import self_questions

    cfg = recipe.infuse_sft
    if not (cfg.questioner_token and cfg.self_questioning):
        return None
    known = len(processor.tokenizer)
    return self_questions.add_questioner_token(processor, cfg.questioner_token), known


def load_model_for_training(recipe: Recipe, questioner_token: tuple[int, int] | None = None):
    """(model, peft_config for the trainer or None). `questioner_token` (add_questioner_token): the embeddings are
    grown to hold it before any adapter wraps them, and the adapter trains its rows."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.utils import set_peft_model_state_dict

    from stic.models import load_adapted_model, load_model
    from stic.self_questions import make_room_for_token, token_rows_to_train

    cfg = recipe.infuse_sft
    mcfg = stage1_model_config(recipe)
    require_cuda_for_4bit(mcfg)

    def with_token(model, peft_config):
        if questioner_token is not None:
            make_room_for_token(model, *questioner_token)
            if peft_config is not None:
                peft_config.trainable_token_indices = token_rows_to_train(model, questioner_token[0])
        return model, peft_config

    if cfg.adapter_mode == "new" and cfg.stage1_adapter:
        # a new adapter on top of the stage-1 model: fold stage 1 in first, in fp32 unless its update survives
        # the model's dtype (merged into bf16 weights, an lr-1e-7 update rounds back to the base)
        if mcfg.load_in_4bit:
            raise ModelSetupError("adapter_mode: new on a 4-bit model: merge stage 1 first (stic merge) and set "
                               "infuse_sft.stage1_model to the merged folder")
        model, _ = load_adapted_model(mcfg, [cfg.stage1_adapter],
                                      training_device(mcfg, cfg))
        return with_token(model, lora_config(cfg, model) if cfg.use_peft else None)
    model = load_model(mcfg, training_device(mcfg, cfg))
    if cfg.adapter_mode == "continue":
        if questioner_token is None:
            model = PeftModel.from_pretrained(model, cfg.stage1_adapter, is_trainable=True)
        else:  # the continued adapter gains the token's rows, which stage 1's saved tensors lack
            stage1 = LoraConfig.from_pretrained(cfg.stage1_adapter)
            stage1.inference_mode = False
            model = get_peft_model(*with_token(model, stage1))
            set_peft_model_state_dict(model, _stage1_weights(model, cfg.stage1_adapter))
        _adapter_in_float32(model, cfg.stage1_adapter)
        _projector_as_configured(model, cfg)
        _vision_lora_as_configured(model, cfg)
        return model, None
    return with_token(model, lora_config(cfg, model) if cfg.use_peft else None)


def _adapter_in_float32(model, adapter_dir: str) -> None:
    """The continued adapter exactly as stage 1 saved it (float32): PEFT builds the projector copy
    (modules_to_save) in the base's dtype and loads the saved weights into it, rounding stage 1's projector update
    to bf16/fp16. Upcast the adapter's tensors, then load the saved ones again."""
    from peft.utils import set_peft_model_state_dict

    from stic.training import keep_trainable_in_float32

    if keep_trainable_in_float32(model, select=lambda n: "modules_to_save" in n or ".lora_" in n):
        set_peft_model_state_dict(model, _stage1_weights(model, adapter_dir))


def _stage1_weights(model, adapter_dir: str) -> dict:
    """The stage-1 adapter's saved tensors, plus the model's own rows of a questioner token stage 1 never had
    (PEFT's loader wants an entry for every layer it wraps)."""
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    own = {k: v for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()
           if "trainable_tokens_delta" in k}
    return {**own, **load_peft_weights(adapter_dir)}


def _projector_as_configured(model, cfg: InfuseSFTConfig) -> None:
    """A continued stage-1 adapter trains the projector copy it saved (modules_to_save) only when
    infuse_sft.train_projector says so; and it can only when stage 1 trained the projector."""
    from stic.training import TrainingSetupError, projector_parameters

    if cfg.train_projector:
        if not projector_parameters(model):
            raise TrainingSetupError(
                f"infuse_sft.train_projector is true but the stage-1 adapter {cfg.stage1_adapter} holds no trainable "
                "projector (stage 1 ran with train_projector: false); train stage 1 with dpo.train_projector: true, "
                "or use adapter_mode: new")
        return
    for name, p in model.named_parameters():
        if p.requires_grad and "modules_to_save" in name:
            p.requires_grad = False


def _vision_lora_as_configured(model, cfg: InfuseSFTConfig) -> None:
    """A continued stage-1 adapter trains its vision-encoder LoRA only when infuse_sft.lora_vision says so (else
    the vision deltas stay as stage 1 left them); and it can only when stage 1 trained one."""
    from stic.models import vision_tower_name
    from stic.training import TrainingSetupError

    try:
        prefix = vision_tower_name(model) + "."
    except ModelSetupError:
        if cfg.lora_vision:
            raise
        return  # no vision encoder found by name: stage 1 could not have adapted one either
    vision = [p for n, p in model.named_parameters() if n.startswith(prefix) and ".lora_" in n]
    if cfg.lora_vision and not vision:
        raise TrainingSetupError(
            f"infuse_sft.lora_vision is true but the stage-1 adapter {cfg.stage1_adapter} holds no vision LoRA "
            "(stage 1 ran with lora_vision: false); train stage 1 with dpo.lora_vision: true, or use adapter_mode: new")
    for p in vision:
        p.requires_grad = cfg.lora_vision


def sft_sequence_need(train_set, processor) -> dict:
    """Image, prompt and answer tokens of the longest sequence stage 2 trains on: the longest rendered prompt
    (everything before the last answer) of a sample of rows, plus the longest assistant answer of all rows."""
    from stic.training import longest_prompt, longest_text_tokens

    messages = list(train_set["messages"])
    prompts = []
    for msgs in messages:
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
        prompts.append(msgs[:last])
    need = longest_prompt(processor, train_set, prompts)
    answers = [m["content"] for msgs in messages for m in msgs if m["role"] == "assistant"]
    need.update(answer_tokens=longest_text_tokens(processor, answers), answer_source="longest assistant answer")
    return need


def run_infuse_sft(recipe: Recipe) -> dict | None:
    from stic.store import check_output_dir, main_process_lock

    cfg = recipe.infuse_sft
    refuse_sharding_without_cuda(cfg)
    check_output_dir(cfg.output_dir, "infuse_sft.output_dir")
    if cfg.descriptions_dir:
        check_output_dir(cfg.descriptions_dir, "infuse_sft.descriptions_dir")
    state = process_state()
    with main_process_lock(recipe.infuse_sft.output_dir, state.is_main_process):  # one run at a time writes it
        return _train(recipe, state)


def _train(recipe: Recipe, state) -> dict | None:
    from trl import SFTTrainer

    from stic.models import load_processor
    from stic.training import apply_global_batch, check_max_length, last_complete_checkpoint

    cfg = recipe.infuse_sft
    batch = apply_global_batch(cfg)  # refused here, before any description is written, if it cannot divide
    records, skipped = load_instructions(cfg.data)
    if not records:
        from stic.instructions import InstructionDataError

        reasons = skip_reasons(skipped)
        detail = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
        raise InstructionDataError(f"no usable record in {cfg.data.path} ({len(skipped)} skipped: {detail})"
                                   if skipped else f"no usable record in {cfg.data.path}: it holds none")
    subset, yes_no = select_subset(records, cfg.subset)
    if yes_no["target_ratio"] is not None and state.is_main_process:
        b, a = yes_no["before"], yes_no["after"]
        print(f"infuse-sft: yes/no records re-sampled from {b['yes']} yes : {b['no']} no to {a['yes']} : {a['no']} "
              f"(target {yes_no['target_ratio']}:1), {len(subset)} records in all")
    started = time.time()
    descriptions = describe_images(recipe, subset)
    state.wait_for_everyone()
    questioning = questioner_turns(cfg)
    train_set, undescribed = build_training_set(subset, descriptions, cfg.template, recipe.model.system_prompt,
                                                questioning)
    if state.is_main_process:
        write_infused_data_report(Path(cfg.output_dir), skipped, train_set,
                                  subset={"composition": composition(subset), "yes_no": yes_no})

    processor = load_processor(stage1_model_config(recipe))
    questioner_token = add_questioner_token(recipe, processor)
    length_check = (check_max_length("infuse_sft", cfg.max_length, sft_sequence_need(train_set, processor))
                    if cfg.max_length is not None else None)
    model, peft_config = load_model_for_training(recipe, questioner_token)
    loaded_dtype = model.dtype
    trainer = trainer_class(SFTTrainer, cfg, has_text_only_rows(train_set))(
        model=model, args=cfg, train_dataset=train_set, processing_class=processor, peft_config=peft_config)
    if questioner_token:  # a trigger given in the prompt, never a target
        trainer.data_collator = IgnoreToken(trainer.data_collator, questioner_token[0])
    resume_from = last_complete_checkpoint(cfg.output_dir, "infuse_sft") if cfg.resume else None
    result = trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model(cfg.output_dir)
    summary = None
    if trainer.accelerator.is_main_process:
        published = load_processor(stage1_model_config(recipe), raw=True)  # as published
        add_questioner_token(recipe, published)  # with the token the adapter's rows belong to
        published.save_pretrained(cfg.output_dir)
        if not cfg.use_peft and cfg.adapter_mode != "continue":
            from stic.models import record_trained_precision

            record_trained_precision(trainer.model, cfg.output_dir)
        summary = write_infuse_report(
            cfg, stage1_model_config(recipe), trainer, result, usable_records=len(records), skipped=skipped,
            subset=subset, undescribed=undescribed, trained_records=len(train_set), batch=batch,
            length_check=length_check, seconds=time.time() - started, yes_no=yes_no,
            precision=precision_record(stage1_model_config(recipe), loaded_dtype, trainer))
        if questioning:
            _record_self_questioning(Path(cfg.output_dir), summary, questioning.count(
                [r for r in subset if r["image"] and r["image"] in descriptions]), questioner_token)
    trainer.accelerator.wait_for_everyone()
    return summary


def _record_self_questioning(out: Path, summary: dict, counts: dict, token: tuple[int, int] | None) -> None:
    """run_summary.json gains what self-questioning did: turns made questioner turns, and the token added."""
    import json

    summary["self_questioning"] = {**counts, "token_id": token[0] if token else None}
    (out / "run_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"infuse_sft: self-questioning made {counts['questioner_turns']} of {counts['later_user_turns']} later "
          f"user turns questioner turns (delta {counts['delta']})")


# ---------------------------------------------------------------------------------------------------------
# DaR


def default_dar_adapters(recipe: Recipe) -> list[str]:
    cfg = recipe.infuse_sft
    if cfg.adapter_mode == "continue" or not cfg.stage1_adapter:
        return [cfg.output_dir]
    return [cfg.stage1_adapter, cfg.output_dir]


def describe_and_respond(engine: BatchGenerator, images, questions: list[str], *, keys: list[str] | None = None,
                         describe: DescribeConfig | None = None, template: str = DEFAULT_TEMPLATE, seed: int = 42,
                         answer_sampling: SamplingConfig | None = None,
                         on_batch: Callable[[int, int], None] | None = None) -> list[tuple[str, Output]]:
    """For each (image, question): describe the image (with the image), then answer the question infused with
    that description (with the image again). `describe`, `template` and `seed` are the recipe's stage-2 settings
    (`infuse_sft.describe`, `.template`, `.seed`), so DaR prompts exactly as stage 2 trained; `keys` name the
    images for the per-image describe prompt. `on_batch(n, new_tokens)` counts both passes' tokens (progress
    bars). Returns [(description, answer output)]."""
    describe = describe or DescribeConfig()
    keys = keys if keys is not None else [str(i) for i in range(len(images))]
    answer_sampling = answer_sampling or SamplingConfig(max_new_tokens=128)
    descriptions = engine.generate([Request(img, describe.prompt_for(k, seed), stable_seed(seed, k))
                                    for img, k in zip(images, keys)], describe.sampling, on_batch=on_batch)
    infused = [Request(img, infuse_instruction(q, d.text, template), stable_seed(seed, k, "answer"))
               for img, q, d, k in zip(images, questions, descriptions, keys)]
    answers = engine.generate(infused, answer_sampling, on_batch=on_batch)
    return [(d.text, a) for d, a in zip(descriptions, answers)]
