"""One recipe, one object: every section of a recipe YAML parsed strictly into `Recipe`.

    name, description          free text
    model:       ModelSpec          the base model, shared by every stage
    generation:  BackendConfig      where selfgen, the stage-2 descriptions and eval generate
    selfgen:     SelfGenConfig      preference pairs from unlabeled images
    dpo:         DPOStageConfig     stage 1 (every TRL DPOConfig option too)
    infuse_sft:  InfuseSFTConfig    stage 2 (every TRL SFTConfig option too)
    eval:        EvalConfig         benchmarks
    rounds:      RoundsConfig       `stic rounds`: selfgen, stage 1, eval and merge, repeated

Each stage reads the previous stage's output unless the recipe names its input: dpo.dataset defaults to
selfgen.output_dir, infuse_sft.stage1_adapter to dpo.output_dir (`CHAINED_DEFAULTS`).

The stage section dataclasses live here, not in the stage modules, so that this module sits below the stages
(stic.selfgen, stic.dpo, stic.infuse, stic.evaluate import it and re-export their section) and above the
modules the sections are built from (stic.config, stic.generation, stic.images, stic.models ...).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from trl import DPOConfig, SFTConfig

from stic.benchmarks import PAPER_BENCHMARKS, check_known, load_plugins
from stic.config import (SECTIONS, BackendConfig, ModelSpec, RecipeError, _coerce, build_checked,
                         checked_fields, option, plain, to_dict)
from stic.generation import SamplingConfig
from stic.images import ImageSourceConfig
from stic.instructions import InstructionDataConfig, SubsetConfig
from stic.judge import JudgeConfig
from stic.models import LoraOptions, train_on_cpu_without_cuda
from stic.prompts import CAPTION_PROMPTS, PromptsConfig
from stic.recipe_cache import remember_keys
from stic.training import check_global_batch, check_training_numbers

# ---------------------------------------------------------------------------------------------------------
# selfgen


PAIR_SOURCES = ("stic", "grounding", "self_feedback", "self_questions")


@dataclasses.dataclass
class SelfGenConfig:
    output_dir: str = option("outputs/selfgen", help="where the preference pairs are written")
    images: ImageSourceConfig = option(factory=ImageSourceConfig, help="the unlabeled images")
    prompts: PromptsConfig = option(factory=PromptsConfig, help="files that replace the built-in prompt sets")
    seed: int = option(42, help="seeds every per-image choice (prompts, branch, corruption) and the sampling")
    hallucination_prob: float = option(
        0.5, help="p in Algorithm 1: the share of images whose rejected answer comes from a hallucination prompt")
    corruptions: list[str | dict] = option(
        factory=lambda: ["color_jitter", "lower_resolution"],
        help="corruption kinds of the other branch: a name, or {kind: name, <setting>: value, ...}")
    chosen_sampling: SamplingConfig = option(factory=SamplingConfig, help="sampling of the preferred answer")
    rejected_sampling: SamplingConfig = option(
        factory=lambda: SamplingConfig(do_sample=True, temperature=1.0, top_p=0.95),
        help="sampling of the dispreferred answer")
    batch_size: int = option(8, help="images per generation batch")
    group_by_length: bool = option(True, help="batch prompts of similar length together")
    images_per_part: int = option(64, help="images per parquet part: the unit of work lost to a kill")
    drop_truncated_chosen: bool = option(False, help="also drop pairs whose chosen answer hit max_new_tokens")
    consistency_samples: int = option(
        1, help="self-consistency (label-free): sample this many preferred answers with consistency_sampling and "
                "keep the one that agrees most with the others; 1 keeps the single chosen_sampling answer")
    consistency_sampling: SamplingConfig = option(
        factory=lambda: SamplingConfig(do_sample=True, temperature=0.7),
        help="sampling of the self-consistency candidates")
    min_agreement: float | None = option(None, help="drop images whose best agreement is lower (0..1)")
    preview_pairs: int = option(12, help="pairs shown in preview.html")
    pair_source: str = option(
        "stic", help="how pairs are made: stic (the paper's: a described clean image against a hallucination "
                     "prompt or a corrupted image), grounding or self_feedback (on-policy: k answers to the normal "
                     "prompt ranked without labels), self_questions (the model's own questions about the image)")
    # pair_source self_questions (stic/self_questions.py)
    questions_per_image: int = option(
        2, help="self_questions: questions the model asks about each image, one generation each; each answered "
                "question becomes one pair")
    question_sampling: SamplingConfig = option(
        factory=lambda: SamplingConfig(max_new_tokens=48, do_sample=True, temperature=1.0, top_p=0.95),
        help="self_questions: sampling of the questions")
    questioner_role: str | None = option(
        None, help="self_questions: the questioner marker the model was trained with in stage 2 "
                   "(infuse_sft.questioner_token, else infuse_sft.questioner_role): its answer is started with the "
                   "marker, so it asks in that role; unset: a question-asking prompt alone")
    # on-policy pairs (pair_source grounding, self_feedback; see stic/onpolicy.py)
    candidates: int = option(
        4, help="grounding/self_feedback: answers sampled per image with consistency_sampling; the best-scored one "
                "becomes the chosen answer, the worst-scored one the rejected answer")
    candidate_prompt: Literal["good", "caption"] = option(
        "caption", help="grounding/self_feedback: the prompt the candidates are sampled and scored under: caption "
                        "(the normal prompt x the pair is trained with: the answers the model really gives) or good "
                        "(the step-by-step prompt of STIC's chosen answers)")
    min_score_gap: float = option(
        0.0, help="grounding/self_feedback: drop an image whose best and worst scores differ by less (ties always)")
    grounding_reference: Literal["corrupted", "blank"] = option(
        "corrupted", help="grounding: score = log p(y | image) - log p(y | reference), the reference a copy corrupted "
                          "by one of corruptions (drawn per image) or a blank grey image of the same size")
    grounding_score: Literal["mean", "sum", "min_claim"] = option(
        "mean", help="grounding: the margin per answer token (mean: no length bias), summed over the answer (sum: "
                     "longer grounded answers score higher), or of the answer's least grounded claim (min_claim)")
    feedback_question: str = option(
        "Is it true that {claim}? Answer yes or no.",
        help="self_feedback: the yes/no question the model answers about each claim of an answer ({claim})")
    feedback_score: Literal["share", "count"] = option(
        "share", help="self_feedback: an answer's score, the share of its claims the model affirms or their count "
                      "(count favours longer answers)")
    feedback_max_claims: int = option(
        8, help="self_feedback: claims asked about per answer, the first ones (each is one short generation)")

    def __post_init__(self):
        if self.pair_source not in PAIR_SOURCES:
            raise ValueError(f"pair_source must be one of {', '.join(PAIR_SOURCES)}, got {self.pair_source!r}")
        if not 0.0 <= self.hallucination_prob <= 1.0:
            raise ValueError(f"hallucination_prob must lie in [0, 1], got {self.hallucination_prob}")
        if self.hallucination_prob < 1.0 and not self.corruptions:
            raise ValueError("corruptions is empty but hallucination_prob < 1 needs at least one")
        if self.batch_size < 1 or self.images_per_part < 1 or self.consistency_samples < 1:
            raise ValueError("batch_size, images_per_part and consistency_samples must be at least 1")
        if self.min_agreement is not None and self.consistency_samples < 2:
            raise ValueError("min_agreement needs consistency_samples of 2 or more")
        if self.questions_per_image < 1:
            raise ValueError(f"questions_per_image must be at least 1, got {self.questions_per_image}")
        if self.pair_source == "self_questions" and self.consistency_samples > 1:
            raise ValueError("consistency_samples picks among descriptions (pair_source stic); self_questions "
                             "answers each question once: set consistency_samples to 1")
        if self.questioner_role is not None and not self.questioner_role.strip():
            raise ValueError("questioner_role is empty; unset it to ask with a prompt alone")
        if "{claim}" not in self.feedback_question:
            raise ValueError(f"feedback_question must hold {{claim}}, got {self.feedback_question!r}")
        if self.feedback_max_claims < 1 or self.min_score_gap < 0:
            raise ValueError("feedback_max_claims must be at least 1 and min_score_gap at least 0")
        if self.pair_source in ("grounding", "self_feedback"):
            if self.candidates < 2:
                raise ValueError(f"pair_source {self.pair_source} ranks candidates: candidates must be at least 2, "
                                 f"got {self.candidates}")
            if not self.consistency_sampling.do_sample:
                raise ValueError(f"pair_source {self.pair_source} samples its candidates with consistency_sampling, "
                                 "which must sample (do_sample: true): greedy candidates are all the same answer")
            if self.pair_source == "grounding" and self.grounding_reference == "corrupted" and not self.corruptions:
                raise ValueError("grounding_reference corrupted draws from corruptions, which is empty")
            if self.consistency_samples > 1:
                raise ValueError(f"consistency_samples picks the chosen answer of pair_source stic; pair_source "
                                 f"{self.pair_source} picks by its own score (set candidates instead)")


# ---------------------------------------------------------------------------------------------------------
# dpo (stage 1)


def paper_alpha_to_sft_weight(alpha: float, mean_chosen_tokens: float) -> float:
    """The TRL sft weight that matches the paper's summed-log-prob / 1024 regulariser on average."""
    return alpha * mean_chosen_tokens / 1024.0


class _Unset:
    """sft_weight not given: 1.0, or computed at run time when paper_alpha is set."""

    def __repr__(self):
        return "unset"


_SFT_WEIGHT_DEFAULT = _Unset()


@dataclasses.dataclass
class DPOStageConfig(LoraOptions, DPOConfig):
    """DPOConfig plus the stage's own keys. Defaults follow the paper where it gives them."""

    output_dir: str = option("outputs/dpo", help="where the stage-1 adapter and its logs are written")
    dataset: str | list[str] = option(
        "outputs/selfgen", help="a folder written by `stic selfgen` (or any local dataset in that format), a "
                                "STIC-style JSON/JSONL file of records, or a Hugging Face dataset id; a list of "
                                "them trains on all their rows (e.g. two pair constructions' selfgen folders)")
    dataset_split: str = option("train", help="the split of a dataset")
    image_folder: str | None = option(None, help="where a JSON/JSONL dataset's relative image paths live")
    allow_outside_image_folder: bool = option(
        False, help="a JSON/JSONL dataset: read image paths that lead outside image_folder (default: the file's "
                    "folder), absolute or ../; false refuses them")
    max_samples: int | None = option(None, help="train on the first N pairs only")
    mode: Literal["dpo", "sft_positive"] = option(
        "dpo", help="dpo: DPO + alpha * SFT (STIC stage 1); sft_positive: plain SFT on the preferred answers only, "
                    "same data and budget (the paper's Table 3 ablation)")
    sft_weight: float | None = option(
        _SFT_WEIGHT_DEFAULT, help="alpha as TRL's per-token-mean sft weight; None leaves loss_type/loss_weights as "
                                  "given. Default 1.0, or computed at run time with paper_alpha")
    paper_alpha: float | None = option(
        None, help="the paper's alpha (summed chosen log-prob / 1024): sft_weight = paper_alpha * L / 1024, L the "
                   "mean chosen length in tokens, measured on the dataset when the run starts")
    global_batch_size: int | None = option(
        None, help="sequences per optimizer step over all processes: sets gradient_accumulation_steps at run time")
    max_length: int | None = option(None, help="None: no truncation (TRL's default 1024 would cut image tokens)")
    ref_model: str | None = option(
        None, help="full fine-tuning only: the frozen reference model (default: the base model)")
    resume: bool = option(False, help="continue from the last checkpoint in output_dir")
    plot: bool = option(True, help="write a PNG of the training curves")
    image_margin_probe: int = option(
        2, help="rows of a fixed probe batch on which every training log records the image-use margin, "
                "log p(answer | image) - log p(answer | blank image), for chosen and rejected (does DPO teach the "
                "model to look, or only to avoid words?); 0: off")
    conditional_weight: float = option(
        0.0, help="mDPO's image-conditional preference (Wang et al. 2024): adds this weight x -log sigmoid(beta * "
                  "[chosen reward on the image - chosen reward on a corrupted image]), the same answer preferred "
                  "with the real image; costs one more forward of the chosen sequences, policy and reference; 0: off")
    conditional_corruption: str | dict = option(
        "random_crop", help="the corrupted image of the conditional pair: a corruption kind, or {kind: name, "
                            "<setting>: value, ...}, seeded per row by (seed, image, prompt, chosen answer). "
                            "Default: mDPO's, a random crop of 1-20% of the image scaled back to full size")
    anchor_weight: float = option(
        0.0, help="mDPO's reward anchor: adds this weight x -log sigmoid(beta * [log pi(y_w) - log pi_ref(y_w)]), "
                  "which keeps the chosen reward above 0; no extra forward; 0: off")
    report_to: str | list[str] = option(factory=lambda: ["tensorboard"], help="TRL's loggers")
    logging_steps: float = option(1, help="log every N optimizer steps")

    def __post_init__(self):
        if self.image_margin_probe < 0:
            raise ValueError(f"image_margin_probe must be 0 (off) or more rows, got {self.image_margin_probe}")
        losses = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        weights = list(self.loss_weights) if self.loss_weights is not None else [1.0] * len(losses)
        # a copy of a parsed config (dataclasses.replace) arrives with the sft entry this method appended: keep it
        derived_sft = (self.sft_weight not in (_SFT_WEIGHT_DEFAULT, None) and losses.count("sft") == 1
                       and losses[-1] == "sft" and weights[-1] == float(self.sft_weight))
        if derived_sft:
            losses, weights = losses[:-1], weights[:-1]
        if self.paper_alpha is not None:
            if self.sft_weight not in (_SFT_WEIGHT_DEFAULT, None):  # None: a copy of a parsed config
                raise ValueError(f"set either paper_alpha ({self.paper_alpha}) or sft_weight ({self.sft_weight}), "
                                 "not both: paper_alpha computes sft_weight from the dataset")
            if self.paper_alpha < 0:
                raise ValueError(f"paper_alpha must be at least 0, got {self.paper_alpha}")
            if "sft" in losses:
                raise ValueError("set either paper_alpha or an 'sft' entry in loss_type, not both")
            self.sft_weight = None  # set by apply_paper_alpha once the dataset is loaded
        elif self.sft_weight is _SFT_WEIGHT_DEFAULT:
            self.sft_weight = 1.0
        check_training_numbers(self)
        if self.sft_weight is not None and self.sft_weight < 0:  # a negative weight trains away from the answers
            raise ValueError(f"sft_weight must be at least 0, got {self.sft_weight}")
        if self.beta <= 0:  # 0 leaves DPO without gradient, a negative value prefers the rejected answers
            raise ValueError(f"beta must be positive, got {self.beta}")
        check_global_batch(self)
        if self.sft_weight is not None:
            if "sft" in losses:
                raise ValueError("set either sft_weight or an 'sft' entry in loss_type, not both "
                                 "(sft_weight: null keeps loss_type as given)")
            if self.sft_weight > 0:
                losses, weights = losses + ["sft"], weights + [float(self.sft_weight)]
        self.loss_type, self.loss_weights = losses, weights
        train_on_cpu_without_cuda(self)
        if self.mode == "sft_positive" and self.ref_model:
            raise ValueError("ref_model has no use in mode sft_positive")
        self._check_conditional_preference()
        super().__post_init__()

    def _check_conditional_preference(self) -> None:
        """mDPO's two terms: weights, the corruption (built once, so a bad setting fails at parse time), and the
        settings they cannot work with."""
        for key in ("conditional_weight", "anchor_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be 0 (off) or positive, got {getattr(self, key)}")
        if not (self.conditional_weight or self.anchor_weight):
            return
        keys = " and ".join(k for k in ("conditional_weight", "anchor_weight") if getattr(self, k))
        if self.mode == "sft_positive":
            raise ValueError(f"{keys} add to the DPO loss: they have no use in mode sft_positive")
        if self.ld_alpha is not None:  # its length weighting splits a batch into chosen and rejected halves
            raise ValueError(f"{keys} use whole-answer log-probabilities: set ld_alpha to null")
        if self.conditional_weight:
            self.conditional_corruption_spec()

    def conditional_corruption_spec(self) -> dict:
        """`conditional_corruption` as {"kind": ..., **settings}, checked by building it."""
        from corruptions import make_corruption

        item = self.conditional_corruption
        spec = {"kind": item} if isinstance(item, str) else dict(item)
        if "kind" not in spec:
            raise ValueError("conditional_corruption: a mapping needs a 'kind' key")
        try:
            make_corruption(spec["kind"], **{k: v for k, v in spec.items() if k != "kind"})
        except (ValueError, TypeError) as err:
            raise ValueError(f"conditional_corruption: {err}") from None
        return spec

    def apply_paper_alpha(self, mean_chosen_tokens: float) -> float:
        """Set sft_weight, and TRL's loss_type/loss_weights, from paper_alpha and the dataset's mean chosen length
        in tokens (before the trainer is built: it reads them once)."""
        weight = paper_alpha_to_sft_weight(self.paper_alpha, mean_chosen_tokens)
        pairs = [(name, w) for name, w in zip(self.loss_type, self.loss_weights) if name != "sft"]
        if weight > 0:
            pairs.append(("sft", weight))
        self.loss_type, self.loss_weights = [n for n, _ in pairs], [w for _, w in pairs]
        self.sft_weight = weight
        return weight


# ---------------------------------------------------------------------------------------------------------
# infuse_sft (stage 2)

DEFAULT_TEMPLATE = "Image description: {description}\n{instruction}"


@dataclasses.dataclass
class DescribeConfig:
    """How the stage-1 model describes an image, in stage 2 and in DaR alike."""

    prompt: str | None = option(
        None, help="a fixed captioning prompt; None draws one per image from the caption pool, seeded by (seed, "
                   "image key), as the paper's Algorithm 2 does")
    caption_prompts_file: str | None = option(
        None, help="replaces the caption pool (one prompt per line, or a JSON list)")
    sampling: SamplingConfig = option(factory=lambda: SamplingConfig(max_new_tokens=256),
                                      help="sampling of the descriptions")
    batch_size: int = option(8, help="images per generation batch")
    images_per_part: int = option(64, help="descriptions per parquet part: the unit of work lost to a kill")

    def __post_init__(self):
        if self.batch_size < 1 or self.images_per_part < 1:
            raise ValueError(f"batch_size and images_per_part must be at least 1, got "
                             f"{self.batch_size} and {self.images_per_part}")
        if self.prompt is None and self.caption_prompts_file:
            from stic.prompts import read_pool

            read_pool(self.caption_prompts_file, "caption prompts")  # empty or missing: refused now, not mid-run

    def prompt_for(self, key: str, seed: int) -> str:
        """The describe prompt of one image (stage 2) or one benchmark item (DaR)."""
        if self.prompt is not None:
            return self.prompt
        import random

        from stic.prompts import read_pool

        pool = read_pool(self.caption_prompts_file, "caption prompts") if self.caption_prompts_file else CAPTION_PROMPTS
        return random.Random(f"{seed}\x1fdescribe\x1f{key}").choice(pool)


@dataclasses.dataclass
class InfuseSFTConfig(LoraOptions, SFTConfig):
    """SFTConfig (every TRL option works) plus the stage's keys."""

    output_dir: str = option("outputs/infuse_sft", help="where the stage-2 adapter, descriptions and logs go")
    data: InstructionDataConfig = option(factory=InstructionDataConfig, help="the old instruction data")
    subset: SubsetConfig = option(factory=SubsetConfig, help="which records of it are trained on")
    describe: DescribeConfig = option(factory=DescribeConfig, help="how the stage-1 model describes the images")
    template: str = option(DEFAULT_TEMPLATE, help="the infused first user turn; needs {description} and "
                                                  "{instruction}")
    stage1_adapter: str | None = option(
        "outputs/dpo", help="the stage-1 model is the base (model:) plus this adapter; null: no adapter")
    stage1_model: str | None = option(None, help="a merged stage-1 model folder instead (then model: is ignored)")
    adapter_mode: Literal["continue", "new"] = option(
        "continue", help="continue: keep training the stage-1 adapter (the paper); new: a fresh adapter on the "
                         "stage-1 model")
    descriptions_dir: str | None = option(None, help="where the descriptions go; default <output_dir>/descriptions")
    overwrite_descriptions: bool = option(False, help="describe the images again instead of resuming")
    resume: bool = option(
        False, help="continue SFT from the last checkpoint in output_dir (descriptions always resume)")
    plot: bool = option(True, help="write a PNG of the training curves")
    num_train_epochs: float = option(1.0, help="passes over the subset")
    assistant_only_loss: bool = option(True, help="the loss on assistant tokens only")
    self_questioning: float = option(
        0.0, help="delta of SQ-LLaVA: the share of user turns after the first (in records with an image) that "
                  "become questioner turns, the question trained as well as its answer; 0: off")
    questioner_role: str = option(
        "VUSER:", help="the marker that opens a questioner turn (an assistant-side turn of the family's chat "
                       "template: the marker and the question are trained)")
    questioner_token: str | None = option(
        None, help="a new special token (SQ-LLaVA: [vusr]) used as the marker instead of questioner_role: added to "
                   "the tokenizer, the embeddings resized, its input and output rows trained")
    global_batch_size: int | None = option(
        None, help="sequences per optimizer step over all processes: sets gradient_accumulation_steps at run time")
    max_length: int | None = option(None, help="None: no truncation (TRL's default 1024 would cut image tokens)")
    report_to: str | list[str] = option(factory=lambda: ["tensorboard"], help="TRL's loggers")
    logging_steps: float = option(1, help="log every N optimizer steps")

    def __post_init__(self):
        if "{description}" not in self.template or "{instruction}" not in self.template:
            raise ValueError("template must contain {description} and {instruction}")
        if self.stage1_adapter and self.stage1_model:
            raise ValueError("set stage1_adapter or stage1_model, not both")
        if self.adapter_mode == "continue" and not self.stage1_adapter:
            raise ValueError("adapter_mode: continue needs stage1_adapter")
        if not 0.0 <= self.self_questioning <= 1.0:
            raise ValueError(f"self_questioning must lie in [0, 1], got {self.self_questioning}")
        if not self.questioner_role.strip():
            raise ValueError("questioner_role is empty")
        if self.questioner_token is not None:
            if not self.questioner_token.strip() or any(c.isspace() for c in self.questioner_token):
                raise ValueError(f"questioner_token must be one word without spaces, got {self.questioner_token!r}")
            if self.self_questioning == 0:
                raise ValueError("questioner_token is set but self_questioning is 0: nothing would use the token")
        check_training_numbers(self)
        check_global_batch(self)
        train_on_cpu_without_cuda(self)
        super().__post_init__()

    def to_dict(self):  # TrainingArguments serialises itself to JSON for logs and checkpoints
        d = super().to_dict()
        for key in ("data", "subset", "describe"):
            d[key] = to_dict(getattr(self, key))
        return d


# ---------------------------------------------------------------------------------------------------------
# eval


@dataclasses.dataclass
class BenchmarkSource:
    """Where one benchmark's items come from (official files or a Hugging Face dataset) and, for the judged
    benchmarks, the judge rules."""

    hf_dataset: str | None = option(
        None, help="a Hub dataset name or a local parquet/`datasets` folder in lmms-eval's layout; unset: the "
                   "official files under eval.data_root")
    hf_config: str | None = option(None, help="the dataset's configuration (subset) name, if it has several")
    split: str | None = option(None, help="the dataset split; unset: the split lmms-eval's task file reads")
    rule_file: str | None = option(
        None, help="judged benchmarks: the official judge rules (LLaVA's rule.json, MM-Vet's grader prompt), "
                   "taken from those projects; unset: the toolkit's own wording, not comparable to published scores")


@dataclasses.dataclass
class ChairConfig:
    """CHAIR on COCO val2014 (Rohrbach et al. 2018): which images are described, with which prompt, and the COCO
    and synonym files the scorer reads (see stic/chair.py for its rules)."""

    images: str | None = option(None, help="the COCO val2014 image folder; unset: <data_root>/chair/val2014")
    annotations: str | None = option(
        None, help="the folder holding COCO's instances_val2014.json and captions_val2014.json (from "
                   "annotations_trainval2014.zip); unset: <data_root>/chair/annotations")
    synonyms: str | None = option(
        None, help="the public CHAIR synonym list (data/synonyms.txt of LisaAnne/Hallucination; each line a COCO "
                   "object, then its synonyms, comma-separated); unset: <data_root>/chair/synonyms.txt")
    n_images: int | None = option(
        500, help="images drawn from val2014 with random.Random(seed).sample over the sorted image ids; null: all")
    seed: int = option(0, help="the seed of that draw")
    image_ids: str | None = option(
        None, help="a file of COCO image ids or file names, one a line, evaluated instead of the draw (e.g. "
                   "the list a paper used)")
    prompt: str = option("Please describe this image in detail.", help="the describe prompt (OPERA's)")

    def __post_init__(self):
        if self.n_images is not None and self.n_images < 1:
            raise ValueError(f"n_images must be at least 1 (null: every image), got {self.n_images}")


def _source(name: str):
    return option(factory=BenchmarkSource, help=f"{name}: Hugging Face source and judge rules")


@dataclasses.dataclass
class EvalConfig:
    data_root: str = option("playground/data/eval", help="LLaVA-1.5's layout: <data_root>/<benchmark>/...")
    output_dir: str = option("outputs/eval", help="where each run's predictions and scores go")
    benchmarks: list[str] = option(factory=lambda: list(PAPER_BENCHMARKS), help="the benchmarks to run")
    plugins: list[str] = option(
        factory=list, help="modules imported before benchmarks is checked; each registers its own benchmarks "
                           "(e.g. stic.shapes.benchmarks)")
    batch_size: int = option(8, help="questions per generation batch")
    limit: int | None = option(None, help="first N items of each benchmark (quick checks)")
    judge: JudgeConfig = option(factory=JudgeConfig, help="the GPT judge of LLaVA-Bench and MM-Vet")
    scienceqa: BenchmarkSource = _source("ScienceQA-IMG")
    textvqa: BenchmarkSource = _source("TextVQA")
    chartqa: BenchmarkSource = _source("ChartQA")
    pope: BenchmarkSource = _source("POPE")
    mmbench: BenchmarkSource = _source("MMBench")
    mathvista: BenchmarkSource = _source("MathVista")
    llava_bench: BenchmarkSource = _source("LLaVA-Bench (in the wild)")
    mmvet: BenchmarkSource = _source("MM-Vet")
    chair: ChairConfig = option(factory=ChairConfig, help="CHAIR on COCO: images, prompt and the scorer's files")

    def source(self, name: str) -> BenchmarkSource:
        """A benchmark's source section; plugin benchmarks have none and read the official layout."""
        found = getattr(self, name, None)
        return found if isinstance(found, BenchmarkSource) else BenchmarkSource()

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:  # a negative limit would slice items off the end
            raise ValueError(f"limit must be at least 1 (null: every item), got {self.limit}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        load_plugins(self.plugins)
        check_known(self.benchmarks)


# ---------------------------------------------------------------------------------------------------------
# rounds (`stic rounds`, stic/rounds.py)


@dataclasses.dataclass
class RoundsConfig:
    output_dir: str = option(
        "outputs/rounds", help="the rounds' folder: round-<k>/{selfgen,dpo,eval,merged}, rounds_state.json, and "
                               "rounds.md, rounds.json, rounds.png")
    count: int = option(3, help="rounds at most (an early stop may end sooner); `stic rounds --rounds N` sets it")
    benchmarks: list[str] | None = option(None, help="what each round is evaluated on; null: eval.benchmarks")
    metric: str | None = option(
        None, help="the benchmark whose headline value decides the early stop (its direction: the benchmark's); "
                   "null: the first of benchmarks")
    min_improvement: float | None = option(
        0.0, help="a round must beat the best earlier value of the metric by more than this, in the headline's "
                  "units, or the rounds stop; null: never stop early")
    eval_base: bool = option(
        True, help="round 1 also evaluates its base (round 0 of the table: the first value the metric must beat)")
    extra_selfgen: list[dict] = option(
        factory=list, help="further pair constructions each round, each a mapping of the selfgen keys it changes, "
                           "nested mappings merged key by key (e.g. {pair_source: self_questions, images: {limit: "
                           "200}} keeps images.path): each runs with the round's model into round-<k>/selfgen-<i> "
                           "(i = 2, 3, ...), and stage 1 trains on every round folder's pairs")

    def __post_init__(self):
        if any(not isinstance(e, dict) for e in self.extra_selfgen):
            raise ValueError("extra_selfgen takes a list of mappings of selfgen keys")
        if any("output_dir" in e for e in self.extra_selfgen):
            raise ValueError("extra_selfgen: output_dir is set by the rounds (round-<k>/selfgen-<i>)")
        if self.count < 1:
            raise ValueError(f"count must be at least 1, got {self.count}")
        if self.min_improvement is not None and self.min_improvement < 0:
            raise ValueError(f"min_improvement must be at least 0 (null: never stop early), got {self.min_improvement}")
        if self.benchmarks is not None and not self.benchmarks:
            raise ValueError("benchmarks is empty; null takes eval.benchmarks")
        if self.metric is not None and self.benchmarks is not None and self.metric not in self.benchmarks:
            raise ValueError(f"metric {self.metric} is not one of benchmarks ({', '.join(self.benchmarks)})")


# ---------------------------------------------------------------------------------------------------------
# The recipe


@dataclasses.dataclass
class Recipe:
    """Every section of a recipe. A command builds the sections it uses; the others are checked (keys and types)
    and left as None (see parse_recipe)."""

    name: str | None = None
    description: str | None = None
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    generation: BackendConfig = dataclasses.field(default_factory=BackendConfig)
    selfgen: SelfGenConfig | None = dataclasses.field(default_factory=SelfGenConfig)
    dpo: DPOStageConfig | None = dataclasses.field(default_factory=DPOStageConfig)
    infuse_sft: InfuseSFTConfig | None = dataclasses.field(default_factory=InfuseSFTConfig)
    eval: EvalConfig | None = dataclasses.field(default_factory=EvalConfig)
    rounds: RoundsConfig | None = dataclasses.field(default_factory=RoundsConfig)
    # the checked keys of the sections left unbuilt, so that a command can read e.g. another stage's output_dir
    unbuilt: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def setting(self, section: str, key: str) -> Any:
        """A section's value of `key`, whether the section was built or only checked."""
        built = getattr(self, section)
        if built is not None:
            return getattr(built, key)
        values = self.unbuilt.get(section, {})
        return values[key] if key in values else _field_default(SECTION_CLASSES[section], key)


SECTION_CLASSES = {"model": ModelSpec, "generation": BackendConfig, "selfgen": SelfGenConfig, "dpo": DPOStageConfig,
                   "infuse_sft": InfuseSFTConfig, "eval": EvalConfig, "rounds": RoundsConfig}
ALL_SECTIONS = tuple(SECTION_CLASSES)

# (section, key, source): a key left out of the recipe takes the source's value, the previous stage's output
CHAINED_DEFAULTS = (("dpo", "dataset", "selfgen.output_dir"), ("infuse_sft", "stage1_adapter", "dpo.output_dir"))


def parse_recipe(data: dict, build: tuple[str, ...] = ALL_SECTIONS) -> Recipe:
    """The whole recipe mapping (as `stic.config.load_recipe_dict` reads it), every section checked.

    Only the sections in `build` are built; the others are checked for unknown keys and wrong types and left as
    None. Building a TRL section runs TrainingArguments' setup (bf16 support, accelerate's process state, tf32,
    a DeepSpeed config), which must not happen in a command that does not train with it (selfgen, eval)."""
    remember_keys(SECTION_CLASSES)  # for the next command's early check of unknown keys (stic.recipe_cache)
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise RecipeError(
            f"unknown recipe section{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"known sections: {', '.join(SECTIONS)}"
        )
    parsed: dict[str, Any] = {key: _coerce(data.get(key), str | None, key) for key in ("name", "description")}
    checked: dict[str, dict] = {}
    for section, cls in SECTION_CLASSES.items():
        values = data.get(section) or {}
        for target, key, source in CHAINED_DEFAULTS:
            if target == section and isinstance(values, dict) and key not in values:
                source_section, source_key = source.split(".")
                default = checked[source_section].get(
                    source_key, _field_default(SECTION_CLASSES[source_section], source_key))
                if key == "stage1_adapter" and plain(values.get("stage1_model")):
                    default = None  # a merged stage-1 model holds its adapter already
                values = {**values, key: default}
        checked[section] = checked_fields(cls, values, section)
        built = section in build or section in ("model", "generation")  # cheap and used by every stage
        parsed[section] = build_checked(cls, checked[section], section) if built else None
    return Recipe(**parsed, unbuilt={k: v for k, v in checked.items() if parsed[k] is None})


def _field_default(cls: type, name: str) -> Any:
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def recipe_to_dict(recipe: Recipe) -> dict:
    """The recipe as a mapping `parse_recipe` reads back: each section's keys that differ from its defaults.

    TRL sections derive some fields in __post_init__ (dpo: loss_type/loss_weights from sft_weight), so only a
    recipe whose dpo section leaves those derived fields alone round-trips (not one with paper_alpha)."""
    out: dict[str, Any] = {k: getattr(recipe, k) for k in ("name", "description") if getattr(recipe, k) is not None}
    for f in dataclasses.fields(recipe):
        section = getattr(recipe, f.name)
        if not dataclasses.is_dataclass(section):
            continue
        values, defaults = to_dict(section), to_dict(type(section)())
        changed = {k: v for k, v in values.items() if v != defaults[k]}
        if changed:
            out[f.name] = changed
    return out


# ---------------------------------------------------------------------------------------------------------
# `stic <stage> --help`: the recipe keys of a stage's sections


SECTION_TYPES = {"model": ModelSpec, "generation": BackendConfig, "selfgen": SelfGenConfig, "dpo": DPOStageConfig,
                 "infuse_sft": InfuseSFTConfig, "eval": EvalConfig, "rounds": RoundsConfig}


def _type_text(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "|".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_text(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_text(a) for a in args)}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _own_fields(cls: type) -> list[dataclasses.Field]:
    """The fields stic declares: for a TRL-derived section, its own keys, not those it inherits from TRL."""
    own = {name for klass in cls.__mro__ if klass.__module__.startswith("stic.")
           for name in vars(klass).get("__annotations__", {})}
    return [f for f in dataclasses.fields(cls) if f.init and f.name in own]


def recipe_keys(cls: type, prefix: str, defaults: Any = None) -> list[str]:
    """`prefix.key (type, default X): help` for every key of `cls`, nested sections flattened to dotted keys."""
    chained = {f"{section}.{key}": source for section, key, source in CHAINED_DEFAULTS}
    hints = typing.get_type_hints(cls)
    lines = []
    for f in _own_fields(cls):
        key, tp = f"{prefix}.{f.name}", hints[f.name]
        if defaults is not None:
            default = getattr(defaults, f.name)
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(tp):
            lines += recipe_keys(tp, key, default)
            continue
        default_text = chained.get(key) or repr(to_dict(default))
        lines.append(f"  {key} ({_type_text(tp)}, default {default_text}): {f.metadata.get('help', '')}")
    return lines


def recipe_keys_help(sections: list[str]) -> str:
    """The epilog of a stage's --help: the keys of `sections`, and for TRL-derived ones a note on TRL's keys."""
    lines = ["recipe keys (override as section.key=value):"]
    for section in sections:
        cls = SECTION_TYPES[section]
        lines += recipe_keys(cls, section)
        for trl_config in (DPOConfig, SFTConfig):
            if issubclass(cls, trl_config):
                lines.append(f"  {section}.*: every TRL {trl_config.__name__} option too (learning_rate, "
                             f"per_device_train_batch_size, ...)")
    return "\n".join(lines)
