"""Recipes: one YAML file per model with a section per stage, parsed strictly into dataclasses.

A recipe looks like

    model:    {name_or_path: llava-hf/llava-v1.6-mistral-7b-hf, dtype: bfloat16}
    selfgen:  {output_dir: data/selfgen, images: {type: folder, path: ...}, ...}

Unknown keys and ill-typed values raise `RecipeError` naming the dotted key before any work starts.
Command-line overrides use the same dotted keys: `selfgen.batch_size=4 model.dtype=float32`.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from stic.errors import SticError


class RecipeError(SticError, ValueError):
    """A recipe or override that cannot be used; the message names the offending key."""


def option(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, help: str) -> Any:
    """A recipe key: a dataclass field with its `stic <stage> --help` text."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"help": help})


# ---------------------------------------------------------------------------------------------------------
# Sections shared by every stage


@dataclasses.dataclass
class ModelSpec:
    """Which model to load and how. `tiny:<family>[@seed]` builds a small random model offline."""

    name_or_path: str = option("tiny:llava", help="hub id or local folder; tiny:<family>[@seed] builds a small "
                                                  "random model offline")
    revision: str | None = option(None, help="hub revision (branch, tag or commit)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", help="weights' dtype when loading; auto: the checkpoint's stored dtype where a GPU computes, "
                     "float32 on a machine without CUDA")
    attn_implementation: str | None = option(
        None, help="sdpa | eager | flash_attention_2; None lets transformers choose")
    device_map: str | None = option(
        None, help="None: the whole model on this process's device; auto: one copy sharded over all visible GPUs")
    load_in_4bit: bool = option(False, help="QLoRA: load the base weights in 4-bit NF4 (needs CUDA)")
    trust_remote_code: bool = option(False, help="allow the checkpoint's own modelling code")
    merged_dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", help="the one dtype of a base and its adapted models in eval (and of DaR, the stage-2 "
                     "descriptions). auto: `dtype` when every trained adapter's update survives it (relative error "
                     "<= 3%), else float32 (stage 1's lr-1e-7 update mostly vanishes in bf16)")
    system_prompt: str | None = option(
        None, help="a system message before every conversation the toolkit generates from or trains on, for "
                   "models evaluated with one (LLaVA-1.5: the Vicuna prompt)")


@dataclasses.dataclass
class BackendConfig:
    """Where selfgen, the stage-2 descriptions and eval generate: in this process (local) or on OpenAI-compatible
    servers (openai: vLLM, SGLang, `transformers serve`), see stic/serving.py."""

    backend: Literal["local", "openai"] = option(
        "local", help="local: generate in this process; openai: on OpenAI-compatible servers (vLLM, SGLang, "
                      "transformers serve)")
    endpoints: list[str] = option(factory=list, help="server base URLs, e.g. http://gpu1:8000/v1")
    model: str | None = option(
        None, help="the model name the servers serve; None: the job's model folder or hub id (model.name_or_path)")
    api_key_env: str = option("STIC_GENERATION_API_KEY", help="the variable holding the API key; unset: no key")
    max_concurrency: int = option(32, help="requests in flight per process, over all endpoints")
    timeout: float = option(600.0, help="seconds for one request, sent to fully answered (a retry gets new ones)")
    max_retries: int = option(5, help="further tries of a request after a 429, 5xx, timeout or lost connection")
    max_endpoint_failures: int = option(
        3, help="consecutive failed requests (5xx, timeouts, lost connections) after which an endpoint is dropped")

    def __post_init__(self):
        if self.backend == "openai" and not self.endpoints:
            raise ValueError("backend openai needs at least one URL in endpoints")
        bad = [u for u in self.endpoints if not u.startswith(("http://", "https://"))]
        if bad:
            raise ValueError(f"endpoints must be http:// or https:// URLs, got {', '.join(bad)}")
        if self.max_concurrency < 1 or self.max_endpoint_failures < 1 or self.max_retries < 0 or self.timeout <= 0:
            raise ValueError("max_concurrency and max_endpoint_failures must be at least 1, max_retries at least 0 "
                             "and timeout positive")


# ---------------------------------------------------------------------------------------------------------
# Strict dict -> dataclass conversion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


@dataclasses.dataclass(frozen=True)
class OverrideText:
    """A command-line override's scalar: its YAML 1.1 reading and the text typed. The key's type decides which
    is meant (`_coerce`): `dpo.save_strategy=no` is the string "no", not YAML 1.1's False."""

    raw: str
    value: Any


def plain(value: Any) -> Any:
    """`value` with every OverrideText replaced by its YAML reading (for keys without a type to decide by)."""
    if isinstance(value, OverrideText):
        return value.value
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


# a number as YAML 1.2 writes it; PyYAML (YAML 1.1) reads `1e-7` (no dot) as a string
_NUMBER = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; convert only where it is lossless (int -> float, a number
    written as text -> float)."""
    if isinstance(value, OverrideText):
        try:
            return _coerce(value.value, tp, key)
        except RecipeError as err:
            try:  # the text as typed: a string key takes `no`, `1.0`, `2024`
                return _coerce(value.raw, tp, key)
            except RecipeError:
                raise err from None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return plain(value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except RecipeError as err:
                errors.append(str(err))
        raise RecipeError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise RecipeError(f"{key}: expected one of {', '.join(map(repr, args))}, got {value!r}")
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{key}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise RecipeError(f"{key}: expected one of {[e.value for e in tp]}, got {value!r}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)
        raise RecipeError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{key}: expected a string, got {value!r}")
    if tp is dict:
        if isinstance(value, dict):
            return plain(value)
        raise RecipeError(f"{key}: expected a mapping, got {value!r}")
    if tp is list:
        if isinstance(value, list):
            return plain(value)
        raise RecipeError(f"{key}: expected a list, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise RecipeError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return plain(value)


def with_changes(section: dict, changes: dict) -> dict:
    """`section` with `changes` applied key by key, into nested mappings (`images: {limit: 200}` keeps the path)."""
    out = dict(section)
    for key, value in changes.items():
        inner = out.get(key)
        nested = isinstance(value, dict) and isinstance(inner, (dict, type(None)))
        out[key] = with_changes(inner or {}, value) if nested else value
    return out


def from_dict(cls: type, data: dict, section: str) -> Any:
    """Build dataclass `cls` from `data`, refusing unknown keys and wrong types (named as section.key)."""
    return build_checked(cls, checked_fields(cls, data, section), section)


def build_checked(cls: type, kwargs: dict, section: str) -> Any:
    """Build `cls` from arguments `checked_fields` returned; its own checks' errors name the section."""
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{section}: {err}") from err


def refuse_unknown_keys(data: dict, known: collections.abc.Iterable[str], section: str) -> None:
    """RecipeError naming the keys of `data` not in `known`, with close matches and the known keys."""
    known = sorted(known)
    unknown = sorted(set(data) - set(known))
    if unknown:
        import difflib

        close = [m for k in unknown for m in difflib.get_close_matches(k, known, n=2, cutoff=0.6)]
        raise RecipeError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(f'{section}.{k}' for k in unknown)}"
            + (f" (did you mean {', '.join(f'{section}.{h}' for h in close)}?)" if close else "")
            + f"; known keys of {section}: {', '.join(known)}"
        )


def checked_fields(cls: type, data: dict, section: str) -> dict:
    """`data` as the keyword arguments of dataclass `cls`, after refusing unknown keys and wrong types; `cls`
    itself is not built (nor its checks run)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{section}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    refuse_unknown_keys(data, fields, section)
    return {name: _coerce(value, hints[name], f"{section}.{name}") for name, value in data.items()}


def to_dict(obj: Any) -> Any:
    """A dataclass as plain JSON-able data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj


# ---------------------------------------------------------------------------------------------------------
# Recipe files and overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """`selfgen.batch_size=4` -> (["selfgen", "batch_size"], 4); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override {text!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise RecipeError(f"override {text!r}: value is not valid YAML ({err})") from None
    return key.strip().lstrip("-").split("."), value


def apply_overrides(data: dict, overrides: list[str], default_section: str | None = None) -> dict:
    """Set dotted keys in the raw recipe mapping. A key that names no section goes to `default_section`."""
    for text in overrides:
        path, value = parse_override(text)
        if default_section and (len(path) == 1 or path[0] not in SECTIONS):
            path = [default_section, *path]
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {text!r}: {part} is not a section")
        raw = text.partition("=")[2].strip()
        # a scalar YAML 1.1 reads as other than the text typed keeps both; the key's type chooses (`_coerce`)
        node[path[-1]] = (OverrideText(raw, value) if not isinstance(value, (dict, list, str)) and raw
                          else value)
    return data


def load_recipe_dict(path: str | Path | None, overrides: list[str] = (), default_section: str | None = None) -> dict:
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"recipe file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise RecipeError(f"recipe {p} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"recipe {p}: the top level must be a mapping of sections")
    return apply_overrides(data, list(overrides), default_section)


# Every section a recipe may hold; stic.recipe.parse_recipe parses them all into one Recipe.
SECTIONS = ("name", "description", "model", "generation", "selfgen", "dpo", "infuse_sft", "eval", "rounds")
