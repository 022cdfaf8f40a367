"""The built-in corruptions. Paper defaults where STIC gives them (color jitter: brightness 0.5, hue 0.3)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from corruptions.registry import Corruption, register


def _range(value: float | list[float]) -> tuple[float, float]:
    return (float(value), float(value)) if isinstance(value, (int, float)) else (float(value[0]), float(value[1]))


def _uniform(lo: float, hi: float) -> float:
    return lo if lo == hi else float(torch.empty(1).uniform_(lo, hi))


@register
class ColorJitter(Corruption):
    name = "color_jitter"
    defaults = {"brightness": 0.5, "contrast": 0.0, "saturation": 0.0, "hue": 0.3}

    def build(self, **s):
        return v2.ColorJitter(**s)


class _LowerResolution(v2.Transform):
    def __init__(self, short_side: float | list[float]):
        super().__init__()
        self.short_side = _range(short_side)

    def make_params(self, flat_inputs):
        h, w = flat_inputs[0].shape[-2:]
        short = round(_uniform(*self.short_side))
        scale = min(1.0, short / min(h, w))
        return {"low_size": [max(1, round(h * scale)), max(1, round(w * scale))], "size": [int(h), int(w)]}

    def transform(self, inpt, params):
        small = F.resize(inpt, params["low_size"], antialias=True)
        return F.resize(small, params["size"], interpolation=v2.InterpolationMode.BILINEAR, antialias=False)


@register
class LowerResolution(Corruption):
    """Shrink so the shorter side is ~20 px, then scale back up: the detail is gone, the layout stays."""

    name = "lower_resolution"
    defaults = {"short_side": 20}

    def build(self, **s):
        return _LowerResolution(**s)


@register
class GaussianBlur(Corruption):
    name = "gaussian_blur"
    defaults = {"sigma": [3.0, 6.0]}

    def build(self, **s):
        sigma = _range(s["sigma"])
        kernel = 2 * math.ceil(3 * sigma[1]) + 1  # covers +-3 sigma of the widest draw
        return v2.GaussianBlur(kernel_size=kernel, sigma=sigma)


@register
class GaussianNoise(Corruption):
    name = "gaussian_noise"
    defaults = {"sigma": 0.2}
    dtype = torch.float32

    def build(self, **s):
        return v2.GaussianNoise(mean=0.0, sigma=float(s["sigma"]), clip=True)


@register
class JPEGCompression(Corruption):
    name = "jpeg"
    defaults = {"quality": [5, 15]}

    def build(self, **s):
        q = s["quality"]
        return v2.JPEG(quality=tuple(q) if isinstance(q, (list, tuple)) else int(q))


@register
class Occlusion(Corruption):
    """One random rectangle erased to black (random erasing with p = 1)."""

    name = "occlusion"
    defaults = {"scale": [0.1, 0.3], "ratio": [0.3, 3.3], "value": 0}

    def build(self, **s):
        return v2.RandomErasing(p=1.0, scale=tuple(s["scale"]), ratio=tuple(s["ratio"]), value=s["value"])


class _CropBack(v2.Transform):
    def __init__(self, scale: list[float], ratio: list[float]):
        super().__init__()
        self.crop = v2.RandomResizedCrop(size=1, scale=tuple(scale), ratio=tuple(ratio))  # draws the box only

    def make_params(self, flat_inputs):
        return self.crop.make_params(flat_inputs)

    def transform(self, inpt, params):
        size = list(inpt.shape[-2:])
        return F.resized_crop(inpt, params["top"], params["left"], params["height"], params["width"], size,
                              antialias=True)


@register
class RandomCrop(Corruption):
    """Keep a random rectangle of `scale` (a share of the area) and scale it back to the full size: most of the
    scene is gone. mDPO's corrupted image (Wang et al. 2024: a crop of 0-20% of the image; their code draws
    RandomResizedCrop's scale from 0.01 to 0.2)."""

    name = "random_crop"
    defaults = {"scale": [0.01, 0.2], "ratio": [0.75, 4 / 3]}

    def build(self, **s):
        if not 0 < _range(s["scale"])[0] <= _range(s["scale"])[1] <= 1:
            raise ValueError(f"random_crop.scale must be shares of the area in (0, 1], low first, got {s['scale']}")
        return _CropBack(_range(s["scale"]), _range(s["ratio"]))


class _PatchMask(v2.Transform):
    def __init__(self, grid: int, ratio: float, value: int):
        super().__init__()
        self.grid, self.ratio, self.value = grid, ratio, value

    def make_params(self, flat_inputs):
        n = self.grid * self.grid
        k = round(n * self.ratio)
        masked = torch.randperm(n)[:k].sort().values
        return {"masked_patches": masked.tolist()}

    def transform(self, inpt, params):
        out = inpt.clone()
        h, w = out.shape[-2:]
        ys = [round(i * h / self.grid) for i in range(self.grid + 1)]
        xs = [round(i * w / self.grid) for i in range(self.grid + 1)]
        for idx in params["masked_patches"]:
            r, c = divmod(idx, self.grid)
            out[..., ys[r]:ys[r + 1], xs[c]:xs[c + 1]] = self.value
        return out


@register
class PatchMask(Corruption):
    """Split the image into a grid and blank a random fraction of the cells, as masked-image modelling does."""

    name = "patch_mask"
    defaults = {"grid": 8, "ratio": 0.4, "value": 0}

    def build(self, **s):
        return _PatchMask(int(s["grid"]), float(s["ratio"]), int(s["value"]))


class _DiffusionNoise(v2.Transform):
    def __init__(self, step: int | list[int], num_steps: int, beta_start: float, beta_end: float):
        super().__init__()
        self.step = step
        betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        self.alpha_bar = torch.cumprod(1.0 - betas, dim=0)

    def make_params(self, flat_inputs):
        if isinstance(self.step, (list, tuple)):
            t = int(torch.randint(int(self.step[0]), int(self.step[1]) + 1, (1,)))
        else:
            t = int(self.step)
        return {"t": t, "alpha_bar": float(self.alpha_bar[t - 1])}

    def transform(self, inpt, params):
        x0 = inpt * 2.0 - 1.0  # DDPM works on [-1, 1]
        eps = torch.randn_like(x0)
        a = params["alpha_bar"]
        xt = math.sqrt(a) * x0 + math.sqrt(1.0 - a) * eps
        return ((xt + 1.0) / 2.0).clamp(0.0, 1.0)


@register
class DiffusionNoise(Corruption):
    """Forward diffusion q(x_t | x_0) with the DDPM linear schedule (1e-4 to 0.02 over 1000 steps)."""

    name = "diffusion_noise"
    defaults = {"step": 400, "num_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02}
    dtype = torch.float32

    def build(self, **s: Any):
        if not isinstance(s["step"], (list, tuple)) and not 1 <= int(s["step"]) <= int(s["num_steps"]):
            raise ValueError(f"diffusion_noise.step must lie in 1..{s['num_steps']}, got {s['step']}")
        return _DiffusionNoise(s["step"], int(s["num_steps"]), float(s["beta_start"]), float(s["beta_end"]))
