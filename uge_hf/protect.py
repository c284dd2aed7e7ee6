"""``protect``: a dataset in, a protected dataset folder out (a valid Hub dataset repo).

The pipeline: resolve and validate every split before any work; build the shared state
once (resumable, in ``state_dir``); cut each split into shards of whole batches; protect
each shard on its own (shards are dealt out to Accelerate processes) and write it under a
temporary name, renamed when complete; after a barrier, the main process writes
``uge_hf.json`` and the dataset card. A rerun skips shards whose bytes match the recorded
hash, so an interrupted run finishes with the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn as nn
from datasets import Dataset, DatasetDict, Image, IterableDataset, IterableDatasetDict, load_dataset

from . import __version__
from .config import ProtectConfig
from .data import decode_image, find_columns, validate_labels
from .fitting import atomic_write, check_feature_space
from .key import AuthorizedModel
from .transform import UGETransform, encode_png
from .utils import progress_bar, sha256_file

METADATA_NAME = "uge_hf.json"
DatasetLike = Union[Dataset, DatasetDict, IterableDataset, IterableDatasetDict, str, os.PathLike]


def resolve_dataset(dataset: DatasetLike) -> DatasetDict:
    """Any accepted input as a ``DatasetDict``: a path or Hub id is loaded; a lone split is
    named after ``dataset.split`` (else "train"); a stream is materialized to Arrow on disk
    (not in memory), since protection needs row-indexed batches."""
    if isinstance(dataset, (str, os.PathLike)):
        dataset = load_dataset(str(dataset))
    if isinstance(dataset, (IterableDataset, Dataset)):
        # "train[:500]" (a sliced load) names the split "train".
        dataset = {re.match(r"[\w.-]*", str(dataset.split or ""))[0] or "train": dataset}
    out = DatasetDict()
    for name, split in dict(dataset).items():
        if isinstance(split, IterableDataset):
            # Stream the encoded bytes: decoding and re-encoding would recompress JPEGs.
            raw = split
            for column, feature in split.features.items():
                if isinstance(feature, Image):
                    raw = raw.cast_column(column, Image(decode=False))
            split = Dataset.from_generator(lambda s=raw: (yield from s), features=split.features)
        out[name] = split
    return out


def run_id(key: AuthorizedModel, config: ProtectConfig, datasets: dict[str, Dataset], columns: tuple[str, str], fit_split: str) -> str:
    """Identity of a run: what must match for a rerun to resume rather than be refused."""
    parts = [key.fingerprint, config.to_json(), __version__, *columns, fit_split]
    parts += [f"{name}:{ds._fingerprint}:{len(ds)}" for name, ds in sorted(datasets.items())]
    return hashlib.sha256("/".join(parts).encode()).hexdigest()


def shard_plan(num_rows: int, batch_size: int, shard_size: int) -> list[range]:
    """Rows cut into shards of whole batches, so a shard's bytes never depend on its neighbours."""
    per_shard = max(batch_size, shard_size // batch_size * batch_size)
    return [range(a, min(a + per_shard, num_rows)) for a in range(0, num_rows, per_shard)]


def shard_name(split: str, index: int, count: int) -> str:
    return f"data/{split}-{index:05d}-of-{count:05d}.parquet"


def check_images(dataset: Dataset, image_column: str, verbose: bool) -> None:
    """Decode every image once before any work, naming the first that fails."""
    raw = dataset.select_columns([image_column]).cast_column(image_column, Image(decode=False))
    for start in progress_bar(range(0, len(raw), 1000), desc="check images", verbose=verbose, leave=False):
        for offset, item in enumerate(raw[start:start + 1000][image_column]):
            decode_image(item, start + offset, image_column)


def protect_shard(transform: UGETransform, dataset: Dataset, rows: range, path: Path, verbose: bool) -> str:
    """Protect ``rows`` of ``dataset`` into a parquet file at ``path`` (atomic); returns its sha256."""
    image_column, label_column = transform.image_column, transform.label_column
    features = dataset.features.copy()
    features[image_column] = Image()
    part = dataset.select(rows).cast_column(image_column, Image(decode=False))
    batch_size = transform.batch_size
    columns: dict[str, list] = {name: [] for name in features}
    bar = progress_bar(total=len(rows), desc=path.name, unit="img", verbose=verbose, leave=False)
    for start in range(0, len(part), batch_size):
        batch = part[start:start + batch_size]
        pixels = [transform.pixels(decode_image(item, rows[start + i], image_column)) for i, item in enumerate(batch[image_column])]
        protected = transform.perturb(pixels, torch.as_tensor(batch[label_column]))
        batch[image_column] = [{"bytes": encode_png(p.numpy()), "path": None} for p in protected]
        for name in features:
            columns[name].extend(batch[name])
        bar.update(len(protected))
    bar.close()
    table = pa.Table.from_pydict(columns, schema=features.arrow_schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return sha256_file(path)


def protect(dataset: DatasetLike, key: AuthorizedModel, config: Optional[ProtectConfig] = None, *, output_dir: Optional[str | os.PathLike] = None,
            splits: Optional[Sequence[str]] = None, other_splits: str = "copy", fit_split: Optional[str] = None,
            image_column: Optional[str] = None, label_column: Optional[str] = None, feature_backbone: Optional[nn.Module] = None,
            shard_size: int = 5000, output_format: str = "parquet", state_dir: Optional[str | os.PathLike] = None,
            overwrite: bool = False, card_template: Optional[str | os.PathLike] = None, efficacy: Optional[dict] = None,
            source: Optional[dict] = None, verbose: bool = True) -> DatasetDict:
    """Protect ``dataset`` for ``key`` and write it to ``output_dir`` as a Hub dataset repo.

    Args:
        dataset: a ``Dataset``, ``DatasetDict``, ``IterableDataset`` (a Hub stream), a local
            folder or a Hub id.
        key: the authorized model.
        config: a :class:`ProtectConfig` (default: the benchmarked setting).
        output_dir: where ``data/{split}-{i:05d}-of-{n:05d}.parquet``, ``README.md`` and
            ``uge_hf.json`` go; a temporary folder if ``None``.
        splits: splits to protect (default: all). ``other_splits="copy"`` writes the rest
            unchanged, ``"drop"`` leaves them out.
        fit_split: the split the shared state is built on (default: "train" if protected,
            else the first protected split).
        shard_size: rows per shard, rounded down to whole batches.
        output_format: ``"parquet"`` (``load_dataset(output_dir)``) or ``"arrow"``
            (``save_to_disk`` layout, for ``load_from_disk``).
        state_dir: where the shared state and progress live (default ``<output_dir>.uge-state``).
            It holds the key's trajectory, θ0 included: keep it private, never publish it.
        overwrite: replace an ``output_dir`` that holds a different run.

    Returns:
        The protected ``DatasetDict``, read back from ``output_dir``.

    Example:
        >>> from datasets import load_dataset
        >>> from uge_hf import AuthorizedModel, ProtectConfig, protect
        >>> ds = load_dataset("../shared/data/cifar10", split="train[:500]")  # doctest: +SKIP
        >>> key = AuthorizedModel.create("convnet", num_classes=10, seed=0)
        >>> out = protect(ds, key, ProtectConfig.preset("fast"), output_dir="cifar10-uge")  # doctest: +SKIP
    """
    from accelerate import PartialState

    from .card import write_card

    config = config or ProtectConfig()
    check_feature_space(config, feature_backbone)
    if output_format not in ("parquet", "arrow"):
        raise ValueError(f"output_format must be 'parquet' or 'arrow', not {output_format!r}")
    if other_splits not in ("copy", "drop"):
        raise ValueError(f"other_splits must be 'copy' or 'drop', not {other_splits!r}")
    data = resolve_dataset(dataset)
    splits = list(splits) if splits is not None else list(data)
    missing = [s for s in splits if s not in data]
    if missing:
        raise ValueError(f"split(s) {missing} not found; the dataset has: {', '.join(data)}; pass splits=[...] from those")
    columns = None
    for name in splits:  # every check before any work
        found = find_columns(data[name], image_column, label_column)
        if columns is not None and found != columns:
            raise ValueError(f"split {name!r} uses columns {found}, others {columns}; pass image_column= and label_column=")
        columns = found
        if len(data[name]) == 0:
            raise ValueError(f"split {name!r} is empty: nothing to protect; drop it from splits=")
        validate_labels(data[name], columns[1], key.num_classes)
    fit_split = fit_split or ("train" if "train" in splits else splits[0])
    if fit_split not in data:
        raise ValueError(f"fit_split {fit_split!r} not found; the dataset has: {', '.join(data)}")
    rid = run_id(key, config, {s: data[s] for s in splits}, columns, fit_split)

    out = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="uge-hf-"))
    state_path = Path(state_dir) if state_dir is not None else out.with_name(out.name + ".uge-state")
    # cpu=True on a machine without GPUs turns N launched processes into a gloo group.
    accelerator = PartialState(cpu=not torch.cuda.is_available())
    if accelerator.is_main_process:
        for name in splits:
            check_images(data[name], columns[0], verbose)
        claim_output(out, state_path, rid, overwrite)
    accelerator.wait_for_everyone()

    # Shared state: built once, by every process together (each optimization step is shared
    # out, parallel.py), so each holds the same copy; resumable; the main process saves it.
    final_state = state_path / "state"
    if (final_state / "state.json").exists():
        transform = UGETransform.from_pretrained(final_state, feature_backbone=feature_backbone)
    else:
        transform = UGETransform.fit(data[fit_split], key, config, image_column=columns[0], label_column=columns[1],
                                     feature_backbone=feature_backbone, cache_dir=state_path / "cache", verbose=verbose)
        if accelerator.is_main_process:
            transform.save_pretrained(final_state)
            atomic_write(state_path / "build.json", json.dumps({"processes": accelerator.num_processes,
                                                                "phases_s": transform.state.timings}).encode())
    accelerator.wait_for_everyone()

    # Shards, dealt round-robin to processes; each is skipped if already complete.
    jobs = []
    for name in splits:
        plan = shard_plan(len(data[name]), config.batch_size, shard_size)
        jobs += [(name, i, len(plan), rows) for i, rows in enumerate(plan)]
    progress_dir = state_path / "progress"
    progress_dir.mkdir(parents=True, exist_ok=True)
    mine = jobs[accelerator.process_index::accelerator.num_processes]
    for name, i, count, rows in progress_bar(mine, desc="protect shards", unit="shard", verbose=verbose):
        path = out / shard_name(name, i, count)
        record = progress_dir / f"{name}-{i:05d}.json"
        if path.exists() and record.exists() and json.loads(record.read_text())["sha256"] == sha256_file(path):
            continue
        started = time.time()
        sha = protect_shard(transform, data[name], rows, path, verbose)
        atomic_write(record, json.dumps({"sha256": sha, "rows": [rows.start, rows.stop], "process": accelerator.process_index,
                                         "started": started, "finished": time.time()}).encode())
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        shards = {shard_name(n, i, c): json.loads((progress_dir / f"{n}-{i:05d}.json").read_text())["sha256"] for n, i, c, _ in jobs}
        copied = [s for s in data if s not in splits] if other_splits == "copy" else []
        for name in copied:
            count = max(1, math.ceil(len(data[name]) / shard_size))
            unchanged = without_paths(data[name], columns[0])
            for i in range(count):
                path = out / shard_name(name, i, count)
                unchanged.shard(count, i, contiguous=True).to_parquet(str(path))
                shards[shard_name(name, i, count)] = sha256_file(path)
        metadata = {
            "uge_hf_version": __version__, "run_id": rid, "method": "Ungeneralizable Examples (UGE), arXiv 2404.14016",
            "key": {"architecture": key.architecture, "num_classes": key.num_classes, "in_channels": key.in_channels,
                    "fingerprint": key.fingerprint, "weights_sha256": key.weights_file_sha256, "source": key.source},
            "config": config.to_dict(), "image_column": columns[0], "label_column": columns[1],
            "protected_splits": splits, "copied_splits": copied, "fit_split": fit_split,
            "num_rows": {s: len(data[s]) for s in splits + copied}, "state_fingerprint": transform.state.fingerprint,
            "generator_fingerprint": transform.state.generator_fingerprint, "shards": dict(sorted(shards.items())),
            "source": source, "efficacy": efficacy, "output_format": output_format,
        }
        if output_format == "arrow":
            arrow_dir = out / "arrow"
            read_fresh(out).save_to_disk(str(arrow_dir))
            shutil.rmtree(out / "data")
            metadata["shards"] = {str(p.relative_to(out)): sha256_file(p) for p in sorted(arrow_dir.rglob("*")) if p.is_file()}
        metadata["num_bytes"] = {s: sum((out / p).stat().st_size for p in metadata["shards"] if split_of(p) == s) for s in splits + copied}
        write_metadata(out, metadata)
        write_card(out, metadata, data[splits[0]].features, template=card_template)
    accelerator.wait_for_everyone()
    return load_output(out)


def without_paths(dataset: Dataset, image_column: str) -> Dataset:
    """The same images as bytes only: an ``Image`` path may name a file on the protector's disk."""
    def inline(batch):
        items = batch[image_column]
        return {image_column: [{"bytes": it["bytes"] if it["bytes"] is not None else Path(it["path"]).read_bytes(), "path": None}
                               for it in items]}

    raw = dataset.cast_column(image_column, Image(decode=False))
    return raw.map(inline, batched=True, desc="copy split").cast_column(image_column, Image())


def write_metadata(out: Path, metadata: dict) -> None:
    """Write ``uge_hf.json`` (atomically, keys sorted, so equal runs give equal bytes)."""
    atomic_write(out / METADATA_NAME, (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode())


def folder_features(out: Path):
    """The ``datasets`` features of a protected folder's splits."""
    return next(iter(load_output(out).values())).features


def split_of(path: str) -> str:
    """The split a data file belongs to: ``data/{split}-i-of-n.parquet`` or ``arrow/{split}/…``."""
    parts = Path(path).parts
    return parts[1] if parts[0] == "arrow" else re.sub(r"-\d{5}-of-\d{5}\.parquet$", "", parts[-1])


def claim_output(out: Path, state_path: Path, rid: str, overwrite: bool) -> None:
    """Make ``out`` ours: empty, or a (possibly unfinished) earlier attempt of this very run."""
    marker = state_path / "run.json"
    holds_other = (out.exists() and any(out.iterdir()) and not (marker.exists() and json.loads(marker.read_text())["run_id"] == rid))
    if holds_other:
        if not overwrite:
            raise FileExistsError(f"{out} holds another run (different data, key or config); pass overwrite=True "
                                  f"(--overwrite) to replace it, or choose another output_dir")
        shutil.rmtree(out)
        shutil.rmtree(state_path, ignore_errors=True)
    if marker.exists() and json.loads(marker.read_text())["run_id"] != rid:
        shutil.rmtree(state_path)
    state_path.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(marker, json.dumps({"run_id": rid}).encode())


def load_output(out: Path) -> DatasetDict:
    """Read a protected folder back, whichever layout it was written in."""
    metadata = json.loads((out / METADATA_NAME).read_text())
    if metadata.get("output_format") == "arrow":
        from datasets import load_from_disk

        return load_from_disk(str(out / "arrow"))
    return read_fresh(out)


def read_fresh(folder: Path) -> DatasetDict:
    """``load_dataset(folder)``, rebuilding its Arrow cache: ``datasets`` may key the cache of
    two folders of the same name and layout alike, and would then serve stale rows."""
    return load_dataset(str(folder), download_mode="force_redownload")
