import json

import numpy as np
import pytest
from PIL import Image

from stic.images import (
    ImageLoader,
    ImageRejected,
    ImageSourceConfig,
    ImageSourceError,
    decode_image,
    list_images,
)
from tests.conftest import photo, write_bad_images


def test_folder_source_is_recursive_sorted_and_skips_other_files(photo_dir):
    (photo_dir / "readme.txt").write_text("x")
    refs = list_images(ImageSourceConfig(type="folder", path=str(photo_dir)))
    ids = [r.id for r in refs]
    assert ids == sorted(ids) and len(ids) == 6
    assert "sub/img4.jpg" in ids and "readme.txt" not in ids


def test_manifest_sources(photo_dir, tmp_path):
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps({"path": str(photo_dir / "img0.jpg"), "id": "a"}) + "\n\n"
                     + json.dumps({"path": "photos/img1.png"}) + "\n")
    refs = list_images(ImageSourceConfig(type="manifest", path=str(jsonl)))
    assert [r.id for r in refs] == ["a", "photos/img1.png"]
    loader = ImageLoader(ImageSourceConfig(type="manifest", path=str(jsonl)))
    assert loader(refs[1]).size == (80, 56)  # relative paths resolve against the manifest's folder

    csv = tmp_path / "m.csv"
    csv.write_text("path,id\nphotos/img2.jpg,x\nphotos/img3.png,y\n")
    assert [r.id for r in list_images(ImageSourceConfig(type="manifest", path=str(csv)))] == ["x", "y"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"path": "a.jpg"}) + "\n{oops\n")
    with pytest.raises(ImageSourceError, match="line 2"):
        list_images(ImageSourceConfig(type="manifest", path=str(bad)))
    nopath = tmp_path / "nopath.csv"
    nopath.write_text("file\na.jpg\n")
    with pytest.raises(ImageSourceError, match="'path' column"):
        list_images(ImageSourceConfig(type="manifest", path=str(nopath)))


def test_duplicate_ids_are_refused(tmp_path, photo_dir):
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join(json.dumps({"path": str(photo_dir / f), "id": "same"}) for f in ("img0.jpg", "img1.png")))
    with pytest.raises(ImageSourceError, match="twice"):
        list_images(ImageSourceConfig(type="manifest", path=str(m)))


def test_coco_source_reads_only_the_image_list(photo_dir, tmp_path):
    coco = tmp_path / "instances.json"
    coco.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "img0.jpg"}, {"id": 2, "file_name": "img1.png"}],
        "annotations": [{"image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1]}],
        "categories": [{"id": 3, "name": "car"}],
    }))
    cfg = ImageSourceConfig(type="coco", path=str(coco), image_root=str(photo_dir))
    refs = list_images(cfg)
    assert [r.id for r in refs] == ["img0.jpg", "img1.png"]
    assert ImageLoader(cfg)(refs[0]).mode == "RGB"


@pytest.mark.parametrize("layout", ["imagefolder", "parquet", "save_to_disk"])
def test_hf_dataset_source(photo_dir, tmp_path, layout):
    import datasets

    if layout == "imagefolder":
        path = photo_dir
    else:
        ds = datasets.Dataset.from_dict(
            {"picture": [str(p) for p in sorted(photo_dir.glob("*.*"))], "key": [f"k{i}" for i in range(4)]}
        ).cast_column("picture", datasets.Image())
        path = tmp_path / "ds"
        if layout == "parquet":
            path.mkdir()
            ds.to_parquet(str(path / "train-00000.parquet"))
        else:
            ds.save_to_disk(str(path))
    column = "image" if layout == "imagefolder" else "picture"
    cfg = ImageSourceConfig(type="hf_dataset", path=str(path), image_column=column,
                            id_column=None if layout == "imagefolder" else "key")
    refs = list_images(cfg)
    assert len(refs) == (6 if layout == "imagefolder" else 4)
    img = ImageLoader(cfg)(refs[0])
    assert img.mode == "RGB" and img.width > 50
    with pytest.raises(ImageSourceError, match="no column 'pixels'"):
        list_images(ImageSourceConfig(type="hf_dataset", path=str(path), image_column="pixels"))


def test_sample_photos_are_bundled_real_photographs():
    cfg = ImageSourceConfig()
    refs = list_images(cfg)
    assert len(refs) >= 5
    img = ImageLoader(cfg)(refs[0])
    assert img.mode == "RGB" and img.width * img.height > 100_000


def test_bad_images_are_rejected_with_reasons(tmp_path):
    expected = write_bad_images(tmp_path)
    for name, word in expected.items():
        with pytest.raises(ImageRejected) as err:
            decode_image(tmp_path / name, max_pixels=10**8, max_decode_pixels=1_000_000)
        assert word in str(err.value), (name, str(err.value))
    with pytest.raises(ImageRejected, match="file not found"):
        ImageLoader(ImageSourceConfig(type="folder", path=str(tmp_path)))(
            type("R", (), {"path": str(tmp_path / "gone.png"), "row": None})())


def test_exif_orientation_mode_and_pixel_bound(tmp_path):
    # a 40x20 image stored with EXIF orientation 6 (rotate 90) is 20x40 upright
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert decode_image(tmp_path / "rot.jpg", 10**8, 10**8).size == (20, 40)
    # transparency is flattened onto white, not black
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    assert decode_image(tmp_path / "clear.png", 10**8, 10**8).getpixel((0, 0)) == (255, 255, 255)
    # big images are scaled down to the pixel bound, keeping the aspect ratio
    photo(0, size=(400, 200)).save(tmp_path / "big.png")
    out = decode_image(tmp_path / "big.png", max_pixels=20_000, max_decode_pixels=10**8)
    assert out.width * out.height <= 20_000 and abs(out.width / out.height - 2) < 0.05
    gray = Image.fromarray(np.zeros((5, 5), np.uint8))
    gray.save(tmp_path / "gray.png")
    assert decode_image(tmp_path / "gray.png", 10**8, 10**8).mode == "RGB"
