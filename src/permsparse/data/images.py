"""Labelled images for classifiers: image folders (torchvision ``ImageFolder`` layout) and
the embedded 8x8 digits, turned into ``pixel_values``/``labels`` tensors.

An image folder is ``root/<class>/<image files>``: one sub-folder per class (sorted
names give the label ids, as in torchvision), images in any format PIL reads. Images are
read with PIL and converted to RGB, as torchvision's default loader does; torchvision
itself is not needed.

The embedded default is scikit-learn's bundled digits (1,797 labelled 8x8 images, no
download) with a fixed, stratified split: ``test`` (20 %, held out for reported
numbers), ``val`` (10 %, for tuning) and ``train`` (the rest: model training and
calibration).

Pixels become tensors through the checkpoint's Hugging Face image processor when there is
one (resize and normalisation as the model was trained), else through a plain resize to
``image_size`` and normalisation to ``[-1, 1]``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from permsparse._optional import require

__all__ = [
    "DIGITS_SOURCES",
    "DIGITS_SPLITS",
    "IMAGE_EXTENSIONS",
    "ImageSet",
    "ImageData",
    "list_image_folder",
    "ImageFolder",
    "open_image_folder",
    "read_image_folder",
    "label_names",
    "digits_images",
    "digits_split",
    "load_digits_set",
    "to_pixel_values",
    "load_image_data",
]

logger = logging.getLogger(__name__)

#: Names of the embedded digits source accepted by :func:`load_image_data`.
DIGITS_SOURCES = frozenset({"digits"})
DIGITS_SPLITS = ("train", "val", "test")
#: File suffixes read as images (torchvision's ``IMG_EXTENSIONS``).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_SPLIT_SEED = 0  # fixed: the digits split never changes with the run's seed


@dataclass(frozen=True)
class ImageSet:
    """Images as model inputs.

    Attributes:
        pixel_values: ``(N, C, H, W)`` float32.
        labels: ``(N,)`` int64 class ids.
        classes: class names; ``labels`` index into them.
        source: where the images came from.
    """

    pixel_values: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: "torch.Tensor | Sequence[int]") -> "ImageSet":
        idx = torch.as_tensor(index, dtype=torch.long)
        return ImageSet(self.pixel_values[idx], self.labels[idx], self.classes, self.source)

    def batches(self, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """Batch dicts ``{"pixel_values", "labels"}`` as :func:`permsparse.prune` takes them."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return [
            {"pixel_values": self.pixel_values[i : i + batch_size], "labels": self.labels[i : i + batch_size]}
            for i in range(0, len(self), batch_size)
        ]


@dataclass(frozen=True)
class ImageData:
    """Calibration images and the labelled evaluation set (``None`` when none was given)."""

    calib: ImageSet
    eval: "ImageSet | ImageFolder | None"  # both give len() and .batches(batch_size)
    source: str


# -- image folders ---------------------------------------------------------------------------


def list_image_folder(root: "str | os.PathLike[str]") -> tuple[list[Path], list[int], tuple[str, ...]]:
    """``(files, labels, classes)`` of an ``ImageFolder`` layout ``root/<class>/<images>``.

    Files are sorted within a class (so the order is reproducible); hidden files and
    files that are not images are skipped.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: ``root`` is not a folder, has no class sub-folders, or a class folder
            holds no image (the message says which).
    """
    path = Path(root).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not path.is_dir():
        raise ValueError(f"{root} is not a folder: expected an image folder laid out as root/<class>/<images>")
    classes = tuple(sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")))
    if not classes:
        loose = sum(1 for f in path.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        hint = f" ({loose} images lie directly in it; put each class in its own sub-folder)" if loose else ""
        raise ValueError(f"image folder {root} has no class sub-folders{hint}: expected root/<class>/<images>")
    files: list[Path] = []
    labels: list[int] = []
    empty = []
    for label, name in enumerate(classes):
        found = sorted(
            f for f in (path / name).rglob("*")
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".")
        )
        if not found:
            empty.append(name)
        files.extend(found)
        labels.extend([label] * len(found))
    if empty:
        raise ValueError(
            f"image folder {root}: class folder(s) {', '.join(empty)} hold no images "
            f"(accepted: {', '.join(IMAGE_EXTENSIONS)})"
        )
    return files, labels, classes


def _import_pil() -> Any:
    return require("PIL.Image", "vision", "reading images")


def _open_rgb(file: Path) -> Any:
    Image = _import_pil()
    try:
        with Image.open(file) as im:
            return im.convert("RGB")  # also forces the (lazy) decode while the file is open
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read image {file}: {err}") from None


def label_names(model: Any) -> tuple[str, ...] | None:
    """A classifier's class names in label-id order (``config.id2label``), if it has them."""
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    try:
        return tuple(str(id2label[i]) for i in range(len(id2label))) or None
    except KeyError:
        return None


@dataclass(frozen=True)
class ImageFolder:
    """An image folder read lazily: files are decoded only when loaded, so an ImageNet-size
    evaluation set streams batch by batch and calibration reads only the images it draws."""

    files: tuple[Path, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]
    source: str
    processor: Any = None
    image_size: int = 224

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: "torch.Tensor | Sequence[int] | None" = None, progress: bool = False) -> ImageSet:
        """The images at ``index`` (default: all) as model inputs."""
        idx = range(len(self)) if index is None else torch.as_tensor(index, dtype=torch.long).tolist()
        images = [_open_rgb(self.files[i]) for i in tqdm(idx, desc=f"read {Path(self.source).name}",
                                                         disable=not progress, leave=False)]
        labels = torch.tensor([self.labels[i] for i in idx], dtype=torch.long)
        return ImageSet(to_pixel_values(images, self.processor, self.image_size), labels, self.classes, self.source)

    def batches(self, batch_size: int) -> "_LazyBatches":
        """Batch dicts ``{"pixel_values", "labels"}``, each read when iterated to."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return _LazyBatches(self, batch_size)


@dataclass(frozen=True)
class _LazyBatches:
    folder: ImageFolder
    batch_size: int

    def __len__(self) -> int:
        return -(-len(self.folder) // self.batch_size)

    def __iter__(self):
        for begin in range(0, len(self.folder), self.batch_size):
            part = self.folder.load(range(begin, min(begin + self.batch_size, len(self.folder))))
            yield {"pixel_values": part.pixel_values, "labels": part.labels}


def open_image_folder(
    root: "str | os.PathLike[str]",
    processor: Any = None,
    image_size: int = 224,
    classes: Sequence[str] | None = None,
) -> ImageFolder:
    """An ``ImageFolder`` layout, listed and checked now, read lazily (see :class:`ImageFolder`).

    Labels follow the sorted class-folder names (torchvision's convention, also that of
    ImageNet checkpoints), unless ``classes`` (e.g. the model's :func:`label_names`)
    holds every folder name: then a folder's label is its index in ``classes``, so an
    evaluation folder with only some of the classes keeps the model's label ids.
    """
    files, labels, found = list_image_folder(root)
    if classes is not None and set(found) <= set(classes):
        known = {c: i for i, c in enumerate(classes)}
        labels = [known[found[i]] for i in labels]
        found = tuple(classes)
    elif classes is not None:
        logger.warning("image folder %s: class folders are not among the names %s...; labels follow the sorted "
                       "folder names", root, ", ".join(list(classes)[:5]))
    logger.info("%s: %d images of %d classes", root, len(files), len(found))
    return ImageFolder(tuple(files), tuple(labels), tuple(found), str(root), processor, image_size)


def read_image_folder(
    root: "str | os.PathLike[str]",
    processor: Any = None,
    image_size: int = 224,
    progress: bool = True,
    classes: Sequence[str] | None = None,
) -> ImageSet:
    """All images of an ``ImageFolder`` layout as an :class:`ImageSet` (labels as in
    :func:`open_image_folder`)."""
    return open_image_folder(root, processor, image_size, classes).load(progress=progress)


def to_pixel_values(images: Sequence[Any], processor: Any = None, image_size: int = 224) -> torch.Tensor:
    """``(N, 3, H, W)`` float32 model inputs from PIL images.

    With a Hugging Face image ``processor`` its own resize and normalisation apply;
    without one, a bilinear resize to ``image_size`` and ``(x - 0.5) / 0.5``.
    """
    if not images:
        raise ValueError("no images to convert")
    images = [im.convert("RGB") for im in images]
    if processor is not None:
        return processor(images=images, return_tensors="pt")["pixel_values"].float()
    import numpy as np

    Image = _import_pil()
    arrays = [np.asarray(im.resize((image_size, image_size), Image.BILINEAR), dtype=np.float32) for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0  # (N, 3, H, W) in [0, 1]
    return (x - 0.5) / 0.5


# -- the embedded digits -------------------------------------------------------------------


def _load_digits() -> Any:
    return require("sklearn.datasets", "vision", "the embedded digits").load_digits()


def digits_images() -> tuple[list[Any], torch.Tensor]:
    """The 1,797 bundled 8x8 digits as grey PIL images (0..16 scaled to 0..255) and labels."""
    import numpy as np

    Image = _import_pil()
    bunch = _load_digits()
    pixels = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (N, 8, 8)
    return [Image.fromarray(p, mode="L") for p in pixels], torch.as_tensor(bunch.target, dtype=torch.long)


def digits_split(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fixed stratified ``train`` / ``val`` / ``test`` indices (70 / 10 / 20 %)."""
    gen = torch.Generator().manual_seed(_SPLIT_SEED)
    parts: dict[str, list[torch.Tensor]] = {s: [] for s in DIGITS_SPLITS}
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_test, n_val = round(0.2 * idx.numel()), round(0.1 * idx.numel())
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    return {s: torch.cat(v).sort().values for s, v in parts.items()}


def load_digits_set(split: str, processor: Any = None, image_size: int = 16) -> ImageSet:
    """One split of the embedded digits as model inputs."""
    if split not in DIGITS_SPLITS:
        raise ValueError(f"unknown digits split {split!r}: use one of {DIGITS_SPLITS}")
    images, labels = digits_images()
    idx = digits_split(labels)[split]
    pixels = to_pixel_values([images[i] for i in idx.tolist()], processor, image_size)
    return ImageSet(pixels, labels[idx], tuple(str(d) for d in range(10)), f"digits:{split}")


# -- calibration + evaluation ----------------------------------------------------------------


def _draw(images: "ImageSet | ImageFolder", n: int, seed: int, progress: bool = False) -> ImageSet:
    """``n`` images drawn without replacement (all of them, shuffled, when ``n`` is larger)."""
    if n < 1:
        raise ValueError(f"n_calib must be >= 1, got {n}")
    if n > len(images):
        logger.warning("%s holds %d images; calibrating on all of them instead of %d", images.source, len(images), n)
    index = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[: min(n, len(images))]
    return images.subset(index) if isinstance(images, ImageSet) else images.load(index, progress)


def load_image_data(
    source: "str | os.PathLike[str]",
    processor: Any = None,
    image_size: int = 224,
    n_calib: int = 512,
    seed: int = 0,
    eval_source: "str | os.PathLike[str] | None" = None,
    progress: bool = True,
    classes: Sequence[str] | None = None,
) -> ImageData:
    """Calibration images (``n_calib`` drawn with ``seed``) and a labelled evaluation set.

    Args:
        source: ``"digits"`` (embedded: calibration from the ``train`` split, evaluation on
            the held-out ``test`` split; ``"digits:val"`` evaluates on ``val`` instead, for
            tuning) or an image folder ``root/<class>/<images>``.
        processor: the model's image processor (or ``None``: plain resize to ``image_size``).
        eval_source: an image folder to evaluate on (read lazily, batch by batch); for an
            image-folder ``source`` without it, there is no evaluation set.
        classes: the model's class names (:func:`label_names`), which decide the label
            ids of folders whose class names they all hold (see :func:`read_image_folder`).
    """
    name = os.fspath(source).strip()
    base, _, split = name.partition(":")
    if base.lower() in DIGITS_SOURCES:
        eval_split = split or "test"
        if eval_split not in ("val", "test"):
            raise ValueError(f"digits evaluates on 'val' or 'test', not {eval_split!r}")
        calib = _draw(load_digits_set("train", processor, image_size), n_calib, seed)
        ev = load_digits_set(eval_split, processor, image_size)
    else:
        calib = _draw(open_image_folder(name, processor, image_size, classes), n_calib, seed, progress)
        ev = None
    if eval_source is not None:
        ev = open_image_folder(eval_source, processor, image_size, classes or calib.classes)
    return ImageData(calib, ev, name)
