"""The three prompt sets of STIC's self-generated preference data.

- DESCRIBE_STEP_BY_STEP: the careful prompt that produces the preferred description.
- CAPTION_PROMPTS: ordinary requests for a description. One is drawn per image; it is the prompt stored
  with the pair and used in training, and it also drives the corrupted-image branch.
- HALLUCINATION_PROMPTS: requests to describe the image with invented objects (people, animals, things that
  would fit but are not there); they produce dispreferred descriptions. EXTRA_HALLUCINATION_PROMPTS add other
  invented content (text, numbers, attributes) when a recipe opts in with `prompts.hallucination_kinds`.

A recipe can replace any set from a file (see `PromptsConfig`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

from stic.config import option
from stic.errors import SticError

DESCRIBE_STEP_BY_STEP = """\
Look at the image carefully and describe it step by step, mentioning only what you can actually see.
1. Main subjects: name the people, animals or objects that stand out and say what each one is doing.
2. Setting: say where the scene takes place and what surrounds the subjects.
3. Mood and lighting: describe the light (time of day, direction, brightness) and the atmosphere it creates.
4. Colors and composition: name the dominant colors and explain how the elements are arranged in the frame.
5. Notable details: point out smaller things a quick glance would miss, such as text, textures or counts.
6. Interpretation: in one or two sentences, say what the image as a whole seems to show or convey."""

CAPTION_PROMPTS = [
    "Describe the image.",
    "What is shown in this picture?",
    "Give a detailed description of this image.",
    "Explain what you see in the image.",
    "Write a description of the scene in this photo.",
    "Tell me what is happening in this image.",
    "Describe the contents of this picture in detail.",
    "What can you see in this photograph?",
    "Provide a description of the image.",
    "Summarize the visual content of this image.",
]

# The paper's dispreferred descriptions come from prompts that invent OBJECTS: things, people or animals
# that are not in the image but would plausibly fit it. This is the default pool.
HALLUCINATION_PROMPTS = [
    "Describe the image, and add a few objects that are not there but would plausibly fit the scene, as if they "
    "were in it.",
    "Describe this picture, including some people or animals that would naturally belong in such a scene even if "
    "you cannot see them.",
    "Describe the image and mention several objects commonly found in this kind of place, whether or not they "
    "appear.",
    "Imagine what other things this scene probably contains and describe them all as if you could see them.",
    "Describe the picture, filling the background with extra objects and figures that would make it look "
    "complete.",
    "Describe the image as if it were wider than it is, adding the objects you would expect just outside the "
    "frame as part of the scene.",
    "Describe this image, inventing a few more items on the surfaces and in the corners that would suit the "
    "setting.",
    "Describe the scene together with the people, vehicles or animals that usually accompany it, as though they "
    "were present.",
]

# Other kinds of invented content, opt-in through `prompts.hallucination_kinds`: written text and numbers, and
# attributes (colours, counts, positions) made up where the image does not show them.
EXTRA_HALLUCINATION_PROMPTS = {
    "text": [
        "Describe the image, making up the names, signs and written text you would expect to find in it.",
        "Describe the picture and quote any labels, captions or lettering such a scene would have, even if none "
        "is legible.",
    ],
    "numbers": [
        "Describe the image, giving exact numbers for everything: how many of each thing there are, prices, times "
        "and sizes, guessing where you cannot tell.",
        "Describe the picture with precise counts and figures, inventing them where the image does not show them.",
    ],
    "attributes": [
        "Describe the image, guessing freely at colors, counts and positions you cannot make out clearly.",
        "Describe the picture, stating the color, material and exact position of every item, even the ones you "
        "cannot see well.",
    ],
}
HALLUCINATION_KINDS = ("objects", *EXTRA_HALLUCINATION_PROMPTS)


def hallucination_pool(kinds) -> tuple[str, ...]:
    """The built-in hallucination prompts of `kinds` ("objects" is the paper's pool)."""
    unknown = [k for k in kinds if k not in HALLUCINATION_KINDS]
    if unknown or not kinds:
        raise ValueError(f"hallucination_kinds: unknown kind{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(map(repr, unknown))}; choose from {', '.join(HALLUCINATION_KINDS)}"
                         if unknown else "hallucination_kinds is empty; choose from " + ", ".join(HALLUCINATION_KINDS))
    pool = list(HALLUCINATION_PROMPTS) if "objects" in kinds else []
    for kind in EXTRA_HALLUCINATION_PROMPTS:
        if kind in kinds:
            pool += EXTRA_HALLUCINATION_PROMPTS[kind]
    return tuple(pool)


@dataclasses.dataclass
class PromptsConfig:
    """Files that replace a prompt set. The good prompt file is read whole; a pool file holds one prompt per
    non-empty line, or a JSON list of strings."""

    good_prompt_file: str | None = option(None, help="replaces the step-by-step prompt of the preferred answer")
    caption_prompts_file: str | None = option(None, help="replaces the caption prompt pool")
    hallucination_prompts_file: str | None = option(None, help="replaces the hallucination prompt pool")
    hallucination_kinds: list[str] = option(
        factory=lambda: ["objects"], help="built-in hallucination prompts to draw from: objects (the paper's "
                                          "pool), and opt-in text, numbers, attributes (colours, counts, positions)")
    question_prompts_file: str | None = option(
        None, help="pair_source self_questions: replaces the pool of prompts that ask the model for a question")
    answer_hallucination_prompts_file: str | None = option(
        None, help="pair_source self_questions: replaces the pool of prompts that induce a hallucinated answer; "
                   "each holds {question}")

    def __post_init__(self):
        hallucination_pool(self.hallucination_kinds)  # refuses an unknown kind
        if self.hallucination_prompts_file and list(self.hallucination_kinds) != ["objects"]:
            raise ValueError("hallucination_prompts_file replaces the built-in pool; hallucination_kinds "
                             "chooses from the built-in pool: set one of the two")


@dataclasses.dataclass(frozen=True)
class PromptSets:
    good: str
    caption: tuple[str, ...]
    hallucination: tuple[str, ...]


class PromptFileError(SticError, ValueError):
    """A prompt file that is empty or not a list of strings."""


@functools.lru_cache(maxsize=16)  # stage 2 and DaR draw a prompt per image from the same file
def read_pool(path: str, what: str) -> tuple[str, ...]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file {p} does not exist")
    text = p.read_text()
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise PromptFileError(f"{what} file {p}: not a valid JSON list ({err.msg})") from None
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise PromptFileError(f"{what} file {p}: the JSON list must hold strings")
    else:
        items = text.splitlines()
    pool = tuple(x.strip() for x in items if x.strip())
    if not pool:
        raise PromptFileError(f"{what} file {p} holds no prompt")
    return pool


def load_prompts(cfg: PromptsConfig) -> PromptSets:
    good = DESCRIBE_STEP_BY_STEP
    if cfg.good_prompt_file:
        p = Path(cfg.good_prompt_file)
        if not p.is_file():
            raise FileNotFoundError(f"good prompt file {p} does not exist")
        good = p.read_text().strip()
        if not good:
            raise PromptFileError(f"good prompt file {p} is empty")
    caption = read_pool(cfg.caption_prompts_file, "caption prompts") if cfg.caption_prompts_file else None
    hallu = (read_pool(cfg.hallucination_prompts_file, "hallucination prompts")
             if cfg.hallucination_prompts_file else None)
    return PromptSets(good=good, caption=caption or tuple(CAPTION_PROMPTS),
                      hallucination=hallu or hallucination_pool(cfg.hallucination_kinds))
