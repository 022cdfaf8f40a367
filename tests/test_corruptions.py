import json

import numpy as np
import pytest

from corruptions import REGISTRY, CorruptionError, corrupt, make_corruption
from tests.conftest import photo

REQUIRED = {"color_jitter", "lower_resolution", "gaussian_blur", "gaussian_noise", "jpeg", "occlusion",
            "patch_mask", "diffusion_noise"}


def test_registry_has_the_required_kinds():
    assert REQUIRED <= set(REGISTRY)


@pytest.mark.parametrize("kind", sorted(REGISTRY))
def test_each_corruption_is_seeded_deterministic_and_changes_pixels(kind):
    image = photo(0, size=(96, 80))
    a, rec_a = corrupt(image, kind, seed=11)
    b, rec_b = corrupt(image, kind, seed=11)
    assert a.size == image.size and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b)), "same seed must give the same pixels"
    assert rec_a == rec_b
    changed = np.mean(np.asarray(a) != np.asarray(image))
    assert changed > 0.02, f"{kind} changed only {changed:.3%} of the pixel values"
    # the record is JSON and names the kind, seed and settings
    rec = json.loads(json.dumps(rec_a))
    assert rec["kind"] == kind and rec["seed"] == 11 and isinstance(rec["settings"], dict)


@pytest.mark.parametrize("kind", ["color_jitter", "gaussian_noise", "jpeg", "occlusion", "patch_mask",
                                  "diffusion_noise", "gaussian_blur", "random_crop"])
def test_random_kinds_vary_with_the_seed(kind):
    image = photo(1, size=(96, 80))
    outs = [np.asarray(corrupt(image, kind, seed=s)[0]) for s in range(4)]
    assert any(not np.array_equal(outs[0], o) for o in outs[1:])


def test_record_reproduces_the_image():
    image = photo(2)
    out, rec = corrupt(image, "color_jitter", seed=5, hue=0.1)
    again, _ = corrupt(image, rec["kind"], seed=rec["seed"], **rec["settings"])
    assert np.array_equal(np.asarray(out), np.asarray(again))
    assert rec["settings"]["hue"] == 0.1 and rec["settings"]["brightness"] == 0.5  # paper default kept
    assert "brightness_factor" in rec["sampled"]


def test_seeding_does_not_touch_the_global_torch_stream():
    import torch

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    corrupt(photo(3), "gaussian_noise", seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_lower_resolution_keeps_size_and_loses_detail():
    image = photo(4, size=(160, 120))
    out, rec = corrupt(image, "lower_resolution", seed=0)
    assert out.size == image.size
    assert min(rec["sampled"]["low_size"]) == 20
    # high-frequency energy (pixel-to-pixel differences) drops sharply
    diff = lambda a: np.abs(np.diff(np.asarray(a, dtype=float), axis=1)).mean()
    assert diff(out) < diff(image)


def test_random_crop_keeps_one_to_twenty_percent_of_the_image_at_full_size():
    image = photo(6, size=(160, 120))
    for seed in range(6):
        out, rec = corrupt(image, "random_crop", seed=seed)
        box = rec["sampled"]
        assert out.size == image.size
        assert 0.009 <= box["height"] * box["width"] / (160 * 120) <= 0.21  # mDPO's 1-20%, up to rounding
        crop = image.crop((box["left"], box["top"], box["left"] + box["width"], box["top"] + box["height"]))
        scaled = np.asarray(crop.resize(image.size), dtype=float)
        assert np.abs(np.asarray(out, dtype=float) - scaled).mean() < 3  # that box, scaled back up
    with pytest.raises(ValueError, match="scale"):
        make_corruption("random_crop", scale=[0.5, 1.5])


def test_diffusion_noise_grows_with_the_step():
    image = photo(5)
    err = [np.abs(np.asarray(corrupt(image, "diffusion_noise", seed=0, step=t)[0], dtype=float)
                  - np.asarray(image, dtype=float)).mean() for t in (50, 300, 900)]
    assert err[0] < err[1] < err[2]
    with pytest.raises(ValueError, match="step"):
        make_corruption("diffusion_noise", step=5000)


def test_unknown_kind_and_setting_are_refused():
    with pytest.raises(CorruptionError, match="unknown corruption"):
        make_corruption("sepia")
    with pytest.raises(CorruptionError, match="no setting brightnes"):
        make_corruption("color_jitter", brightnes=0.3)
