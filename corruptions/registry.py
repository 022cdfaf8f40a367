"""The corruption registry and the seeded apply step shared by every kind."""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from stic.errors import SticError

REGISTRY: dict[str, type["Corruption"]] = {}


class CorruptionError(SticError, ValueError):
    """Unknown corruption kind or setting."""


def register(cls: type["Corruption"]) -> type["Corruption"]:
    if cls.name in REGISTRY:
        raise CorruptionError(f"corruption {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls
    return cls


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return repr(value)


class Corruption(abc.ABC):
    """A named v2 transform with settings. Subclasses set `name`, `defaults` and `build()`.

    `dtype` is what the transform works on: uint8 images in [0, 255] or float32 images in [0, 1].
    """

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}
    dtype: ClassVar[torch.dtype] = torch.uint8

    def __init__(self, **settings: Any):
        unknown = sorted(set(settings) - set(self.defaults))
        if unknown:
            raise CorruptionError(
                f"corruption {self.name!r} has no setting {', '.join(unknown)}; "
                f"its settings are {', '.join(sorted(self.defaults)) or 'none'}"
            )
        self.settings = {**self.defaults, **settings}
        self.transform = self.build(**self.settings)

    @abc.abstractmethod
    def build(self, **settings: Any) -> v2.Transform:
        """The v2 transform for these settings."""

    def __call__(self, image: Image.Image, seed: int) -> tuple[Image.Image, dict[str, Any]]:
        tensor = F.to_dtype(F.pil_to_tensor(image.convert("RGB")), self.dtype, scale=True)
        # Draw every random value from a private generator state so results depend only on `seed`.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            params = self.transform.make_params([tensor])
            out = self.transform.transform(tensor, params)
        out = F.to_dtype(out, torch.uint8, scale=True)
        record = {
            "kind": self.name,
            "seed": int(seed),
            "settings": _jsonable(self.settings),
            "sampled": _jsonable({k: v for k, v in params.items() if not callable(v)}),
        }
        return F.to_pil_image(out), record


def make_corruption(kind: str, **settings: Any) -> Corruption:
    if kind not in REGISTRY:
        raise CorruptionError(f"unknown corruption {kind!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[kind](**settings)


def corrupt(image: Image.Image, kind: str, seed: int = 0, **settings: Any) -> tuple[Image.Image, dict[str, Any]]:
    """Apply corruption `kind` to `image` with `seed`; returns the new image and its record."""
    return make_corruption(kind, **settings)(image, seed)
