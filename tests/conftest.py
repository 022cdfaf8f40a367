import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def stic_cache(tmp_path_factory):
    """Tiny models are built once per test session into a private cache (subprocesses inherit it)."""
    cache = os.environ.get("STIC_TEST_CACHE") or str(tmp_path_factory.mktemp("stic-cache"))
    os.environ["STIC_CACHE"] = cache
    return Path(cache)


def send_json(handler, code: int, data: bytes) -> None:
    """A JSON reply from a loopback stub server (BaseHTTPRequestHandler)."""
    handler.send_response(code)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def photo(seed: int, size=(72, 56)) -> Image.Image:
    """A small image with structure (gradients and a block), so corruptions visibly change it."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 255 // w), (y * 255 // h), np.full_like(x, rng.integers(0, 255))], -1).astype(np.uint8)
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    img[y0:y0 + h // 3, x0:x0 + w // 3] = rng.integers(0, 255, 3)
    return Image.fromarray(img)


@pytest.fixture
def photo_dir(tmp_path):
    """Six good images, two in a subfolder."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for i in range(6):
        target = root / ("sub" if i >= 4 else "") / f"img{i}.{'png' if i % 2 else 'jpg'}"
        photo(i, size=(72 + 8 * i, 56)).save(target)
    return root


def write_bad_images(root: Path) -> dict[str, str]:
    """Unreadable files of several kinds; returns {file name: a word its reject reason must contain}."""
    good = root / "ok_for_truncation.png"
    photo(99, size=(200, 150)).save(good)
    data = good.read_bytes()
    good.unlink()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.jpg").write_text("this is not an image")
    Image.new("L", (4000, 4000)).save(root / "bomb.png")  # bomb relative to the tiny limit the tests set
    return {"truncated.png": "unreadable", "empty.jpg": "empty", "notes.jpg": "not an image",
            "bomb.png": "decompression bomb"}


def selfgen_recipe(out_dir, images: dict, family="llava", **selfgen) -> dict:
    """A small, fast recipe dict for tests."""
    sg = {
        "output_dir": str(out_dir),
        "images": images,
        "chosen_sampling": {"max_new_tokens": 6},
        "rejected_sampling": {"max_new_tokens": 6, "do_sample": True},
        "batch_size": 4,
        "images_per_part": 2,
        "corruptions": ["color_jitter", "lower_resolution", "gaussian_blur"],
    }
    sg.update(selfgen)
    return {"model": {"name_or_path": f"tiny:{family}", "dtype": "float32"}, "selfgen": sg}


def die_on_call(monkeypatch, cls, name: str, n: int):
    """Make `cls.name` raise KeyboardInterrupt (a simulated kill) on its n-th call; returns the original."""
    real = getattr(cls, name)
    calls = {"n": 0}

    def dying(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt(f"simulated kill at call {n} of {name}")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, dying)
    return real
