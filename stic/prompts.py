"""The three prompt sets of STIC's self-generated preference data.

- DESCRIBE_STEP_BY_STEP: the careful prompt that produces the preferred description.
- CAPTION_PROMPTS: ordinary requests for a description. One is drawn per image; it is the prompt stored
  with the pair and used in training, and it also drives the corrupted-image branch.
- HALLUCINATION_PROMPTS: requests that invite invented content; they produce dispreferred descriptions.

A recipe can replace any set from a file (see `PromptsConfig`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

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

HALLUCINATION_PROMPTS = [
    "Describe the image, and add a few imaginative objects that could plausibly be just outside the frame as if "
    "they were in it.",
    "Describe this picture as a storyteller would, inventing people and events that might have been there a moment "
    "earlier.",
    "Describe the image and include several details that are not visible but would fit the scene.",
    "Give a description of the image that mentions objects commonly found in such a place, whether or not they "
    "appear.",
    "Imagine what else this scene contains and describe it all as if you could see it.",
    "Describe the image, making up the names, numbers and written text you would expect to find in it.",
    "Describe the picture with hypothetical background activity and extra characters that make it livelier.",
    "Describe the image, guessing freely at colors, counts and positions you cannot make out clearly.",
]


@dataclasses.dataclass
class PromptsConfig:
    """Files that replace a prompt set. The good prompt file is read whole; a pool file holds one prompt per
    non-empty line, or a JSON list of strings."""

    good_prompt_file: str | None = None
    caption_prompts_file: str | None = None
    hallucination_prompts_file: str | None = None


@dataclasses.dataclass(frozen=True)
class PromptSets:
    good: str
    caption: tuple[str, ...]
    hallucination: tuple[str, ...]


def _read_pool(path: str, what: str) -> tuple[str, ...]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file {p} does not exist")
    text = p.read_text()
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{what} file {p}: not a valid JSON list ({err.msg})") from None
        if not all(isinstance(x, str) for x in items):
            raise ValueError(f"{what} file {p}: the JSON list must hold strings")
    else:
        items = text.splitlines()
    pool = tuple(x.strip() for x in items if x.strip())
    if not pool:
        raise ValueError(f"{what} file {p} holds no prompt")
    return pool


def load_prompts(cfg: PromptsConfig) -> PromptSets:
    good = DESCRIBE_STEP_BY_STEP
    if cfg.good_prompt_file:
        p = Path(cfg.good_prompt_file)
        if not p.is_file():
            raise FileNotFoundError(f"good prompt file {p} does not exist")
        good = p.read_text().strip()
        if not good:
            raise ValueError(f"good prompt file {p} is empty")
    caption = _read_pool(cfg.caption_prompts_file, "caption prompts") if cfg.caption_prompts_file else None
    hallu = (_read_pool(cfg.hallucination_prompts_file, "hallucination prompts")
             if cfg.hallucination_prompts_file else None)
    return PromptSets(good=good, caption=caption or tuple(CAPTION_PROMPTS),
                      hallucination=hallu or tuple(HALLUCINATION_PROMPTS))
