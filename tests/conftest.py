import json
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


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory):
    """Small files of every paper benchmark in its published layout (tests/bench_files.py)."""
    from tests.bench_files import make_eval_root

    return make_eval_root(tmp_path_factory.mktemp("eval_data"))


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


def selfgen_run(recipe_dict: dict, overwrite: bool = False) -> dict:
    """Parse a recipe dict and run selfgen in this process; returns the manifest."""
    from stic.selfgen import parse_recipe, run_selfgen

    return run_selfgen(parse_recipe(recipe_dict), overwrite=overwrite)


def selfgen_rows(out):
    """The pairs in a selfgen output folder, read as training reads them."""
    import datasets

    return datasets.load_dataset("parquet", data_dir=str(out), split="train")


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


def free_port() -> int:
    """A free loopback port (for the rendezvous of an `accelerate launch` with two processes)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def conv(*turns):
    """A LLaVA-format conversation: human and gpt turns alternate."""
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]


def tiny_llava():
    """The tiny LLaVA in float32 and its processor."""
    from stic.config import ModelSpec
    from stic.models import load_model, load_processor

    cfg = ModelSpec(name_or_path="tiny:llava", dtype="float32")
    return load_model(cfg), load_processor(cfg)


def spy_on_generate(model, keep) -> list:
    """Record keep(kwargs) of every model.generate call, then generate as usual; returns the list of records."""
    calls = []
    real = model.generate

    def spy(**kwargs):
        calls.append(keep(kwargs))
        return real(**kwargs)

    model.generate = spy
    return calls


def make_adapter(out: Path, family="llava", scale: float = 0.02) -> Path:
    """A stage-1 LoRA adapter with non-zero weights, without running stage 1."""
    import torch
    from peft import get_peft_model

    from stic.config import ModelSpec
    from stic.models import LoraOptions, load_model, lora_config

    model = load_model(ModelSpec(name_or_path=f"tiny:{family}", dtype="float32"))
    peft_model = get_peft_model(model, lora_config(LoraOptions(lora_r=4, lora_alpha=8), model))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, scale)
    peft_model.save_pretrained(out)
    return out


class Stub:
    """A loopback OpenAI-compatible endpoint. mode: an HTTP status ("401", "503", ...) answered with an error,
    "close" (drops the connection), or "proxy:N" (forwards its first N requests to `target`, then drops every
    connection: an endpoint that dies mid-run)."""

    def __init__(self, mode: str, target: str | None = None):
        import socket
        import threading
        import urllib.request
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.mode, self.target, self.hits, self.lock = mode, target, 0, threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with stub.lock:
                    stub.hits += 1
                    n = stub.hits
                mode = stub.mode
                if mode.startswith("proxy:"):
                    if n > int(mode.split(":")[1]):
                        mode = "close"
                    else:
                        req = urllib.request.Request(stub.target + self.path.removeprefix("/v1"), data=body,
                                                     headers={"Content-Type": "application/json"})
                        with urllib.request.urlopen(req, timeout=60) as r:
                            return send_json(self, 200, r.read())
                if mode == "close":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                send_json(self, int(mode), json.dumps({"error": {"message": f"stub {mode}"}}).encode())

            def log_message(self, *a):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.http.server_port}/v1"

    def close(self):
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def stubs():
    """stubs(mode, target=None) starts a Stub; all are stopped after the test."""
    made = []

    def make(mode, target=None):
        made.append(Stub(mode, target))
        return made[-1]

    yield make
    for s in made:
        s.close()


def stored_like_the_hub(root: Path, family: str = "llava", dtype: str = "bfloat16", seed: int = 0) -> Path:
    """A tiny model folder as hub checkpoints are (stic.tiny.hub_shaped_model), under `root`."""
    from stic.tiny import hub_shaped_model

    return hub_shaped_model(family, dtype, root / f"{family}-{dtype}", seed)


def stage1_sized_adapter(base_dir: Path, out: Path, delta_rms: float = 1e-5, seed: int = 0) -> Path:
    """A LoRA adapter on `base_dir` whose weight deltas have rms `delta_rms`: what stage 1 at lr 1e-7 leaves."""
    import torch
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    from stic.config import ModelSpec
    from stic.models import LoraOptions, load_model, lora_config

    gen = torch.Generator().manual_seed(seed)
    base = load_model(ModelSpec(name_or_path=str(base_dir), dtype="float32"))
    peft_model = get_peft_model(base, lora_config(LoraOptions(lora_r=8, lora_alpha=16, lora_dropout=0.0), base))
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                module.lora_B["default"].weight.normal_(0, 1, generator=gen)
                delta = module.get_delta_weight("default")
                module.lora_B["default"].weight.mul_(delta_rms / delta.pow(2).mean().sqrt())
    peft_model.save_pretrained(out)
    return out
