"""What checking a recipe's keys and `stic <stage> --help` need from TRL, cached so neither imports it.

The training sections derive from TRL's configs, so knowing their keys means importing TRL, transformers and
torch (5-15 s). Each full parse (stic.recipe.parse_recipe) and each rendered help stores the section key trees
and the help text here, keyed by the digest of stic's sources and the installed TRL, transformers and peft
versions; later commands refuse an unknown key, and print help, from this file alone. Without a matching file
nothing is checked early: the full parse still refuses the key, only later.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from importlib import metadata
from pathlib import Path

from stic.config import SECTIONS, RecipeError, refuse_unknown_keys

_digest: str | None = None


def _cache_file() -> Path:
    global _digest
    if _digest is None:
        h = hashlib.sha256()
        for dist in ("trl", "transformers", "peft"):
            try:
                h.update(f"{dist}={metadata.version(dist)};".encode())
            except metadata.PackageNotFoundError:
                pass
        package = Path(__file__).resolve().parent
        for path in sorted(package.rglob("*.py")):  # any change to a section's fields changes the digest
            h.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
        _digest = h.hexdigest()[:20]
    root = Path(os.environ.get("STIC_CACHE", Path.home() / ".cache" / "stic"))
    return root / "recipe-keys" / f"{_digest}.json"


def _load() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _store(**update) -> None:
    path = _cache_file()
    data = {**_load(), **update}
    try:  # a read-only or full cache only costs speed
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


def key_tree(cls: type) -> dict:
    """{key: None, or the tree of a nested section} of a section dataclass."""
    hints = typing.get_type_hints(cls)
    tree = {}
    for f in dataclasses.fields(cls):
        if f.init:
            tp = hints[f.name]
            tree[f.name] = key_tree(tp) if dataclasses.is_dataclass(tp) else None
    return tree


def remember_keys(section_classes: dict) -> None:
    """Store the key trees of every section (once per process, when the cache lacks them)."""
    if "keys" not in _load():
        _store(keys={name: key_tree(cls) for name, cls in section_classes.items()})


def refuse_unknown(data: dict) -> None:
    """The unknown sections and keys of a raw recipe mapping, refused as the full parse refuses them; keys of a
    section that is not a mapping, and values, are left to the full parse."""
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise RecipeError(f"unknown recipe section{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                          f"known sections: {', '.join(SECTIONS)}")
    trees = _load().get("keys")
    if not trees:
        return

    def walk(values, tree: dict, where: str) -> None:
        if not isinstance(values, dict):
            return
        refuse_unknown_keys(values, tree, where)
        for key, value in values.items():
            if tree[key] is not None:
                walk(value, tree[key], f"{where}.{key}")

    for section, tree in trees.items():
        walk(data.get(section), tree, section)


def cached_help(sections: list[str], render) -> str:
    """`render(sections)` (stic.recipe.recipe_keys_help, passed in by the caller so this module stays below
    stic.recipe), from the cache when it holds it."""
    key = ",".join(sections)
    cached = _load().get("help", {})
    if key not in cached:
        cached = {**cached, key: render(sections)}
        _store(help=cached)
    return cached[key]
