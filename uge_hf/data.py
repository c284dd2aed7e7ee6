"""Reading image-classification datasets: finding the columns, checking them, decoding to tensors."""

from __future__ import annotations

import io
from typing import Optional, Sequence

import numpy as np
import PIL.Image
import torch
from datasets import ClassLabel, Dataset, Image, Value

from .transform import to_pixels
from .utils import progress_bar


def find_columns(dataset: Dataset, image_column: Optional[str] = None, label_column: Optional[str] = None) -> tuple[str, str]:
    """The image and label columns: named by the user, else found by feature type
    (``Image`` and ``ClassLabel``). Errors list the columns and say what to pass."""
    features = dataset.features
    columns = ", ".join(features) if features else "(none)"

    def pick(name: Optional[str], kind: type, what: str, arg: str) -> str:
        if name is not None:
            if name not in features:
                raise ValueError(f"column {name!r} not found; columns are: {columns}; pass {arg}=<one of them>")
            return name
        found = [c for c, f in features.items() if isinstance(f, kind)]
        if len(found) == 1:
            return found[0]
        if not found:
            raise ValueError(f"no {kind.__name__} column found for the {what}; columns are: {columns}; pass {arg}='<column>'")
        raise ValueError(f"several {kind.__name__} columns ({', '.join(found)}); pass {arg}='<column>' to choose one")

    return pick(image_column, Image, "images", "image_column"), pick(label_column, ClassLabel, "labels", "label_column")


def validate_labels(dataset: Dataset, label_column: str, num_classes: int) -> None:
    """Refuse an empty dataset and labels the key cannot represent."""
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: nothing to protect")
    feature = dataset.features[label_column]
    if isinstance(feature, ClassLabel) and feature.num_classes > num_classes:
        raise ValueError(f"column {label_column!r} has {feature.num_classes} classes but the key has {num_classes}; "
                         f"create a key with num_classes={feature.num_classes}")
    if not isinstance(feature, (ClassLabel, Value)) or (isinstance(feature, Value) and not feature.dtype.startswith("int")):
        raise ValueError(f"column {label_column!r} holds {feature}, not integer class labels; pass label_column=<a ClassLabel column>")
    labels = label_array(dataset, label_column)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise ValueError(f"row {int(bad[0])} has label {int(labels[bad[0]])}, outside the key's classes 0..{num_classes - 1} "
                         f"({len(bad)} such rows); drop or relabel them, or use a key with more classes")


def decode_rows(dataset: Dataset, image_column: str, rows: Sequence[int]) -> list[PIL.Image.Image]:
    """Decode the images of ``rows``, naming the first row that does not decode."""
    raw = dataset.select_columns([image_column]).cast_column(image_column, Image(decode=False)).select(rows)
    images = []
    for start in range(0, len(raw), 1000):
        for offset, item in enumerate(raw[start:start + 1000][image_column]):
            images.append(decode_image(item, rows[start + offset], image_column))
    return images


def label_array(dataset: Dataset, label_column: str) -> np.ndarray:
    return np.asarray(dataset.select_columns([label_column]).with_format("numpy")[label_column])


def decode_image(item: dict, row: int, image_column: str) -> PIL.Image.Image:
    try:
        if item.get("bytes") is not None:
            image = PIL.Image.open(io.BytesIO(item["bytes"]))
        else:
            image = PIL.Image.open(item["path"])
        image.load()
        return image
    except Exception as error:
        raise ValueError(f"row {row} of column {image_column!r} is not a decodable image ({error}); remove or fix that row") from None


def load_tensors(dataset: Dataset, image_column: str, label_column: str, channels: int, rows: Optional[Sequence[int]] = None,
                 size: Optional[tuple[int, int]] = None, verbose: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``uint8`` images ``(N, C, H, W)`` and ``int64`` labels for training.

    Training needs one size: ``size = (width, height)``, by default the first image's; others
    are resized to it (bicubic). Protection itself perturbs every image at its native size
    unless ``ProtectConfig.resize`` is set.
    """
    rows = range(len(dataset)) if rows is None else rows
    images = decode_rows(dataset, image_column, rows)
    size = size or images[0].size
    pixels = np.stack([to_pixels(img, channels, size) for img in progress_bar(images, desc="decode", verbose=verbose, leave=False)])
    labels = torch.as_tensor(label_array(dataset, label_column)[np.asarray(rows)], dtype=torch.int64)
    return torch.from_numpy(pixels), labels
