"""The export layout: the one contract between the training job, which
writes model versions, and the service (and TF Serving), which read them.
Both images ship this module and neither imports the other's code; nothing
here imports TensorFlow or boto3.

    <export.uri>/<model_name>/               the model base
        <version>/                           1, 2, ...: a SavedModel TF Serving loads as it is
            saved_model.pb, variables/
            assets/labels.txt                class i's name on line i
            assets.extra/model_card.json     the run that made it: test_accuracy, data checksum, ...
            assets.extra/probe_images.npy    a batch, and what the trained model answered for it
            assets.extra/probe_outputs.npz
            assets.extra/tf_serving_warmup_requests
            _COMPLETE                        on object stores: {relative path: SHA-256}, written last

A local version appears by one rename, so a directory holding saved_model.pb
is complete. On an object store a version counts once its `_COMPLETE`
marker exists; the marker is a manifest, so a reader fetches exactly the
files it lists and checks each one, and an object replaced or damaged after
publishing is refused rather than served. The job publishes its checkpoints
the same way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

MARKER = "_COMPLETE"

# The serving signature: uint8 images in, three named outputs.
SIGNATURE, INPUT = "serving_default", "images"
PROBABILITIES, CLASS_ID, LABEL = "probabilities", "class_id", "label"
# The second signature: encoded PNG/JPEG bytes, decoded and resized by the model itself.
BYTES_SIGNATURE, BYTES_INPUT = "predict_image_bytes", "image_bytes"

LABELS = "assets/labels.txt"
CARD = "assets.extra/model_card.json"
PROBE_IMAGES = "assets.extra/probe_images.npy"
PROBE_OUTPUTS = "assets.extra/probe_outputs.npz"
WARMUP = "assets.extra/tf_serving_warmup_requests"

# A card is a few KB (the run's config, metrics and lineage); a file far larger is no card the job wrote.
CARD_LIMIT = 1 << 20

# CIFAR-10's classes in the dataset's label order: the labels of a version
# exported before labels.txt existed, and of every model trained on CIFAR-10.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class LayoutError(Exception):
    """A published directory whose files disagree with its manifest, or no manifest at all."""


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def manifest(directory: Path) -> bytes:
    """The `_COMPLETE` marker for the files under `directory`."""
    files = sorted(p for p in Path(directory).rglob("*") if p.is_file())
    return json.dumps({p.relative_to(directory).as_posix(): sha256(p) for p in files}, indent=1).encode()


def read_manifest(body: bytes, where: str) -> dict[str, str]:
    """{relative path: SHA-256} from a marker, or LayoutError naming what is wrong with it."""
    try:
        files = json.loads(body)
        if not isinstance(files, dict) or not all(isinstance(d, str) for d in files.values()):
            raise ValueError
    except ValueError:
        raise LayoutError(f"{where}/{MARKER} is not a manifest of {{file: SHA-256}}") from None
    for rel in files:
        if {"", ".", ".."} & set(rel.split("/")):
            # A path like "../x" would write outside the download folder.
            raise LayoutError(f"{where}/{MARKER} lists {rel!r}, which is not a file inside the directory")
    return files


def check_file(path: Path, digest: str, where: str) -> None:
    """LayoutError unless the downloaded `path` is the file the manifest recorded."""
    if sha256(path) != digest:
        raise LayoutError(f"{where} is corrupt: its SHA-256 differs from the one its {MARKER} "
                          f"manifest recorded when it was published")


def fetch(marker: bytes, where: str, into: Path, download: Callable[[str, Path], None]) -> None:
    """Fetch exactly the files `marker` lists into `into`, each by `download(relative path,
    target)`, and check each against its SHA-256: LayoutError at the first that differs."""
    for rel, digest in read_manifest(marker, where).items():
        target = Path(into) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        download(rel, target)
        check_file(target, digest, f"{where}/{rel}")


def published(keys: Iterable[str]) -> list[str]:
    """The complete directories among object keys relative to a prefix: those with a marker."""
    return sorted(key.split("/")[0] for key in keys if key.count("/") == 1 and key.endswith("/" + MARKER))


def local_versions(base: Path) -> list[int]:
    """Complete version numbers in a local model base, ascending. A version this
    process may not look into counts: loading it then fails and says why,
    instead of the whole listing failing (Python raises PermissionError there)."""
    if not Path(base).is_dir():
        return []
    return sorted(int(p.name) for p in Path(base).iterdir() if p.name.isdigit() and _complete(p))


def _complete(version_dir: Path) -> bool:
    try:
        return (version_dir / "saved_model.pb").is_file()
    except PermissionError:
        return True


def write_labels(path: Path, class_names: Iterable[str]) -> None:
    # One name per line: a class folder's name may hold spaces.
    Path(path).write_text("".join(name + "\n" for name in class_names), encoding="utf-8")


def labels(version_dir: Path) -> tuple[str, ...]:
    """A version's class names, as the job wrote them."""
    path = Path(version_dir) / LABELS
    return tuple(path.read_text(encoding="utf-8").splitlines()) if path.is_file() else CIFAR10_CLASSES


def parse_card(body: bytes) -> dict | None:
    """A model card's JSON object; None for anything else, or for more than CARD_LIMIT bytes."""
    if len(body) > CARD_LIMIT:
        return None
    try:
        card = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: JSON nested past the parser's depth
        return None
    return card if isinstance(card, dict) else None


def read_card(version_dir: Path) -> dict | None:
    """A local version's model card; None when it has none (or not one parse_card takes)."""
    try:
        with open(Path(version_dir) / CARD, "rb") as f:
            return parse_card(f.read(CARD_LIMIT + 1))
    except OSError:
        return None
