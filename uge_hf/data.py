"""Reading image-classification datasets: finding and checking the columns, decoding images
exactly as ``datasets`` shows them, and converting them to and from ``uint8`` tensors.

Everything a run could trip over is found here, in one pass before any work
(:func:`validate_split`), and named by row with the fix: a protection run costs minutes to
hours, and must not fail at its end.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from datasets import ClassLabel, Dataset, Image, Sequence as SequenceFeature, Value

from .utils import progress_bar

# The smallest side a key can take: every registered network halves its input three times.
MIN_SIDE = 8
# Images decode one at a time, and a header is read before the pixels: above this many pixels
# an image is refused unless ``resize=`` is set, since it is perturbed at its native size.
MAX_PIXELS = 4096 * 4096
# Peak memory of the per-sample search per pixel of a batch, measured on the CPU with the
# default key and surrogates (a batch of 250 images of 32x32, 1.0 GB above the process's base).
SEARCH_BYTES_PER_PIXEL = 4096
# 16-bit images are scaled to 8 bits (65535 -> 255), as an image viewer shows them.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
GRAYSCALE_MODES = ("1", "L", "LA", "La", *SIXTEEN_BIT_MODES)


# -- columns ------------------------------------------------------------------------------

def find_columns(dataset: Dataset, image_column: Optional[str] = None, label_column: Optional[str] = None) -> tuple[str, str]:
    """The image and label columns: named by the user, else found by feature type
    (``Image`` and ``ClassLabel``).

    Raises:
        ValueError: a named column is missing, none or several are found, the image column
            is not an ``Image`` feature, or another ``Image`` column would be published
            unprotected. Each message lists the columns and says what to pass or drop.
    """
    features = dataset.features
    columns = ", ".join(features) if features else "(none)"

    def pick(name: Optional[str], kind: type, what: str, arg: str) -> str:
        flag = "--" + arg.replace("_", "-")
        if name is not None:
            if name not in features:
                raise ValueError(f"column {name!r} not found; columns are: {columns}; pass {arg}=<one of them> ({flag})")
            return name
        found = [c for c, f in features.items() if isinstance(f, kind)]
        if len(found) == 1:
            return found[0]
        if not found:
            raise ValueError(f"no {kind.__name__} column found for the {what}; columns are: {columns}; pass {arg}='<column>' ({flag})")
        raise ValueError(f"several {kind.__name__} columns ({', '.join(found)}); pass {arg}='<column>' ({flag}) to choose one")

    image, label = pick(image_column, Image, "images", "image_column"), pick(label_column, ClassLabel, "labels", "label_column")
    if not isinstance(features[image], Image):
        raise ValueError(f"column {image!r} holds {type(features[image]).__name__}, not images; uge-hf protects an Image column: "
                         f"cast or map it to datasets.Image (PIL images or encoded bytes) first")
    others = [c for c, f in features.items() if c != image and _holds_images(f)]
    if others:
        raise ValueError(f"column(s) {', '.join(map(repr, others))} also hold images, which would be published unprotected; "
                         f"drop them (dataset.remove_columns({others!r})) or protect each in a run of its own")
    return image, label


def _holds_images(feature: Any) -> bool:
    if isinstance(feature, Image):
        return True
    if isinstance(feature, SequenceFeature):
        return _holds_images(feature.feature)
    if isinstance(feature, dict):
        return any(_holds_images(f) for f in feature.values())
    if isinstance(feature, list):
        return any(_holds_images(f) for f in feature)
    return False


def label_array(dataset: Dataset, label_column: str) -> np.ndarray:
    return np.asarray(dataset.select_columns([label_column]).with_format("numpy")[label_column])


def label_tensor(dataset: Dataset, label_column: str, rows: Sequence[int]) -> torch.Tensor:
    """``int64`` labels ``(N,)`` of ``rows``."""
    return torch.as_tensor(label_array(dataset, label_column)[np.asarray(rows)], dtype=torch.int64)


def validate_labels(dataset: Dataset, label_column: str, num_classes: int) -> None:
    """Refuse an empty dataset, a key of another number of classes than a ``ClassLabel``
    column names, labels the key cannot represent, missing labels, and a dataset of one class
    (nothing to learn, so nothing to protect).

    Raises:
        ValueError: naming the first offending row and the fix.
    """
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: nothing to protect")
    feature = dataset.features[label_column]
    if isinstance(feature, ClassLabel) and feature.num_classes != num_classes:
        # A key of more classes would train, its extra outputs never a target: a key made for other data.
        raise ValueError(f"column {label_column!r} has {feature.num_classes} classes but the key has {num_classes}; a key is made "
                         f"for one dataset's classes: create a key with num_classes={feature.num_classes} "
                         f"(uge-hf keygen --num-classes {feature.num_classes})")
    if not isinstance(feature, (ClassLabel, Value)) or (isinstance(feature, Value) and not feature.dtype.startswith(("int", "uint"))):
        raise ValueError(f"column {label_column!r} holds {feature}, not integer class labels; pass label_column=<a ClassLabel column> (--label-column)")
    raw = dataset.select_columns([label_column])[label_column]
    missing = [i for i, v in enumerate(raw) if v is None]
    if missing:
        raise ValueError(f"row {missing[0]} has no label ({len(missing)} such rows); drop or label them "
                         f"(dataset.filter(lambda r: r[{label_column!r}] is not None))")
    labels = np.asarray(raw, dtype=np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise ValueError(f"row {int(bad[0])} has label {int(labels[bad[0]])}, outside the key's classes 0..{num_classes - 1} "
                         f"({len(bad)} such rows); drop or relabel them, or use a key with more classes")
    if len(np.unique(labels)) < 2:
        raise ValueError(f"every row has label {int(labels[0])}: a one-class dataset teaches a model nothing, so there is "
                         "nothing to protect; UGE needs rows of at least two classes")


# -- decoding -----------------------------------------------------------------------------

def decode_image(item: dict, row: int, image_column: str, feature: Image = Image()) -> PIL.Image.Image:
    """Decode one encoded image (``{"bytes", "path"}``) exactly as ``datasets`` shows it to the
    user (EXIF orientation applied, the feature's ``mode`` honoured), naming the row if it
    does not decode."""
    try:
        return feature.decode_example(item)
    except Exception as error:
        raise ValueError(f"row {row} of column {image_column!r} is not a decodable image ({error}); remove or fix that row") from None


def eight_bit(image: PIL.Image.Image) -> PIL.Image.Image:
    """The image in an 8-bit mode PIL converts from faithfully: 16-bit grayscale scaled to 8
    bits (rounded), every other 8-bit mode unchanged.

    Raises:
        ValueError: for 32-bit integer (``I``) and float (``F``) images, whose scale
            (0-1? 0-255? 0-65535?) the pixels alone do not tell.
    """
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        return PIL.Image.fromarray(np.round(values / 257.0).astype(np.uint8), mode="L")
    if image.mode in ("I", "F"):
        kind = "32-bit float" if image.mode == "F" else "32-bit integer"
        raise ValueError(f"a {kind} image (mode {image.mode}) has no fixed pixel scale; convert the column to 8-bit images "
                         "first, e.g. PIL.Image.fromarray(np.round(x * 255).astype(np.uint8)) for floats in [0, 1]")
    return image


def to_pixels(image: Any, channels: int, size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """A decoded image (PIL, or a dict with bytes) as ``uint8`` ``(C, H, W)`` on the 0-255
    scale, in the key's color mode: RGB for 3 channels (alpha dropped, palettes expanded,
    grayscale replicated), L for 1; resized (bicubic) to ``size = (width, height)`` if given."""
    if isinstance(image, dict):
        image = decode_image(image, -1, "image")
    image = eight_bit(image).convert("RGB" if channels == 3 else "L")
    if size is not None and image.size != tuple(size):
        image = image.resize(tuple(size), PIL.Image.BICUBIC)
    array = np.array(image, dtype=np.uint8)
    return array.reshape(*array.shape[:2], -1).transpose(2, 0, 1)


def pil_image(pixels: np.ndarray) -> PIL.Image.Image:
    """``uint8`` ``(C, H, W)`` pixels (C = 1 or 3) as an L or RGB image."""
    hwc = pixels.transpose(1, 2, 0)
    return PIL.Image.fromarray(hwc[..., 0] if hwc.shape[2] == 1 else hwc)


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless, deterministic PNG bytes of ``uint8`` ``(C, H, W)`` pixels, with no metadata."""
    buffer = io.BytesIO()
    pil_image(pixels).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def jpeg(images: torch.Tensor, quality: int = 10) -> torch.Tensor:
    """Re-encode each image as JPEG at ``quality`` (1-95) with libjpeg through Pillow, as
    APBench and ISS (Liu et al., 2023) do: quality 10 is the field's strongest data defense.

    A real codec, not kornia's differentiable approximation
    (``kornia.enhance.jpeg_codec_differentiable``): on CIFAR-10 that one differs from libjpeg by
    3.2/255 on average at quality 10 (up to 66/255) and keeps images closer to the input at
    quality 50 (5.4/255 from it against libjpeg's 6.8), so it is a different defense.

    Args:
        images: ``uint8 (N, C, H, W)``, C = 1 or 3.
    Returns:
        ``uint8 (N, C, H, W)``.
    """
    out = []
    for img in images.permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        PIL.Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(buffer, format="JPEG", quality=quality)
        decoded = np.asarray(PIL.Image.open(buffer).convert("RGB" if img.shape[-1] == 3 else "L"))
        out.append(decoded.reshape(*decoded.shape[:2], -1))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def reencode_png(item: dict, row: int, image_column: str, feature: Image = Image()) -> dict:
    """An encoded image as ``datasets`` shows it, re-encoded as PNG: the same pixels and mode,
    none of the original file's metadata (EXIF, text chunks, ICC profile) and no path."""
    image = decode_image(item, row, image_column, feature)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return {"bytes": buffer.getvalue(), "path": None}


def raw_images(dataset: Dataset, image_column: str) -> Dataset:
    """The image column undecoded (``{"bytes", "path"}``): cheap to read in bulk."""
    return dataset.select_columns([image_column]).cast_column(image_column, Image(decode=False))


def decode_rows(dataset: Dataset, image_column: str, rows: Sequence[int]) -> list[PIL.Image.Image]:
    """Decode the images of ``rows``, naming the first row that does not decode."""
    feature = dataset.features[image_column]
    raw = raw_images(dataset, image_column).select(rows)
    images = []
    for start in range(0, len(raw), 1000):
        for offset, item in enumerate(raw[start:start + 1000][image_column]):
            images.append(decode_image(item, rows[start + offset], image_column, feature))
    return images


class DecodedRows(Sequence[torch.Tensor]):
    """The images of ``rows`` of ``dataset``, each decoded and passed through ``convert`` when
    indexed or sliced, not before: a process of a distributed run decodes only the batches it
    protects, and the decoded clean rows are dropped batch by batch instead of all held beside
    the protected ones (50,000 rows at 224 px are 7.5 GB in each process)."""

    def __init__(self, dataset: Dataset, image_column: str, rows: range, convert: Callable[[Any], torch.Tensor]):
        self.dataset, self.image_column, self.rows, self.convert = dataset, image_column, rows, convert

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int | slice) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(index, slice):
            return [self.convert(img) for img in decode_rows(self.dataset, self.image_column, self.rows[index])]
        return self.convert(decode_rows(self.dataset, self.image_column, [self.rows[index]])[0])


def load_tensors(dataset: Dataset, image_column: str, label_column: str, channels: int, rows: Optional[Sequence[int]] = None,
                 size: Optional[tuple[int, int]] = None, verbose: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``uint8`` images ``(N, C, H, W)`` (0-255) and ``int64`` labels ``(N,)`` for training.

    Training needs one size: ``size = (width, height)``, by default the first image's; others
    are resized to it (bicubic). Protection itself perturbs every image at its native size
    unless ``ProtectConfig.resize`` is set.
    """
    rows = range(len(dataset)) if rows is None else rows
    images = decode_rows(dataset, image_column, rows)
    size = size or images[0].size
    pixels = np.stack([to_pixels(img, channels, size) for img in progress_bar(images, desc="decode", verbose=verbose, leave=False)])
    return torch.from_numpy(pixels), label_tensor(dataset, label_column, rows)


# -- the validation pass ------------------------------------------------------------------

@dataclass
class ImageSurvey:
    """What one pass over a split's images found: sizes (width, height) and color modes."""

    sizes: set = field(default_factory=set)
    modes: set = field(default_factory=set)
    largest: tuple[int, int] = (0, 0)
    first_size: Optional[tuple[int, int]] = None


def survey_images(dataset: Dataset, image_column: str, *, resize: Optional[tuple[int, int]] = None, verbose: bool = True) -> ImageSurvey:
    """Decode every image once, as the run will, and refuse what cannot work, naming the row:
    undecodable bytes, a side under :data:`MIN_SIDE`, more than :data:`MAX_PIXELS` without
    ``resize``, a mode without a fixed pixel scale. The header is read before the pixels, so a
    huge image is refused without being decoded; images decode one at a time.

    Raises:
        ValueError: naming the row, what is wrong with it, and what to pass or fix.
    """
    feature = dataset.features[image_column]
    raw = raw_images(dataset, image_column)
    survey = ImageSurvey()
    for start in progress_bar(range(0, len(raw), 1000), desc="check images", verbose=verbose, leave=False):
        for offset, item in enumerate(raw[start:start + 1000][image_column]):
            row = start + offset
            width, height = _header_size(item, row, image_column)
            if resize is None and width * height > MAX_PIXELS:
                raise ValueError(f"row {row} of column {image_column!r} is {width}x{height} ({width * height / 1e6:.0f} MP): "
                                 f"images are perturbed at their native size, which needs too much memory above "
                                 f"{MAX_PIXELS / 1e6:.0f} MP; pass resize=(width, height) (--resize WxH), e.g. (256, 256)")
            image = decode_image(item, row, image_column, feature)
            try:
                eight_bit(image)
            except ValueError as error:
                raise ValueError(f"row {row} of column {image_column!r}: {error}") from None
            if resize is None and min(image.size) < MIN_SIDE:
                raise ValueError(f"row {row} of column {image_column!r} is {image.size[0]}x{image.size[1]}: the key needs at least "
                                 f"{MIN_SIDE}x{MIN_SIDE}; drop that row or pass resize=(width, height) (--resize WxH)")
            survey.sizes.add(image.size)
            survey.modes.add(image.mode)
            survey.first_size = survey.first_size or image.size
            if image.size[0] * image.size[1] > survey.largest[0] * survey.largest[1]:
                survey.largest = image.size
            del image  # one decoded image at a time
    return survey


def _header_size(item: dict, row: int, image_column: str) -> tuple[int, int]:
    """(width, height) from the file's header, before any pixel is decoded."""
    try:
        source = io.BytesIO(item["bytes"]) if item.get("bytes") is not None else item["path"]
        with PIL.Image.open(source) as image:
            return image.size
    except Exception as error:
        raise ValueError(f"row {row} of column {image_column!r} is not a decodable image ({error}); remove or fix that row") from None


def check_color_mode(survey: ImageSurvey, channels: int, split: str) -> None:
    """Refuse grayscale data for a color key (the output would be RGB with colored noise,
    three times the size, and the data owner most likely meant a grayscale key), and color
    data for a grayscale key (the output would be grayscale: every pixel moved by far more
    than ε, which the card promises)."""
    colour = sorted(survey.modes - set(GRAYSCALE_MODES))
    if channels == 1 and colour:
        raise ValueError(f"split {split!r} holds color images (modes {', '.join(colour)}) but the key takes 1 channel, so the "
                         "protected images would be grayscale, each pixel moved by far more than epsilon; use a 3-channel key "
                         "(uge-hf keygen without --in-channels), or make the column grayscale first if that is what you mean to "
                         "publish (dataset.cast_column(column, datasets.Image(mode='L')))")
    if channels == 3 and survey.modes and survey.modes <= set(GRAYSCALE_MODES):
        raise ValueError(f"every image of split {split!r} is grayscale (modes {', '.join(sorted(survey.modes))}) but the key takes "
                         "3 channels, so the protected images would become RGB with colored noise; create a grayscale key "
                         "(AuthorizedModel.create(..., in_channels=1), uge-hf keygen --in-channels 1)")


def check_memory(survey: ImageSurvey, *, batch_size: int, fit_rows: int, channels: int, per_sample: bool,
                 resize: Optional[tuple[int, int]], device: torch.device) -> None:
    """Refuse a run whose largest batch or whose fit sample cannot fit in the device's memory,
    saying which knob lowers it."""
    available = _device_memory(device)
    if available is None:
        return
    width, height = resize or survey.largest
    fit_width, fit_height = resize or survey.first_size
    needs = {
        "search": batch_size * width * height * SEARCH_BYTES_PER_PIXEL if per_sample else 0,
        "fit sample": fit_rows * channels * fit_width * fit_height,
    }
    what, need = max(needs.items(), key=lambda kv: kv[1])
    if need > 0.8 * available:
        fix = ("pass a smaller batch_size (--batch-size) or resize=(width, height) (--resize WxH)" if what == "search"
               else "pass fit_sample=<rows> (--fit-sample) or resize=(width, height) (--resize WxH)")
        raise ValueError(f"the {what} would need about {need / 2**30:.1f} GiB at {width}x{height} px but the device has "
                         f"{available / 2**30:.1f} GiB; {fix}")


def _device_memory(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def warn_mixed_sizes(survey: ImageSurvey, split: str, resize: Optional[tuple[int, int]]) -> None:
    if resize is None and len(survey.sizes) > 1:
        width, height = survey.first_size
        warnings.warn(f"split {split!r} has images of {len(survey.sizes)} sizes: each is perturbed at its own size, but the key's "
                      f"trajectory and the surrogates are trained at the first row's size, {width}x{height} (the others resized "
                      "to it). Pass resize=(width, height) to protect every image at one size", stacklevel=3)
