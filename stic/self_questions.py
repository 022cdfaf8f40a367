"""Self-questioning (SQ-LLaVA, Sun et al. 2024): the model asks questions about an image, not only answers them.

Stage 1 data (`selfgen.pair_source: self_questions`). For each unlabeled image the model asks
`questions_per_image` questions of its own, one generation each: from a question-asking prompt, and, when
`selfgen.questioner_role` names the marker it was trained with in stage 2, with its answer started by that marker
(the questioner role). Each kept question is answered twice, as in STIC's two branches:
  chosen:   model(question, clean image)
  rejected: with probability `hallucination_prob` model(question + a hallucination-inducing request, clean image),
            otherwise model(question, corrupted image), the corruption drawn from `selfgen.corruptions`.
A row's prompt is the question, so the rows are ordinary preference rows that stage 1 trains on as they are. Every
choice (ask prompt, branch, corruption) is fixed by (seed, image id, question index) and every sampled text has its
own seed, so the rows do not depend on batching, sharding or resumes.

Stage 2 (`infuse_sft.self_questioning: delta`). In multi-turn instruction records with an image, each user turn
after the first becomes a questioner turn with probability delta (seeded per record): an assistant-side turn of the
family's own chat template whose text is `<marker> <question>`. The template's generation block holds it, so TRL's
assistant-only loss trains the question and the end of the turn, as it trains the answers; the header before it and
the user's ordinary turns are not trained. The marker is `infuse_sft.questioner_role` (plain text, default "VUSER:",
the name of SQ-LLaVA's questioner role), trained with the question; or `infuse_sft.questioner_token` (e.g. "[vusr]",
SQ-LLaVA's token): a new special token, added to the tokenizer, the embeddings grown to hold it, only its input row
trained (PEFT's trainable tokens, not whole embedding matrices), and the token itself never a target.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from typing import Any

from stic.config import to_dict
from stic.errors import SticError
from stic.generation import Output, Request, prompt_messages, stable_seed
from stic.prompts import PromptFileError, PromptsConfig, read_pool

# ---------------------------------------------------------------------------------------------------------
# Prompt sets

ASK_PROMPTS = [
    "Ask one question about this image that can be answered by looking at it. Write only the question.",
    "Write a question about something you can see in this image. Reply with the question alone.",
    "What is one question someone could ask about this picture? Give only the question.",
    "Look at the image and ask a specific question about an object in it: what it is, its color, where it is or "
    "how many there are. Write only the question.",
    "Ask a question about this photo whose answer is visible in it. Reply with one question and nothing else.",
    "Pose a short question that checks whether someone has looked at this image carefully. Write only the question.",
]

# Each holds {question}: the rejected answer of the hallucination branch answers the same question while inventing
# objects that would fit the scene (the paper's kind of hallucination).
ANSWER_HALLUCINATION_PROMPTS = [
    "{question}\nIn your answer, mention a few objects that are not in the image but would plausibly fit the scene, "
    "as if they were there.",
    "{question}\nAnswer as if the scene also held the people, animals or things that usually belong in such a place.",
    "{question}\nAnswer confidently, guessing any detail you cannot make out, and fill the surroundings with objects "
    "you would expect there.",
    "{question}\nAnswer by imagining what else this kind of scene usually contains, and treat it as visible.",
]


@dataclasses.dataclass(frozen=True)
class QuestionPromptSets:
    ask: tuple[str, ...]
    hallucination: tuple[str, ...]


def load_question_prompts(cfg: PromptsConfig) -> QuestionPromptSets:
    """The two pools, each from its file when the recipe names one (selfgen.prompts)."""
    ask = read_pool(cfg.question_prompts_file, "question prompts") if cfg.question_prompts_file else ASK_PROMPTS
    hallucination = ANSWER_HALLUCINATION_PROMPTS
    if cfg.answer_hallucination_prompts_file:
        hallucination = read_pool(cfg.answer_hallucination_prompts_file, "answer hallucination prompts")
        lacking = [p for p in hallucination if "{question}" not in p]
        if lacking:
            raise PromptFileError(f"answer hallucination prompts file {cfg.answer_hallucination_prompts_file}: every "
                                  f"prompt must hold {{question}}, e.g. not {lacking[0]!r}")
    return QuestionPromptSets(tuple(ask), tuple(hallucination))


# ---------------------------------------------------------------------------------------------------------
# Questions as generated

# list numbers, bullets and "Question:"/"Q1." labels a model puts before its question
_LEADING_LABELS = re.compile(r"^(?:\s*(?:\d+[.)]|[-*\u2022]|q(?:uestion)?\s*\d*\s*[:.)])\s*)+", re.IGNORECASE)


def parse_question(text: str, marker: str = "") -> str:
    """The one question of a generation: the marker (if the model repeats it) and list labels removed, the first
    non-empty line, cut after its first question mark, stripped of quotes. "" when nothing is left."""
    text = text.strip()
    while marker and text.startswith(marker):
        text = text[len(marker):].strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    bare = None
    while bare != line:  # labels and quotes in any order: 1. "Question: ..."
        bare, line = line, _LEADING_LABELS.sub("", line).strip().strip("\"'\u201c\u201d").strip()
    if "?" in line:
        line = line[:line.index("?") + 1]
    return line


def question_key(question: str) -> str:
    """What two questions must share to be the same question: their words, lower-cased."""
    return " ".join(re.findall(r"[a-z0-9]+", question.lower()))


# ---------------------------------------------------------------------------------------------------------
# The per-question plan: every random choice fixed by (seed, image id, question index)


@dataclasses.dataclass
class QuestionPlan:
    image_id: str
    index: int
    ask_prompt: str
    branch: str  # "hallucination" or "corruption"
    hallucination_prompt: str | None  # a template holding {question}
    corruption: dict | None
    corruption_seed: int | None

    @property
    def row_id(self) -> str:
        """The row's own id: one image gives several rows."""
        return f"{self.image_id}#q{self.index}"

    def rejected_prompt(self, question: str) -> str:
        if self.branch == "hallucination":
            return self.hallucination_prompt.replace("{question}", question)
        return question


def plan_questions(image_id: str, cfg, prompts: QuestionPromptSets, corruptions: list[dict]) -> list[QuestionPlan]:
    plans = []
    for j in range(cfg.questions_per_image):
        rng = random.Random(f"{cfg.seed}\x1fself_questions\x1f{image_id}\x1f{j}")
        ask = rng.choice(prompts.ask)
        if rng.random() < cfg.hallucination_prob:
            plans.append(QuestionPlan(image_id, j, ask, "hallucination", rng.choice(prompts.hallucination), None, None))
        else:
            plans.append(QuestionPlan(image_id, j, ask, "corruption", None, dict(rng.choice(corruptions)),
                                      rng.getrandbits(31)))
    return plans


# ---------------------------------------------------------------------------------------------------------
# Rows: selfgen's columns, with `image_id` the row's own id, plus the question and how it was asked

SOURCE_COLUMN = "source_image_id"  # the image: what a resumed run counts as done


def features(pair_features):
    """selfgen's row features (`pair_features`) plus the self-questioning columns."""
    import datasets

    text = datasets.Value("string")
    return datasets.Features({**pair_features, SOURCE_COLUMN: text, "question_index": datasets.Value("int32"),
                              "question": text, "question_prompt": text, "questioner_role": text,
                              "question_finish_reason": text})


class QuestionPairGenerator:
    """selfgen's worker for pair_source self_questions: loaded images in, preference rows and drops out.
    `pair_drop_reason(chosen, rejected, cfg)` is selfgen's check of a pair (empty, identical, truncated)."""

    def __init__(self, generator, cfg, prompts: QuestionPromptSets, model_name: str, corruption_specs: list[dict],
                 pair_drop_reason):
        from corruptions import make_corruption

        self.gen, self.cfg, self.prompts, self.model_name = generator, cfg, prompts, model_name
        self.corruption_specs, self.pair_drop_reason = corruption_specs, pair_drop_reason
        self._make_corruption = make_corruption
        self.marker = (cfg.questioner_role or "").strip()
        self.generation = json.dumps({"question": to_dict(cfg.question_sampling), "chosen": to_dict(cfg.chosen_sampling),
                                      "rejected": to_dict(cfg.rejected_sampling)}, sort_keys=True)

    def plans(self, image_id: str) -> list[QuestionPlan]:
        return plan_questions(image_id, self.cfg, self.prompts, self.corruption_specs)

    def rejected_request(self, plan: QuestionPlan, image, question: str) -> tuple[Request, dict | None]:
        seed = stable_seed(self.cfg.seed, plan.image_id, "rejected", plan.index)
        if plan.branch == "hallucination":
            return Request(image, plan.rejected_prompt(question), seed), None
        settings = {k: v for k, v in plan.corruption.items() if k != "kind"}
        corrupted, record = self._make_corruption(plan.corruption["kind"], **settings)(image, plan.corruption_seed)
        return Request(corrupted, question, seed), record

    def ask(self, items: list[tuple[str, Any]], on_batch=None) -> tuple[list[tuple], list[dict]]:
        """The questions of every image: [(plan, image, question, output)] kept, and the drops."""
        asked = [(plan, image) for image_id, image in items for plan in self.plans(image_id)]
        outs = self.gen.generate([Request(image, plan.ask_prompt, stable_seed(self.cfg.seed, plan.image_id,
                                                                             "question", plan.index), self.marker)
                                  for plan, image in asked], self.cfg.question_sampling, on_batch=on_batch)
        kept, drops, seen = [], [], set()
        for (plan, image), out in zip(asked, outs):
            question = parse_question(out.text, self.marker)
            key = question_key(question)
            reason = "empty_question" if not key else "duplicate_question" if (plan.image_id, key) in seen else None
            if reason:
                drops.append({"id": plan.image_id, "question": plan.index, "status": "dropped", "reason": reason})
                continue
            seen.add((plan.image_id, key))
            kept.append((plan, image, question, out))
        return kept, drops

    def __call__(self, items: list[tuple[str, Any]], on_batch=None) -> tuple[list[dict], list[dict]]:
        """items: (image_id, clean PIL image). Returns (rows, drops)."""
        kept, drops = self.ask(items, on_batch)
        if not kept:
            return [], drops
        chosen_out = self.gen.generate(
            [Request(image, question, stable_seed(self.cfg.seed, plan.image_id, "chosen", plan.index))
             for plan, image, question, _ in kept], self.cfg.chosen_sampling, on_batch=on_batch)
        rejected = [self.rejected_request(plan, image, question) for plan, image, question, _ in kept]
        rejected_out = self.gen.generate([r for r, _ in rejected], self.cfg.rejected_sampling, on_batch=on_batch)
        rows = []
        for (plan, image, question, asked), chosen, (_, record), rej in zip(kept, chosen_out, rejected, rejected_out):
            reason = self.pair_drop_reason(chosen, rej, self.cfg)
            if reason:
                drops.append({"id": plan.image_id, "question": plan.index, "status": "dropped", "reason": reason})
            else:
                rows.append(self.row(plan, image, question, asked, chosen, rej, record))
        return rows, drops

    def row(self, plan: QuestionPlan, image, question: str, asked: Output, chosen: Output, rejected: Output,
            corruption_record: dict | None) -> dict:
        return {
            "image_id": plan.row_id,
            "prompt": prompt_messages(question, getattr(self.gen, "system_prompt", None)),
            "chosen": [{"role": "assistant", "content": chosen.text}],
            "rejected": [{"role": "assistant", "content": rejected.text}],
            "images": [image],
            "rejected_branch": plan.branch,
            "caption_prompt": question,  # the row's prompt x
            "chosen_prompt": question,
            "rejected_prompt": plan.rejected_prompt(question),
            "corruption": plan.corruption["kind"] if plan.corruption else None,
            "corruption_params": json.dumps(corruption_record, sort_keys=True) if corruption_record else None,
            "chosen_finish_reason": chosen.finish_reason, "rejected_finish_reason": rejected.finish_reason,
            "chosen_num_tokens": chosen.num_tokens, "rejected_num_tokens": rejected.num_tokens,
            "seed": self.cfg.seed, "model": self.model_name, "generation": self.generation,
            "image_corruption": plan.branch == "corruption",
            "hallu_prompt": plan.rejected_prompt(question) if plan.branch == "hallucination" else "",
            "chosen_agreement": None,
            "candidates": None,  # the on-policy pair sources' ranking; none here
            SOURCE_COLUMN: plan.image_id, "question_index": plan.index, "question": question,
            "question_prompt": plan.ask_prompt, "questioner_role": self.marker or None,
            "question_finish_reason": asked.finish_reason,
        }


# ---------------------------------------------------------------------------------------------------------
# Stage 2: questioner turns


@dataclasses.dataclass(frozen=True)
class QuestionerTurns:
    share: float  # delta
    marker: str
    seed: int

    def apply(self, messages: list[dict], key: str) -> tuple[list[dict], int]:
        """(messages with the chosen user turns after the first made questioner turns, how many). The choice is
        drawn per turn with probability `share` from a stream seeded by (seed, record key): the same record gets
        the same turns in every run, whatever else is in the subset."""
        rng = random.Random(f"{self.seed}\x1fself_questioning\x1f{key}")
        out, turned, first_seen = [], 0, False
        for message in messages:
            if message["role"] == "user":
                draw = rng.random() if first_seen else None
                first_seen = True
                if draw is not None and draw < self.share and isinstance(message["content"], str):
                    out.append({"role": "assistant", "content": f"{self.marker} {message['content'].strip()}"})
                    turned += 1
                    continue
            out.append(message)
        return out, turned

    def count(self, records: list[dict]) -> dict:
        """What `apply` does to `records` ({id, messages}): for the run summary."""
        later = sum(max(0, sum(m["role"] == "user" for m in r["messages"]) - 1) for r in records)
        turned = sum(self.apply(r["messages"], r["id"])[1] for r in records)
        return {"delta": self.share, "marker": self.marker, "records": len(records), "later_user_turns": later,
                "questioner_turns": turned}


def questioner_turns(cfg) -> QuestionerTurns | None:
    """Stage 2's questioner turns from infuse_sft's keys; None when self_questioning is 0."""
    if not cfg.self_questioning:
        return None
    return QuestionerTurns(cfg.self_questioning, cfg.questioner_token or cfg.questioner_role.strip(), cfg.seed)


# ---------------------------------------------------------------------------------------------------------
# Stage 2: a questioner token of its own


def add_questioner_token(processor, token: str) -> int:
    """Add `token` to the processor's tokenizer as a special token (never split, never merged with its
    neighbours); returns its id. A token the tokenizer has already is kept as it is."""
    tok = processor.tokenizer
    if token not in tok.get_vocab():
        tok.add_tokens([token], special_tokens=True)
    return tok.convert_tokens_to_ids(token)


def make_room_for_token(model, token_id: int, known_rows: int) -> dict:
    """Grow the model's embeddings to hold `token_id` (stic.models.grow_token_embeddings: new rows start at the mean
    of the `known_rows` rows the tokenizer had). A spare row already there (vocabularies padded to a multiple)
    starts at the mean as well. Returns what was done."""
    from stic.models import grow_token_embeddings

    return grow_token_embeddings(model, token_id + 1, known_rows, reset_from=token_id)


class TiedEmbeddingsError(SticError, ValueError):
    """A questioner token on a model whose output head shares the input embeddings."""


def token_rows_to_train(model, token_id: int) -> dict[str, list[int]]:
    """PEFT's trainable_token_indices for the token: its row of the input embeddings alone. Only that row trains
    (modules_to_save on the embeddings would train, save, and keep float32 master weights and optimizer state for
    the whole vocabulary). The token is never a training target (see `IgnoreToken`), so its output row is not
    trained; on a model that ties the two, PEFT would wrap the output head too, which TRL's fused LM head cannot
    read: refused."""
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight is embeddings.weight:
        raise TiedEmbeddingsError(
            f"infuse_sft.questioner_token: {type(model).__name__} ties its output head to its input embeddings, and "
            "TRL's fused LM head cannot train PEFT's token rows there; use questioner_role (a text marker) instead")
    return {next(n for n, m in model.named_modules() if m is embeddings): [token_id]}


class IgnoreToken:
    """A collator whose batches never train on `token_id`: the questioner token opens the questioner turn the way
    SQ-LLaVA's [vusr] role does; it is given in the prompt (selfgen's questioner_role), never generated, so only the
    question after it and the end of the turn are targets."""

    def __init__(self, collator, token_id: int):
        self.collator, self.token_id = collator, token_id

    def __call__(self, examples):
        batch = self.collator(examples)
        batch["labels"][batch["input_ids"] == self.token_id] = -100
        return batch
