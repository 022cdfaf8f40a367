"""Image corruptions for STIC's dispreferred responses, built on torchvision.transforms.v2.

Every corruption is named, takes its settings as keyword arguments, and is applied with a seed:

    >>> from corruptions import corrupt
    >>> image2, record = corrupt(image, "color_jitter", seed=7)
    >>> record  # {"kind": "color_jitter", "seed": 7, "settings": {...}, "sampled": {...}}

The same (image, kind, settings, seed) always gives the same pixels, and `record` holds everything needed to
reproduce them: the settings and the values drawn from the seed.
"""

from corruptions import kinds as _kinds  # noqa: F401  (registers the built-in corruptions)
from corruptions.registry import (
    REGISTRY,
    Corruption,
    CorruptionError,
    corrupt,
    make_corruption,
    register,
)

__all__ = ["REGISTRY", "Corruption", "CorruptionError", "corrupt", "make_corruption", "register"]
