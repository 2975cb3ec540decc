"""The image-folder source (`data.source: folder`): train/<class>/*, test/<class>/* images, from a
directory, an archive or an S3 prefix, with the folder names flowing into the export and the service."""

import io
import json
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from helpers import REAL_SMALL, small_overrides, wait_until
from job import cifar10, sources
from job.config import load_config
from job.errors import ConfigError, DataError
from job.image_folder import load_image_folder

# Folder names whose sorted order is the reverse of CIFAR-10's label order, with spaces.
REVERSED = [f"{9 - i} {name}" for i, name in enumerate(sources.CLASS_NAMES)]


def encoded(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The real fixture's ((x_train, y_train), (x_test, y_test))."""
    return cifar10.load_cifar10(str(REAL_SMALL), tmp_path_factory.mktemp("cache"))


def write_tree(root, splits, names=REVERSED, fmt="PNG"):
    """Each image as <root>/<split>/<names[label]>/<its index, 4 digits>.<fmt>."""
    for split, (x, y) in zip(("train", "test"), splits, strict=True):
        for i, (pixels, label) in enumerate(zip(x, y, strict=True)):
            folder = root / split / names[label]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:04d}.{fmt.lower()}").write_bytes(encoded(pixels, fmt))
    return root


def expected_order(y, names=REVERSED):
    """Where each image lands: sorted by class folder, then by file name."""
    return sorted(range(len(y)), key=lambda i: (names[y[i]], i))


def assert_same(got, expected):
    for (x, y), (x_expected, y_expected) in zip(got, expected, strict=True):
        np.testing.assert_array_equal(x, x_expected)
        np.testing.assert_array_equal(y, y_expected)
        assert x.dtype == np.uint8 and y.dtype == np.int32


def test_real_images_as_pngs_load_pixel_exact_with_classes_in_sorted_folder_order(tmp_path, real):
    root = write_tree(tmp_path / "pets", real)
    # Not images of the data set: a notebook's checkpoint folder, macOS's twin of a file, a note.
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "train" / ".ipynb_checkpoints" / "0000.png").write_bytes(encoded(real[0][0][0]))
    (root / "train" / REVERSED[0] / "._0000.png").write_bytes(b"AppleDouble")
    (root / "test" / REVERSED[3] / "notes.txt").write_text("not an image")

    train, test, names = load_image_folder(root)
    assert names == tuple(sorted(REVERSED)) == ("0 truck", "1 ship", "2 horse", "3 frog", "4 dog", "5 deer",
                                                 "6 cat", "7 bird", "8 automobile", "9 airplane")
    expected = [(x[expected_order(y)], 9 - y[expected_order(y)]) for x, y in real]
    assert_same((train, test), expected)


def test_the_splits_carry_the_folder_names_and_a_stable_checksum(tmp_path, real):
    root = write_tree(tmp_path / "pets", real)
    cfg = load_config(None, ["data.source=folder", f"data.uri={root}", "data.validation_size=30"])
    first, second = sources.load(cfg), sources.load(cfg)
    assert first.class_names == tuple(sorted(REVERSED))
    assert first.checksum == second.checksum
    assert len(first.x_train) == 270 and len(first.x_val) == 30 and len(first.x_test) == 200
    renamed = write_tree(tmp_path / "renamed", real, names=[f"class {i}" for i in range(10)])
    assert sources.load(load_config(None, ["data.source=folder", f"data.uri={renamed}"])).checksum != first.checksum


def test_archives_load_like_the_directory(tmp_path, real):
    root = write_tree(tmp_path / "pets", real)
    expected = load_image_folder(root)
    with tarfile.open(tmp_path / "pets.tar.gz", "w:gz") as tar:
        tar.add(root, arcname="pets")  # what `tar czf pets.tar.gz pets` makes: one folder around it all
    with zipfile.ZipFile(tmp_path / "pets.zip", "w") as z:
        for path in sorted(root.rglob("*.png")):
            z.write(path, path.relative_to(root).as_posix())
    for archive in ("pets.tar.gz", "pets.zip"):
        train, test, names = load_image_folder(tmp_path / archive)
        assert names == expected[2]
        assert_same((train, test), expected[:2])


@pytest.mark.slow
def test_an_s3_prefix_loads_like_the_directory_and_fetches_only_images(s3, tmp_path, real):
    import boto3

    root = write_tree(tmp_path / "pets", real)
    (root / "README.md").write_text("about these images")
    client = boto3.client("s3")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        client.upload_file(str(path), s3, "pets/" + path.relative_to(root).as_posix())
    cache = tmp_path / "cache"
    overrides = ["data.source=folder", "data.validation_size=30", f"data.cache_dir={cache}"]
    remote = sources.load(load_config(None, [*overrides, f"data.uri=s3://{s3}/pets/"]))
    local = sources.load(load_config(None, [*overrides, f"data.uri={root}"]))
    assert remote.checksum == local.checksum and remote.class_names == local.class_names
    np.testing.assert_array_equal(remote.x_train, local.x_train)
    assert not list(cache.rglob("README.md"))


def test_images_of_any_size_and_mode_are_resized_as_the_service_resizes_uploads(tmp_path):
    rng = np.random.default_rng(5)
    photos = {
        "wide.png": Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)),
        "large.jpg": Image.fromarray(rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)),
        "alpha.png": Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8), "RGBA"),
        "grey.jpeg": Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), "L"),
        "CAPS.JPG": Image.fromarray(rng.integers(0, 256, (33, 31, 3), dtype=np.uint8)),
    }
    for split in ("train", "test"):
        for c in range(10):
            folder = tmp_path / split / f"class {c}"
            folder.mkdir(parents=True)
            for name, image in photos.items():
                image.save(folder / name)
    (x_train, _), _, _ = load_image_folder(tmp_path)
    # The README's rule: to RGB, then Pillow's bilinear resize to 32x32 (antialiased when shrinking),
    # exactly what common/images.py does to a photo sent to /predict.
    for i, name in enumerate(sorted(photos)):
        with Image.open(tmp_path / "train" / "class 0" / name) as image:
            expected = image.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR, reducing_gap=None)
        np.testing.assert_array_equal(x_train[i], np.asarray(expected))


@pytest.mark.parametrize("damage, words", [
    (lambda data: b"not an image at all", "not a PNG or JPEG"),
    (lambda data: data[: len(data) // 2], "cannot decode the image"),
    (lambda data: b"GIF89a" + data, "PNG or JPEG"),
])
def test_a_corrupt_image_is_a_data_error_naming_the_file(tmp_path, real, damage, words):
    root = write_tree(tmp_path / "pets", real)
    victim = sorted((root / "test" / REVERSED[4]).iterdir())[2]
    victim.write_bytes(damage(victim.read_bytes()))
    with pytest.raises(DataError, match=words) as info:
        load_image_folder(root)
    assert str(victim) in str(info.value) and info.value.exit_code == 3


@pytest.mark.slow
def test_the_job_exits_3_naming_a_corrupt_image(tmp_path, real):
    root = write_tree(tmp_path / "pets", real)
    victim = root / "train" / REVERSED[2] / "0007.png"
    victim.write_bytes(b"\x89PNG but nothing after")
    done = subprocess.run([sys.executable, "-m", "job", "train", "--set", "data.source=folder",
                           "--set", f"data.uri={root}"], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 3, done.stderr
    assert str(victim) in done.stderr and "Traceback" not in done.stderr


def test_exactly_ten_classes_are_needed(tmp_path, real):
    names = [f"c{i}" for i in range(10)]
    nine = write_tree(tmp_path / "nine", real, names=names[:8] + ["c8", "c8"])
    with pytest.raises(DataError, match=r"found 9 class folders \(c0, .*, c8\); the model has 10 outputs, "
                                        r"so exactly 10 are needed"):
        load_image_folder(nine)
    eleven = write_tree(tmp_path / "eleven", real, names=names)
    for split in ("train", "test"):
        (eleven / split / "c10").mkdir()
        (eleven / split / "c10" / "x.png").write_bytes(encoded(real[0][0][0]))
    with pytest.raises(DataError, match="found 11 class folders"):
        load_image_folder(eleven)


def test_train_and_test_must_have_the_same_classes(tmp_path, real):
    root = write_tree(tmp_path / "pets", real)
    (root / "test" / "6 cat").rename(root / "test" / "6 kat")
    with pytest.raises(DataError, match="same class folders; only in train/: 6 cat; only in test/: 6 kat"):
        load_image_folder(root)


def test_missing_data_is_named(tmp_path, real):
    with pytest.raises(DataError, match="nowhere does not exist"):
        load_image_folder(tmp_path / "nowhere")
    root = write_tree(tmp_path / "pets", real)
    for path in (root / "test").rglob("*.png"):
        path.unlink()
    with pytest.raises(DataError, match=rf"no test/<class>/\*\.png\|jpg\|jpeg images found in {root}"):
        load_image_folder(root)
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 but not really")
    with pytest.raises(DataError, match="bad.zip is not a readable"):
        load_image_folder(tmp_path / "bad.zip")
    with pytest.raises(DataError, match="https://example.com/pets"):
        load_image_folder("https://example.com/pets")
    with pytest.raises(ConfigError, match="data.uri"):
        sources.load(load_config(None, ["data.source=folder"]))


# --- end to end: folder names into the export and the service -------------------------------

SHAPES = {"square": (slice(8, 40), slice(8, 40)), "bar": (slice(0, 48), slice(20, 28))}
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
           "white": (240, 240, 240)}


def shapes_tree(root, per_class):
    """Ten classes named like "red square": a coloured shape on noise, 48x48, so the resize matters."""
    rng = np.random.default_rng(7)
    for split, n in (("train", per_class), ("test", 3)):
        for colour, rgb in COLOURS.items():
            for shape, where in SHAPES.items():
                folder = root / split / f"{colour} {shape}"
                folder.mkdir(parents=True)
                for i in range(n):
                    pixels = rng.integers(0, 90, (48, 48, 3), dtype=np.uint8)
                    pixels[where] = rgb
                    (folder / f"{i}.png").write_bytes(encoded(pixels))
    return root


@pytest.mark.slow
def test_folder_names_label_the_export_and_the_service_answers(tmp_path, run_job, make_app):
    import tensorflow as tf

    from serve.settings import Settings

    root = shapes_tree(tmp_path / "shapes", per_class=12)
    names = sorted(f"{c} {s}" for c in COLOURS for s in SHAPES)
    result, _ = run_job(small_overrides(tmp_path, **{
        "data.source": "folder", "data.uri": str(root), "data.validation_size": 20, "train.epochs": 1}))

    version = tmp_path / "export" / "cifar10" / str(result.version)
    assert (version / "assets" / "labels.txt").read_text(encoding="utf-8").splitlines() == names
    assert json.loads((version / "assets.extra" / "model_card.json").read_text())["class_names"] == names

    app = make_app(Settings(model_uri=str(version.parent), poll_seconds=0.2))
    client = app.test_client()
    wait_until(lambda: client.get("/readyz").status_code == 200)
    photo = root / "train" / names[0] / "0.png"
    answer = client.post("/predict", data=photo.read_bytes(), content_type="image/png").json
    assert [(p["label"], p["class_id"]) for p in answer["predictions"]] == [
        (names[p["class_id"]], p["class_id"]) for p in answer["predictions"]]
    assert {p["label"] for p in answer["predictions"]} <= set(names)
    # The service sees the 48x48 photo as the job saw it when training: the same 32x32 pixels.
    (x_train, _), _, _ = load_image_folder(root)  # sorted: the first file is names[0]/0.png
    own = tf.saved_model.load(str(version)).signatures["serving_default"](images=tf.constant(x_train[:1]))
    top = answer["predictions"][0]
    assert top["class_id"] == int(np.argmax(own["probabilities"][0]))
    assert top["probability"] == pytest.approx(float(np.max(own["probabilities"][0])), abs=1e-6)
    rest = client.post("/v1/models/cifar10:predict", json={"instances": [x_train[0].tolist()]}).json
    assert rest["predictions"][0]["label"] == top["label"]
