"""Unlabeled image sources and safe image loading.

A source lists `ImageRef`s (a stable id plus where the pixels live) without decoding anything, so every
process of a sharded run sees the same ordered list. `load_image` decodes one image and raises
`ImageRejected` with a short reason for anything unusable; the caller records it and moves on.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageOps

from stic.config import option
from stic.errors import SticError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

# Photographs from scikit-image's bundled data (public-domain or CC0), used by the offline default recipe.
SAMPLE_PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                 "hubble_deep_field.jpg", "camera.png", "coins.png"]


@dataclasses.dataclass
class ImageSourceConfig:
    """Where the unlabeled images come from.

    type: folder (recursive) | manifest (JSONL or CSV with a `path` field, optional `id`) |
          hf_dataset (a local dataset: save_to_disk folder, or parquet/arrow/imagefolder files) |
          coco (a COCO annotation JSON; only its `images` list is read) | sample_photos (bundled photos)
    """

    type: Literal["folder", "manifest", "hf_dataset", "coco", "sample_photos"] = option(
        "sample_photos", help="folder (recursive), manifest (JSONL/CSV with path, optional id), hf_dataset (local), "
                              "coco (annotation JSON) or sample_photos (bundled photos)")
    path: str | None = option(None, help="the folder, manifest, dataset or COCO file")
    image_root: str | None = option(
        None, help="folder that a manifest's or COCO file's relative paths are resolved against (default: the "
                   "file's folder)")
    image_column: str = option("image", help="hf_dataset: the image column")
    id_column: str | None = option(None, help="hf_dataset: the id column; default <split>/<row>")
    split: str = option("train", help="hf_dataset: the split")
    limit: int | None = option(None, help="keep the first N images of the sorted list")
    max_pixels: int = option(2048 * 2048, help="larger images are downscaled to this many pixels")
    max_decode_pixels: int = option(16384 * 16384, help="larger files are refused as decompression bombs")
    allow_outside_image_root: bool = option(
        False, help="manifest/coco: read paths that lead outside the image root (absolute or ../); false refuses them")

    def __post_init__(self):
        if self.type != "sample_photos" and not self.path:
            raise ValueError(f"images.path is required for images.type={self.type}")
        if self.limit is not None and self.limit < 1:
            raise ValueError("images.limit must be at least 1")


@dataclasses.dataclass(frozen=True)
class ImageRef:
    id: str
    path: str | None = None  # a file on disk
    row: int | None = None  # a row of an hf_dataset source


class ImageRejected(SticError):
    """The image cannot be used; str(err) is the reason."""


class ImageSourceError(SticError, ValueError):
    """The source itself is unusable (missing folder, malformed manifest, missing column)."""


# ---------------------------------------------------------------------------------------------------------
# Listing


def sample_photos_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def _resolve(root: Path, p: str) -> str:
    path = Path(p)
    return str(path if path.is_absolute() else root / path)


def escapes(root: str | Path, rel: str) -> bool:
    """Whether path `rel` (relative to `root`, or absolute) leads outside folder `root`. Lexical (`..` and absolute
    paths), not through symlinks: a folder laid out with links to its images stays usable."""
    base = os.path.normpath(os.path.abspath(root))
    path = os.path.normpath(os.path.join(base, rel))
    return path != base and not path.startswith(base.rstrip(os.sep) + os.sep)


def _confined(cfg: ImageSourceConfig, root: Path, p: str, where: str) -> str:
    if not cfg.allow_outside_image_root and escapes(root, p):
        raise ImageSourceError(f"{where}: path {p!r} lies outside the image root {root}; set "
                               "selfgen.images.allow_outside_image_root: true to read it")
    return _resolve(root, p)


def _list_manifest(cfg: ImageSourceConfig) -> list[ImageRef]:
    path = Path(cfg.path)
    root = Path(cfg.image_root) if cfg.image_root else path.parent
    refs = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise ImageSourceError(f"manifest {path}: the CSV needs a header with a 'path' column")
            records = [(i + 2, rec) for i, rec in enumerate(reader)]  # line numbers after the header
    else:
        records = []
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ImageSourceError(f"manifest {path} line {i}: not valid JSON ({err.msg})") from None
            records.append((i, rec))
    for line_no, rec in records:
        if not isinstance(rec, dict) or not isinstance(rec.get("path"), str) or not rec["path"]:
            raise ImageSourceError(f"manifest {path} line {line_no}: a record needs a non-empty 'path' string")
        refs.append(ImageRef(id=str(rec.get("id") or rec["path"]),
                             path=_confined(cfg, root, rec["path"], f"manifest {path} line {line_no}")))
    return refs


def _list_coco(cfg: ImageSourceConfig) -> list[ImageRef]:
    path = Path(cfg.path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ImageSourceError(f"COCO file {path}: not valid JSON ({err.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ImageSourceError(f"COCO file {path}: expected an object with an 'images' list")
    root = Path(cfg.image_root) if cfg.image_root else path.parent
    refs = []
    for i, rec in enumerate(data["images"]):
        if not isinstance(rec, dict) or not isinstance(rec.get("file_name"), str):
            raise ImageSourceError(f"COCO file {path}: images[{i}] has no 'file_name'")
        refs.append(ImageRef(id=rec["file_name"], path=_confined(cfg, root, rec["file_name"],
                                                                 f"COCO file {path} images[{i}]")))
    return refs


def open_hf_dataset(cfg: ImageSourceConfig):
    """A local dataset with its image column left undecoded, so bad images can be rejected one by one."""
    import datasets

    path = Path(cfg.path)
    if not path.exists():
        raise ImageSourceError(f"images.path {path} does not exist")
    if (path / "dataset_info.json").exists() or (path / "state.json").exists():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[cfg.split]
    else:
        ds = datasets.load_dataset(str(path), split=cfg.split)
    if cfg.image_column not in ds.column_names:
        raise ImageSourceError(
            f"dataset {path} has no column {cfg.image_column!r} (columns: {', '.join(ds.column_names)}); "
            "set images.image_column"
        )
    if cfg.id_column and cfg.id_column not in ds.column_names:
        raise ImageSourceError(f"dataset {path} has no id column {cfg.id_column!r}")
    if isinstance(ds.features[cfg.image_column], datasets.Image):
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
    return ds


def list_images(cfg: ImageSourceConfig) -> list[ImageRef]:
    """All images of the source, sorted by id, ids unique. Nothing is decoded."""
    if cfg.type != "sample_photos" and not Path(cfg.path).exists():
        raise ImageSourceError(f"images.path {cfg.path} does not exist")
    if cfg.type == "sample_photos":
        root = sample_photos_dir()
        refs = [ImageRef(id=name, path=str(root / name)) for name in SAMPLE_PHOTOS]
    elif cfg.type == "folder":
        root = Path(cfg.path)
        if not root.is_dir():
            raise ImageSourceError(f"images.path {root} is not a folder")
        refs = [
            ImageRef(id=p.relative_to(root).as_posix(), path=str(p))
            for p in root.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        ]
    elif cfg.type == "manifest":
        refs = _list_manifest(cfg)
    elif cfg.type == "coco":
        refs = _list_coco(cfg)
    else:
        ds = open_hf_dataset(cfg)
        ids = ds[cfg.id_column] if cfg.id_column else [f"{cfg.split}/{i}" for i in range(len(ds))]
        refs = [ImageRef(id=str(image_id), row=i) for i, image_id in enumerate(ids)]
    seen: dict[str, ImageRef] = {}
    for ref in refs:
        if ref.id in seen:
            raise ImageSourceError(f"image id {ref.id!r} appears twice in the source; ids must be unique")
        seen[ref.id] = ref
    refs = sorted(refs, key=lambda r: r.id)
    if not refs:
        raise ImageSourceError(f"no images found in {cfg.type} source {cfg.path or ''}".rstrip())
    return refs[: cfg.limit] if cfg.limit else refs


# ---------------------------------------------------------------------------------------------------------
# Loading


def decode_image(data: bytes | str | Path, max_pixels: int, max_decode_pixels: int) -> Image.Image:
    """Decode file bytes or a path into an upright RGB image of at most `max_pixels` pixels."""
    source = io.BytesIO(data) if isinstance(data, bytes) else str(data)
    if isinstance(data, bytes) and not data:
        raise ImageRejected("empty file (0 bytes)")
    if not isinstance(data, bytes) and Path(data).stat().st_size == 0:
        raise ImageRejected("empty file (0 bytes)")
    old_limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = max_decode_pixels
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                img.load()  # decode now: truncated data fails here, not later inside the model
                img = ImageOps.exif_transpose(img)
                if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                    rgba = img.convert("RGBA")  # flatten transparency onto white rather than black
                    img = Image.new("RGB", rgba.size, (255, 255, 255))
                    img.paste(rgba, mask=rgba.getchannel("A"))
                else:
                    img = img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageRejected(f"decompression bomb: {err}") from None
    except Image.UnidentifiedImageError:
        raise ImageRejected("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL reports truncated or corrupt data as OSError
        raise ImageRejected(f"unreadable image: {err}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit
    w, h = img.size
    if w * h > max_pixels:
        scale = (max_pixels / (w * h)) ** 0.5
        img = img.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.Resampling.BICUBIC)
    return img


class ImageLoader:
    """Loads the pixels of `ImageRef`s from one source."""

    def __init__(self, cfg: ImageSourceConfig):
        self.cfg = cfg
        self._dataset = open_hf_dataset(cfg) if cfg.type == "hf_dataset" else None

    def __call__(self, ref: ImageRef) -> Image.Image:
        cfg = self.cfg
        if self._dataset is not None:
            cell: Any = self._dataset[ref.row][cfg.image_column]
            if isinstance(cell, Image.Image):
                data: Any = cell
            elif isinstance(cell, dict) and (cell.get("bytes") or cell.get("path")):
                data = cell.get("bytes") or cell["path"]
            else:
                raise ImageRejected(f"no image in column {cfg.image_column!r}")
            if isinstance(data, Image.Image):
                buf = io.BytesIO()
                data.save(buf, format="PNG")
                data = buf.getvalue()
            return decode_image(data, cfg.max_pixels, cfg.max_decode_pixels)
        if not Path(ref.path).is_file():
            raise ImageRejected(f"file not found: {ref.path}")
        return decode_image(ref.path, cfg.max_pixels, cfg.max_decode_pixels)
