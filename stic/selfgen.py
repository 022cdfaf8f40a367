"""Stage 1 data: the model builds its own preference pairs from unlabeled images (STIC Algorithm 1).

For each image, with a private random stream seeded by (seed, image id):
  1. draw an ordinary caption prompt x;
  2. y_w = model(good step-by-step prompt, clean image);
  3. with probability p: y_l = model(random hallucination prompt, clean image)
     otherwise:          y_l = model(x, corrupted image), the corruption drawn from the recipe's list;
  4. store (clean image, x, y_w, y_l). Training uses x with the clean image for both responses.

This is `selfgen.pair_source: stic`; `self_questions` (stic/self_questions.py) builds pairs from questions the model
asks about each image instead, through the same sharded, resumable run.
With `pair_source: grounding | self_feedback` the pair is made on-policy instead (stic/onpolicy.py): k answers to
the prompt, ranked without labels, the best against the worst.

The output is a parquet dataset in TRL's conversational preference format ({prompt, chosen, rejected,
images}) plus provenance columns, written in atomic parts so a killed run resumes where it stopped, and
shardable over `accelerate launch` processes.

    stic selfgen --recipe recipes/default.yaml [selfgen.key=value ...] [--overwrite]
"""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Any

from stic.config import RecipeError, to_dict
from stic.generation import BatchGenerator, Output, Request, prompt_messages, stable_seed
from stic.images import ImageLoader, list_images
from stic.onpolicy import ONPOLICY_SOURCES, OnPolicyRanker, check_backend, unused_keys
from stic.prompts import PromptSets, load_prompts
from stic.recipe import Recipe, SelfGenConfig  # noqa: F401  (the stage's section, re-exported)
from stic.recipe import parse_recipe as parse_whole_recipe
from stic.report import write_selfgen_manifest
from stic.serving import make_engine, run_identity, served_model


def parse_recipe(data: dict) -> Recipe:
    """The recipe with the sections selfgen uses built; the others are only checked (building a TRL
    section runs TrainingArguments' setup, which belongs to the command that trains with it)."""
    recipe = parse_whole_recipe(data, build=("selfgen",))
    check_backend(recipe.selfgen.pair_source, recipe.generation.backend)
    return recipe


ID_COLUMN = "image_id"


# ---------------------------------------------------------------------------------------------------------
# The per-image plan: every random choice of Algorithm 1, fixed by (seed, image id) alone, so it does not
# depend on sharding, batch composition or how often the run was resumed.


@dataclasses.dataclass
class Plan:
    image_id: str
    caption_prompt: str
    branch: str  # "hallucination" or "corruption"
    hallucination_prompt: str | None
    corruption: dict | None  # {"kind": ..., **settings}
    corruption_seed: int | None

    @property
    def rejected_prompt(self) -> str:
        return self.hallucination_prompt if self.branch == "hallucination" else self.caption_prompt


def _corruption_specs(items: list[str | dict]) -> list[dict]:
    from corruptions import make_corruption

    specs = []
    for i, item in enumerate(items):
        spec = {"kind": item} if isinstance(item, str) else dict(item)
        if "kind" not in spec:
            raise RecipeError(f"selfgen.corruptions[{i}]: a mapping needs a 'kind' key")
        try:
            make_corruption(spec["kind"], **{k: v for k, v in spec.items() if k != "kind"})
        except (ValueError, TypeError) as err:
            raise RecipeError(f"selfgen.corruptions[{i}]: {err}") from None
        specs.append(spec)
    return specs


def plan_image(image_id: str, cfg: SelfGenConfig, prompts: PromptSets, corruptions: list[dict]) -> Plan:
    rng = random.Random(f"{cfg.seed}\x1f{image_id}")
    caption = rng.choice(prompts.caption)
    if rng.random() < cfg.hallucination_prob:
        return Plan(image_id, caption, "hallucination", rng.choice(prompts.hallucination), None, None)
    return Plan(image_id, caption, "corruption", None, dict(rng.choice(corruptions)), rng.getrandbits(31))


# ---------------------------------------------------------------------------------------------------------
# Rows


def features():
    import datasets

    message = [{"role": datasets.Value("string"), "content": datasets.Value("string")}]
    text = datasets.Value("string")
    return datasets.Features({
        ID_COLUMN: text,
        "prompt": message, "chosen": message, "rejected": message,
        "images": datasets.List(datasets.Image()),
        "rejected_branch": text,
        "caption_prompt": text, "chosen_prompt": text, "rejected_prompt": text,
        "corruption": text, "corruption_params": text,
        "chosen_finish_reason": text, "rejected_finish_reason": text,
        "chosen_num_tokens": datasets.Value("int32"), "rejected_num_tokens": datasets.Value("int32"),
        "seed": datasets.Value("int64"), "model": text, "generation": text,
        # the field names of STIC's released preference records, for tools written against them
        "image_corruption": datasets.Value("bool"), "hallu_prompt": text,
        "chosen_agreement": datasets.Value("float32"),  # self-consistency score, null when it is off
        # on-policy pairs: every sampled answer, its label-free score and the parts of it (JSON); null for stic
        "candidates": datasets.List({"text": text, "score": datasets.Value("float64"), "role": text,
                                     "finish_reason": text, "num_tokens": datasets.Value("int32"), "parts": text}),
    })


def make_row(plan: Plan, image, chosen: Output, rejected: Output, corruption_record: dict | None,
             prompts: PromptSets, cfg: SelfGenConfig, model_name: str, generation: str,
             agreement: float | None = None, system_prompt: str | None = None,
             candidates: list[dict] | None = None) -> dict:
    return {
        ID_COLUMN: plan.image_id,
        "prompt": prompt_messages(plan.caption_prompt, system_prompt),
        "chosen": [{"role": "assistant", "content": chosen.text}],
        "rejected": [{"role": "assistant", "content": rejected.text}],
        "images": [image],
        "rejected_branch": plan.branch,
        "caption_prompt": plan.caption_prompt,
        "chosen_prompt": prompts.good,
        "rejected_prompt": plan.rejected_prompt,
        "corruption": plan.corruption["kind"] if plan.corruption else None,
        "corruption_params": json.dumps(corruption_record, sort_keys=True) if corruption_record else None,
        "chosen_finish_reason": chosen.finish_reason, "rejected_finish_reason": rejected.finish_reason,
        "chosen_num_tokens": chosen.num_tokens, "rejected_num_tokens": rejected.num_tokens,
        "seed": cfg.seed, "model": model_name, "generation": generation,
        "image_corruption": plan.branch == "corruption",
        "hallu_prompt": plan.hallucination_prompt or "",
        "chosen_agreement": agreement,
        "candidates": candidates,
    }


def _ngrams(text: str) -> set:
    words = text.lower().replace(",", " , ").replace(".", " . ").split()
    return set(words) | {tuple(words[i:i + 2]) for i in range(len(words) - 1)}


def agreement(a: str, b: str) -> float:
    """Overlap of words and word pairs (F1), a label-free similarity of two descriptions."""
    x, y = _ngrams(a), _ngrams(b)
    if not x or not y:
        return 0.0
    common = len(x & y)
    return 2 * common / (len(x) + len(y))


def most_consistent(candidates: list[Output]) -> tuple[Output, float]:
    """The candidate with the highest mean agreement with the others, and that mean."""
    if len(candidates) == 1:
        return candidates[0], 1.0
    scores = [sum(agreement(c.text, o.text) for j, o in enumerate(candidates) if j != i) / (len(candidates) - 1)
              for i, c in enumerate(candidates)]
    best = max(range(len(candidates)), key=lambda i: (scores[i], -i))
    return candidates[best], scores[best]


def drop_reason(chosen: Output, rejected: Output, cfg: SelfGenConfig) -> str | None:
    if not chosen.text:
        return "empty_chosen"
    if not rejected.text:
        return "empty_rejected"
    if chosen.text == rejected.text:
        return "identical"
    if cfg.drop_truncated_chosen and chosen.finish_reason == "length":
        return "truncated_chosen"
    return None


# ---------------------------------------------------------------------------------------------------------
# The stage


def run_config(recipe: Recipe, prompts: PromptSets) -> dict:
    """What the output depends on. Batch size, part size and the image limit may change between resumes."""
    sg = to_dict(recipe.selfgen)
    for key in ("output_dir", "batch_size", "images_per_part", "preview_pairs", "group_by_length"):
        sg.pop(key)
    sg["images"].pop("limit")
    for key in unused_keys(recipe.selfgen.pair_source):
        sg.pop(key)  # another pair source's keys: changing them changes nothing here
    if recipe.selfgen.pair_source != "self_questions":
        for key in ("questions_per_image", "question_sampling", "questioner_role"):
            sg.pop(key)
    sg["prompt_sets"] = dataclasses.asdict(prompts)
    if recipe.selfgen.pair_source == "self_questions":
        from stic.self_questions import load_question_prompts

        sg["question_prompt_sets"] = dataclasses.asdict(load_question_prompts(recipe.selfgen.prompts))
    config = {"stage": "selfgen", "model": to_dict(recipe.model), "selfgen": sg}
    backend = run_identity(recipe.generation, served_model(recipe.generation, recipe.model))
    if backend:  # answers sampled by a server differ from local ones: the two never mix in one output
        config["generation"] = backend
    return config


class PairGenerator:
    """Turns loaded images into preference rows with one model."""

    def __init__(self, generator: BatchGenerator, cfg: SelfGenConfig, prompts: PromptSets, model_name: str):
        from corruptions import make_corruption

        self.gen, self.cfg, self.prompts, self.model_name = generator, cfg, prompts, model_name
        self.corruption_specs = _corruption_specs(cfg.corruptions)
        self._make_corruption = make_corruption
        chosen = (to_dict(cfg.chosen_sampling) if cfg.consistency_samples == 1 else
                  {**to_dict(cfg.consistency_sampling), "self_consistency_samples": cfg.consistency_samples})
        self.generation = json.dumps({"chosen": chosen, "rejected": to_dict(cfg.rejected_sampling)}, sort_keys=True)
        if cfg.pair_source in ONPOLICY_SOURCES:
            self.ranker = OnPolicyRanker(generator, cfg, prompts.good, self.corruption_specs)
            self.generation = json.dumps({"pair_source": cfg.pair_source, "candidates": cfg.candidates,
                                          "sampling": to_dict(cfg.consistency_sampling)}, sort_keys=True)

    def plan(self, image_id: str) -> Plan:
        return plan_image(image_id, self.cfg, self.prompts, self.corruption_specs)

    def rejected_request(self, plan: Plan, image) -> tuple[Request, dict | None]:
        if plan.branch == "hallucination":
            return Request(image, plan.hallucination_prompt), None
        settings = {k: v for k, v in plan.corruption.items() if k != "kind"}
        corrupted, record = self._make_corruption(plan.corruption["kind"], **settings)(image, plan.corruption_seed)
        return Request(corrupted, plan.caption_prompt), record

    def __call__(self, items: list[tuple[str, Any]], on_batch=None) -> tuple[list[dict], list[dict]]:
        """items: (image_id, clean PIL image). Returns (rows, drops)."""
        if self.cfg.pair_source in ONPOLICY_SOURCES:
            return self.onpolicy_pairs(items, on_batch)
        plans = [self.plan(image_id) for image_id, _ in items]
        # every sampled answer draws from its own stream, seeded by (seed, image id, role): the pairs do not
        # depend on batch size, sharding or where a resumed run restarted
        seeds = {role: [stable_seed(self.cfg.seed, image_id, role) for image_id, _ in items]
                 for role in ("chosen", "rejected")}
        chosen_req = [Request(image, self.prompts.good, s) for (_, image), s in zip(items, seeds["chosen"])]
        rejected = [self.rejected_request(plan, image) for plan, (_, image) in zip(plans, items)]
        for (req, _), s in zip(rejected, seeds["rejected"]):
            req.seed = s
        k = self.cfg.consistency_samples
        if k == 1:
            chosen_out = self.gen.generate(chosen_req, self.cfg.chosen_sampling, on_batch=on_batch)
            agreements = [None] * len(items)
        else:  # k samples per image, the most consistent one kept
            samples = self.gen.generate([Request(r.image, r.prompt, stable_seed(r.seed, j))
                                         for r in chosen_req for j in range(k)],
                                        self.cfg.consistency_sampling, on_batch=on_batch)
            picked = [most_consistent(samples[i * k:(i + 1) * k]) for i in range(len(items))]
            chosen_out, agreements = [c for c, _ in picked], [a for _, a in picked]
        rejected_out = self.gen.generate([r for r, _ in rejected], self.cfg.rejected_sampling, on_batch=on_batch)
        rows, drops = [], []
        for plan, (_, image), c, (_, record), r, agree in zip(plans, items, chosen_out, rejected, rejected_out,
                                                             agreements):
            reason = drop_reason(c, r, self.cfg)
            if reason is None and self.cfg.min_agreement is not None and agree < self.cfg.min_agreement:
                reason = "low_agreement"
            if reason:
                drops.append({"id": plan.image_id, "status": "dropped", "reason": reason})
            else:
                rows.append(make_row(plan, image, c, r, record, self.prompts, self.cfg, self.model_name,
                                     self.generation, agree, getattr(self.gen, "system_prompt", None)))
        return rows, drops

    def onpolicy_pairs(self, items: list[tuple[str, Any]], on_batch=None) -> tuple[list[dict], list[dict]]:
        """The best- against the worst-scored of k answers per image (stic/onpolicy.py); the row keeps the image's
        caption prompt x as its prompt, as the stic rows do."""
        plans = [self.plan(image_id) for image_id, _ in items]
        rankings = self.ranker(items, [p.caption_prompt for p in plans], on_batch)
        rows, drops = [], []
        for plan, (_, image), ranking in zip(plans, items, rankings):
            reason = ranking.pick if isinstance(ranking.pick, str) else None
            if reason is None:
                chosen, rejected = (ranking.candidates[i] for i in ranking.pick)
                reason = drop_reason(chosen, rejected, self.cfg)
            if reason:
                drops.append({"id": plan.image_id, "status": "dropped", "reason": reason})
                continue
            ref = ranking.reference  # grounding's corrupted reference, shown in the preview
            row_plan = Plan(plan.image_id, plan.caption_prompt, self.cfg.pair_source, None,
                            {"kind": ref["kind"]} if ref else None, ref["seed"] if ref else None)
            row = make_row(row_plan, image, chosen, rejected, ref, self.prompts, self.cfg, self.model_name,
                           self.generation, None, getattr(self.gen, "system_prompt", None),
                           ranking.candidate_records())
            row.update(chosen_prompt=ranking.prompt, rejected_prompt=ranking.prompt)
            rows.append(row)
        return rows, drops


def make_pair_generator(engine, cfg: SelfGenConfig, prompts: PromptSets, model_name: str):
    """The worker of the recipe's pair source."""
    if cfg.pair_source == "self_questions":
        from stic.self_questions import QuestionPairGenerator, load_question_prompts

        return QuestionPairGenerator(engine, cfg, load_question_prompts(cfg.prompts), model_name,
                                     _corruption_specs(cfg.corruptions), drop_reason)
    return PairGenerator(engine, cfg, prompts, model_name)


def _check_pair_source(recipe: Recipe) -> None:
    """Refuse, before any model loads, what the pair source cannot run with."""
    cfg = recipe.selfgen
    if cfg.pair_source == "self_questions":
        from stic.self_questions import load_question_prompts

        load_question_prompts(cfg.prompts)  # a missing or malformed prompt file
        if cfg.questioner_role and recipe.generation.backend != "local":
            raise RecipeError("selfgen.questioner_role starts each answer with the questioner marker, which a "
                              "server's chat API cannot do: use generation.backend: local, or unset questioner_role")


def run_selfgen(recipe: Recipe, overwrite: bool = False) -> dict | None:
    """Run the stage; returns the manifest on the main process."""
    from stic.models import load_model, load_processor, process_state
    from stic.store import main_process_lock

    from stic.store import check_output_dir

    cfg = recipe.selfgen
    check_output_dir(cfg.output_dir, "selfgen.output_dir")
    if recipe.generation.backend == "local":
        from stic.models import resolve_model_path

        resolve_model_path(recipe.model.name_or_path)  # a missing model: refused before the folder is prepared
    prompts = load_prompts(cfg.prompts)
    _corruption_specs(cfg.corruptions)  # refuse bad corruption settings before loading anything
    _check_pair_source(recipe)
    refs = list_images(cfg.images)

    model_name = served_model(recipe.generation, recipe.model, job="selfgen")

    def make_worker(device):
        engine = make_engine(recipe.generation, model_name, recipe.model.system_prompt, lambda: BatchGenerator(
            load_model(recipe.model, device), load_processor(recipe.model), cfg.batch_size, cfg.group_by_length,
            recipe.model.system_prompt))
        return make_pair_generator(engine, cfg, prompts, model_name)

    with main_process_lock(cfg.output_dir, process_state().is_main_process):  # the manifest too
        return _generate(recipe, refs, prompts, make_worker, overwrite)


def _generate(recipe: Recipe, refs, prompts, make_worker, overwrite: bool) -> dict | None:
    from stic.store import run_sharded

    cfg = recipe.selfgen
    row_features, id_column = features(), ID_COLUMN
    if cfg.pair_source == "self_questions":  # several rows per image: an image is done when its rows are written
        from stic import self_questions

        row_features, id_column = self_questions.features(row_features), self_questions.SOURCE_COLUMN
    job = run_sharded(
        name="selfgen", out_dir=cfg.output_dir, refs=refs, run_config=run_config(recipe, prompts),
        load=ImageLoader(cfg.images), make_worker=make_worker, features=row_features, id_column=id_column,
        items_per_part=cfg.images_per_part, overwrite=overwrite,
    )
    if job is None:  # not the main process
        return None
    return write_selfgen_manifest(job.store, recipe, refs, job.run_stats, resumed_from=job.done_at_start,
                                  id_column=id_column, row_id_column=ID_COLUMN)
