"""Load a data set laid out as image folders: `train/<class>/*.png|jpg|jpeg`
and `test/<class>/*.png|jpg|jpeg`, in a directory or in a .tar.gz or .zip of
one (the layout of the common PNG and JPEG copies of CIFAR-10, and of a
person's own photos).

Class names are the folder names, sorted. Each image is decoded and resized
to 32x32 by common/images.py, the function the service applies to uploaded
photos, so a photo sent to `/predict` reaches the model the way the training
images did.
"""

from __future__ import annotations

import pathlib
import posixpath
import tarfile
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from common.images import BadInput, decode
from job.errors import DataError

SPLITS = ("train", "test")
EXTENSIONS = (".png", ".jpg", ".jpeg")
N_CLASSES = 10  # the model's outputs
# A CIFAR-10 image holds 3,072 bytes of pixels and a camera's JPEG a few MB;
# this bounds what one file may make the job read, however small its archive
# (a sparse tar member, a zip entry declaring gigabytes).
MAX_IMAGE_BYTES = 64 << 20

Arrays = tuple[np.ndarray, np.ndarray]


def is_image(relative: str) -> bool:
    """Whether a path relative to the data set's root is one of its images.

    Hidden names are not: macOS leaves `._photo.png` twins in archives, and
    Jupyter a `.ipynb_checkpoints` folder that is no class.
    """
    parts = relative.split("/")
    return (len(parts) == 3 and parts[0] in SPLITS and parts[2].lower().endswith(EXTENSIONS)
            and not any(p.startswith(".") for p in parts))


def load_image_folder(path: str | pathlib.Path, shown_as: str | None = None) -> tuple[Arrays, Arrays, tuple[str, ...]]:
    """Returns ((x_train, y_train), (x_test, y_test), class names); x uint8 [N,32,32,3], y int32 [N].

    `shown_as` names `path` in messages when it is a local copy of something else (an S3 prefix).
    """
    shown = shown_as or str(path)
    if "://" in str(path):
        raise DataError(f"cannot load image folders from {shown}: use a local path or an s3:// prefix")
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise DataError(f"image folder data not found: {shown} does not exist")
    images = _directory_images(path) if path.is_dir() else _archive_images(path, shown)
    by_split = {split: sorted(rel for rel in images if rel.startswith(split + "/")) for split in SPLITS}
    classes = {split: sorted({rel.split("/")[1] for rel in rels}) for split, rels in by_split.items()}
    for split, rels in by_split.items():
        if not rels:
            raise DataError(f"no {split}/<class>/*.png|jpg|jpeg images found in {shown}")
    if classes["train"] != classes["test"]:
        only = {s: sorted(set(classes[s]) - set(classes[o])) for s, o in (("train", "test"), ("test", "train"))}
        raise DataError(f"{shown}: train/ and test/ must hold the same class folders; only in train/: "
                        f"{', '.join(only['train']) or 'none'}; only in test/: {', '.join(only['test']) or 'none'}")
    names = classes["train"]
    if len(names) != N_CLASSES:
        raise DataError(f"{shown}: found {len(names)} class folders ({', '.join(names)}); the model has "
                        f"{N_CLASSES} outputs, so exactly {N_CLASSES} are needed")
    index = {name: i for i, name in enumerate(names)}

    def split_arrays(rels: list[str]) -> Arrays:
        # Pillow releases the GIL while it decodes and resizes; map keeps the sorted order.
        with ThreadPoolExecutor() as pool:
            x = np.stack(list(pool.map(lambda rel: _decode(images[rel], f"{shown.rstrip('/')}/{rel}"), rels)))
        return x, np.array([index[rel.split("/")[1]] for rel in rels], dtype=np.int32)

    return split_arrays(by_split["train"]), split_arrays(by_split["test"]), tuple(names)


def _directory_images(path: pathlib.Path) -> dict[str, bytes | pathlib.Path]:
    found = (p.relative_to(path).as_posix() for split in SPLITS for p in (path / split).glob("*/*"))
    return {rel: path / rel for rel in found if is_image(rel)}


def _archive_images(path: pathlib.Path, shown: str) -> dict[str, bytes | pathlib.Path]:
    """The images of an archive, by path from the data set's root: the archive's own root, or
    the one folder that archiving a directory by name puts around everything."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                wanted = [i for i in archive.infolist()
                          if not i.is_dir() and _image_root(_relative(i.filename)) is not None]
                # The sizes the entries declare (zipfile reads no more), all checked before any is read.
                for info in wanted:
                    _check_size(info.file_size, f"{shown}:{info.filename}")
                members = {_relative(i.filename): archive.read(i) for i in wanted}
        else:
            # One streaming pass: seeking back inside a gzip stream decompresses it again.
            members = {}
            with tarfile.open(path, "r:*") as archive:
                for member in archive:
                    if member.isfile() and _image_root(_relative(member.name)) is not None:
                        # The header's size, a sparse member's expanded one: checked before a byte is read.
                        _check_size(member.size, f"{shown}:{member.name}")
                        members[_relative(member.name)] = archive.extractfile(member).read()
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{shown} is not a readable .tar.gz or .zip archive: {e}") from e
    roots = {_image_root(name) for name in members}
    if len(roots) > 1:
        raise DataError(f"{shown} holds image folders under several roots ({', '.join(sorted(roots))}); "
                        f"expected train/ and test/ at the top or inside one folder")
    return {name[len(root):]: data for root in roots for name, data in members.items()}


def _relative(member: str) -> str:
    return posixpath.normpath(member).lstrip("/")  # `tar -C dir .` names members ./train/...


def _image_root(name: str) -> str | None:
    """'data/train/cat/1.png' -> 'data/', 'train/cat/1.png' -> '', anything else -> None."""
    if is_image(name):
        return ""
    top, _, rest = name.partition("/")
    return top + "/" if is_image(rest) and not top.startswith(".") else None


def _check_size(size: int, name: str) -> None:
    if size > MAX_IMAGE_BYTES:
        raise DataError.oversized(name, size, MAX_IMAGE_BYTES, "an image here")


def _decode(source: bytes | pathlib.Path, name: str) -> np.ndarray:
    try:
        if isinstance(source, pathlib.Path):
            _check_size(source.stat().st_size, name)
            source = source.read_bytes()
        return decode(source)
    except BadInput as e:
        raise DataError(f"{name}: {e}") from None
    except OSError as e:
        raise DataError(f"cannot read {name}: {e.strerror or e}") from None
