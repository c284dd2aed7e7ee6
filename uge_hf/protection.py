"""``protect``: a dataset in, a protected dataset folder out (a valid Hub dataset repo).

The pipeline: resolve and validate every split before any work (columns, labels, and one
pass that decodes every image, :mod:`uge_hf.data`); claim and lock the output and state
folders (:mod:`uge_hf.folder`); build the shared state once (resumable, in ``state_dir``);
cut each split into shards of whole batches; protect each shard on its own (shards are dealt
out to Accelerate processes) and write it under a temporary name, renamed when complete,
into the output's hidden staging folder; after a barrier, the main process checks that the
data changed, writes ``uge_hf.json`` and the dataset card, and only then moves the run into
place, replacing the run published there before (:func:`uge_hf.folder.publish_output`). A
rerun skips shards whose bytes match the recorded hash, so an interrupted run finishes with
the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Optional, Sequence, Union

import jinja2
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn as nn
from datasets import Dataset, DatasetDict, Image, IterableDataset, IterableDatasetDict, load_dataset

from . import __version__
from .card import public_config, public_efficacy, withheld_fields, write_card
from .config import ProtectConfig, advise
from .data import (check_color_mode, check_memory, decode_image, encode_png, find_columns, reencode_png, survey_images,
                   validate_labels, warn_mixed_sizes)
from .fitting import check_feature_space
from .folder import (MANIFEST_NAME, METADATA_NAME, RUN_FILES, STAGING_NAME, STATE_MARKER, claim_output, claim_state, discard_staging,
                     load_output, lock_folder, publish_output, published_run, read_fresh, read_metadata, shard_name, shards_by_split,
                     split_of, staged_path, write_metadata)
from .key import AuthorizedModel, authorized_keys
from .transform import UGETransform
from .utils import atomic_write, default_device, module_fingerprint, private_dir, progress_bar, sha256_file, temporary_name

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
            # datasets cannot hash the generator, so it draws a random fingerprint, and the run
            # id would differ on every rerun: no resume. The rows' bytes name it instead.
            digest = hashlib.sha256()
            for batch in split.data.table.to_batches():
                digest.update(batch.serialize())
            split._fingerprint = digest.hexdigest()[:16]
        out[name] = split
    return out


def run_id(keys: list[AuthorizedModel], config: ProtectConfig, datasets: dict[str, Dataset], columns: tuple[str, str], fit_split: str,
           layout: dict, feature_backbone: Optional[nn.Module]) -> str:
    """Identity of a run: what must match for a rerun to resume rather than be refused
    (``layout``: shard size, output format, what happens to the other splits).

    Keyed (HMAC-SHA256) with a secret drawn from the keys' weights, which only the protector
    holds: the output's manifest records the run id, and a tool other than ``uge-hf push``
    (``hf upload``) would publish it. Unkeyed, it is a hash of parts a reader can rebuild (the
    key hashes, the version, the columns, the source's fingerprint, the public config), so
    it would confirm a guess at what the card withholds (``match_every_key``)."""
    parts = [*(k.fingerprint for k in keys), config.to_json(), __version__, *columns, fit_split, json.dumps(layout, sort_keys=True),
             module_fingerprint(feature_backbone) or "none"]
    parts += [f"{name}:{ds._fingerprint}:{len(ds)}" for name, ds in sorted(datasets.items())]
    # Not the weights file itself as the HMAC key: HMAC shortens a long key to its sha256,
    # which is the key's public weights_sha256.
    secret = b"".join(k.secret_digest("run id") for k in keys)
    return hmac.new(secret, "/".join(parts).encode(), hashlib.sha256).hexdigest()


def shard_plan(num_rows: int, batch_size: int, shard_size: int) -> list[range]:
    """Rows cut into shards of whole batches, so a shard's bytes never depend on its neighbours."""
    per_shard = max(batch_size, shard_size // batch_size * batch_size)
    return [range(a, min(a + per_shard, num_rows)) for a in range(0, num_rows, per_shard)]


def protect_shard(transform: UGETransform, dataset: Dataset, rows: range, path: Path, verbose: bool) -> dict:
    """Protect ``rows`` of ``dataset`` into a parquet file at ``path`` (atomic). Returns its
    sha256 and how many of its pixel values differ from the clean ones, out of how many."""
    image_column, label_column = transform.image_column, transform.label_column
    feature = dataset.features[image_column]
    features = dataset.features.copy()
    features[image_column] = Image()
    part = dataset.select(rows).cast_column(image_column, Image(decode=False))
    batch_size = transform.batch_size
    columns: dict[str, list] = {name: [] for name in features}
    changed = total = 0
    bar = progress_bar(total=len(rows), desc=path.name, unit="img", verbose=verbose, leave=False)
    for start in range(0, len(part), batch_size):
        batch = part[start:start + batch_size]
        clean = [transform.pixels(decode_image(item, rows[start + i], image_column, feature)) for i, item in enumerate(batch[image_column])]
        protected = transform.perturb(clean, torch.as_tensor(batch[label_column]))
        changed += sum(int((p != c).sum()) for p, c in zip(protected, clean))
        total += sum(c.numel() for c in clean)
        batch[image_column] = [{"bytes": encode_png(p.numpy()), "path": None} for p in protected]
        for name in features:
            columns[name].extend(batch[name])
        bar.update(len(protected))
    bar.close()
    table = pa.Table.from_pydict(columns, schema=features.arrow_schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temporary_name(path.name))
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return {"sha256": sha256_file(path), "changed": changed, "values": total}


def protect(dataset: DatasetLike, key: AuthorizedModel | Sequence[AuthorizedModel], config: Optional[ProtectConfig] = None, *, output_dir: Optional[str | os.PathLike] = None,
            splits: Optional[Sequence[str]] = None, other_splits: str = "copy", fit_split: Optional[str] = None,
            image_column: Optional[str] = None, label_column: Optional[str] = None, feature_backbone: Optional[nn.Module] = None,
            shard_size: int = 5000, output_format: str = "parquet", state_dir: Optional[str | os.PathLike] = None,
            overwrite: bool = False, card_template: Optional[str | os.PathLike] = None, efficacy: Optional[dict] = None,
            source: Optional[dict] = None, disclose_key_architecture: bool = False, verbose: bool = True) -> DatasetDict:
    """Protect ``dataset`` for ``key`` (or several keys) and write it to ``output_dir`` as a
    Hub dataset repo.

    Args:
        dataset: a ``Dataset``, ``DatasetDict``, ``IterableDataset`` (a Hub stream), a local
            folder or a Hub id. Images in any mode ``datasets`` decodes to 8 or 16 bits per
            channel, as ``datasets`` shows them (EXIF orientation applied).
        key: the authorized model, or a list of them: one protected release that each of
            several partners, each with a key of its own (any registered architectures, the
            same classes and channels), can learn from. The state holds one trajectory per
            key; the search matches the keys' gradients in turn.
        config: a :class:`ProtectConfig` (default: the benchmarked setting).
        output_dir: where ``data/{split}-{i:05d}-of-{n:05d}.parquet``, ``README.md`` and
            ``uge_hf.json`` go: a new or empty folder, or one an earlier attempt of this very
            run wrote (it resumes). ``None``: a temporary folder under ``tempfile.gettempdir()``,
            which stays (the returned dataset reads its files; delete it when done), while
            the state is deleted after the run.
        splits: splits to protect (default: all). ``other_splits="copy"`` writes the rest
            with the same pixels but re-encoded as PNG (no metadata, no paths), ``"drop"``
            leaves them out.
        fit_split: the split the shared state is built on (default: "train" if protected,
            else the first protected split).
        shard_size: rows per shard, rounded down to whole batches.
        output_format: ``"parquet"`` (``load_dataset(output_dir)``) or ``"arrow"``
            (``save_to_disk`` layout in ``output_dir/arrow``, for ``load_from_disk``).
        state_dir: where the shared state and progress live (default ``<output_dir>.uge-state``),
            owner-only (0700). It holds the key's trajectory, θ0 included: never publish it.
        overwrite: replace another uge-hf run's files in ``output_dir`` and ``state_dir``.
            Only files uge-hf recorded as its own are ever deleted, and those of
            ``output_dir`` only once the new run is complete (until then it writes into the
            hidden ``.uge_hf_partial/``); a folder holding anything else is refused even
            with ``overwrite``.
        disclose_key_architecture: record each key's architecture and class count in the
            public card and ``uge_hf.json``, and ``match_every_key``, which otherwise stays in
            the state folder only (its value hints whether several keys differ in
            architecture, :data:`uge_hf.card.ARCHITECTURE_HINTS`). Off by default: whoever
            knows the architecture holds most of what the key gives (README, threat model).

    Returns:
        The protected ``DatasetDict``, read back from ``output_dir``.

    Warns ``uge_hf.LargeDatasetWarning``, before any work, when the protected splits together
    have too many rows for ``config``'s gradient matching to keep the key (``ProtectConfig.preset("large")``
    holds more of it), and ``uge_hf.MixedKeysWarning`` when keys of different architectures take
    turns in it (``match_every_key=True`` serves each about as it is served alone; :func:`uge_hf.config.advise`).

    Raises:
        ValueError: bad input (columns, labels, an image that cannot work, naming its row;
            a ``state_dir`` inside ``output_dir``), found before any work; nothing is written.
        FileExistsError: ``output_dir`` or ``state_dir`` holds files uge-hf did not write, or
            another run without ``overwrite``.
        uge_hf.folder.RunInProgressError: another uge-hf process holds one of the folders.
        RuntimeError: the run left some split's pixels unchanged; nothing is published as
            protected.

    Example:
        >>> from datasets import load_dataset
        >>> from uge_hf import AuthorizedModel, ProtectConfig, protect
        >>> ds = load_dataset("../shared/data/cifar10", split="train[:500]")  # doctest: +SKIP
        >>> key = AuthorizedModel.create("convnet", num_classes=10)
        >>> out = protect(ds, key, ProtectConfig.preset("fast"), output_dir="cifar10-uge")  # doctest: +SKIP
    """
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    config = config or ProtectConfig()
    check_feature_space(config, feature_backbone)
    if not config.lambda_fd:  # allowed for ablations, but never silently published as protection
        warnings.warn("lambda_fd=0: nothing misaligns the features, so every model learns from this output as from the clean "
                      "data (measured: hackers keep 1.00 of their accuracy); it is not protected. Keep lambda_fd > 0 to protect",
                      stacklevel=2)
    if output_format not in ("parquet", "arrow"):
        raise ValueError(f"output_format must be 'parquet' or 'arrow', not {output_format!r}")
    if other_splits not in ("copy", "drop"):
        raise ValueError(f"other_splits must be 'copy' or 'drop', not {other_splits!r}")
    if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive number of rows, not {shard_size!r}")
    template_text = None  # read now, rendered at the end of the run: checked now
    if card_template is not None:
        if not Path(card_template).is_file():
            raise FileNotFoundError(f"card_template {card_template} is not a file; pass a Jinja template's path "
                                    "(uge_hf.card.render_card lists what it receives), or leave it out for uge-hf's")
        template_text = Path(card_template).read_text()
        try:
            jinja2.Environment().parse(template_text)
        except jinja2.TemplateSyntaxError as error:
            raise ValueError(f"card_template {card_template}, line {error.lineno}: {error.message}; fix the template") from None
    keys = authorized_keys(key)
    key = keys[0]  # the keys share classes and channels
    data = resolve_dataset(dataset)
    splits = list(splits) if splits is not None else list(data)
    if not splits:
        raise ValueError(f"splits is empty: nothing to protect; name at least one of: {', '.join(data)}")
    missing = [s for s in splits if s not in data]
    if missing:
        raise ValueError(f"split(s) {missing} not found; the dataset has: {', '.join(data)}; choose splits from those")
    columns = None
    for name in splits:  # the cheap checks, on every process alike
        found = find_columns(data[name], image_column, label_column)
        if columns is not None and found != columns:
            raise ValueError(f"split {name!r} uses columns {found}, others {columns}; name the image and label columns")
        columns = found
        if len(data[name]) == 0:
            raise ValueError(f"split {name!r} is empty: nothing to protect; leave it out of the splits to protect")
        validate_labels(data[name], columns[1], key.num_classes)
    fit_split = fit_split or ("train" if "train" in splits else splits[0])
    if fit_split not in splits:
        raise ValueError(f"fit_split {fit_split!r} is not among the protected splits {splits}")
    # A partner may train on every protected split together: their rows are what the key must withstand.
    advise(sum(len(data[s]) for s in splits), keys, config)
    copied = [s for s in data if s not in splits] if other_splits == "copy" else []
    for name in copied:
        find_columns(data[name], columns[0], None if columns[1] not in data[name].features else columns[1])
    layout = {"shard_size": shard_size, "output_format": output_format, "copied": copied}
    rid = run_id(keys, config, {s: data[s] for s in splits + copied}, columns, fit_split, layout, feature_backbone)
    jobs = []
    for name in splits:
        plan = shard_plan(len(data[name]), config.batch_size, shard_size)
        jobs += [(name, i, len(plan), rows) for i, rows in enumerate(plan)]
    copy_counts = {name: max(1, math.ceil(len(data[name]) / shard_size)) for name in copied}
    files = [*RUN_FILES, *(shard_name(n, i, c) for n, i, c, _ in jobs),
             *(shard_name(n, i, c) for n, c in copy_counts.items() for i in range(c))]

    temporary_state = state_dir is None and output_dir is None
    # Resolved, so that "." or ".." have a name for the state folder beside them.
    out = Path(output_dir).resolve() if output_dir is not None else None
    if out is not None and out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir {output_dir} is a file, not a folder; choose a new or empty folder (--out)")
    state_path = Path(state_dir) if state_dir is not None else (
        Path(tempfile.mkdtemp(prefix="uge-hf-state-")) if temporary_state else out.with_name(out.name + ".uge-state"))
    if state_path.exists() and not state_path.is_dir():
        raise FileExistsError(f"state_dir {state_path} is a file, not a folder; pass a new or empty folder as state_dir (the CLI "
                              "puts it beside the output as OUT.uge-state: choose another --out, or move that file away)")
    state_at = state_path.resolve()
    if out is not None and (state_at.is_relative_to(out) or out.is_relative_to(state_at)):
        # The output folder is what gets published; a state inside it would publish θ0.
        raise ValueError(f"state_dir {state_dir} and output_dir {output_dir} overlap: the state holds θ0 and the output folder "
                         "is what you publish; choose a state_dir outside the output folder (the CLI puts it beside it, "
                         "as OUT.uge-state)")
    for folder in [k.folder for k in keys if k.folder is not None]:  # it goes to a partner: no output, no state (clean rows, θ0)
        inside = [f"{name} {path}" for name, path, at in (("output_dir", output_dir, out), ("state_dir", state_path, state_at))
                  if at is not None and at.is_relative_to(folder)]
        if inside:
            raise ValueError(f"{' and '.join(inside)} {'lies' if len(inside) == 1 else 'lie'} inside the key folder {folder}, which "
                             "you give to a partner: it would carry the protected data or the state (clean rows, θ0's trajectory); "
                             "choose an output_dir (--out) and state_dir outside it")
    out = out or Path(tempfile.mkdtemp(prefix="uge-hf-"))
    # cpu=True on a machine without GPUs turns N launched processes into a gloo group.
    accelerator = PartialState(cpu=not torch.cuda.is_available())
    locks = ExitStack()
    try:
        # Everything that can refuse the run happens here, on the main process, before any
        # work; the verdict goes to every process, so they all stop alike.
        failure = None
        if accelerator.is_main_process:
            try:
                surveys = {name: survey_images(data[name], columns[0], resize=config.resize, verbose=verbose) for name in splits}
                for name, survey in surveys.items():
                    check_color_mode(survey, key.in_channels, name)
                    warn_mixed_sizes(survey, name, config.resize)
                check_memory(surveys[fit_split], batch_size=config.batch_size, channels=key.in_channels,
                             fit_rows=min(len(data[fit_split]), config.fit_sample or len(data[fit_split])),
                             per_sample=config.search_steps > 0, resize=config.resize,
                             device=default_device())
                for name in copied:  # copied splits are re-encoded at the end: they must decode too
                    survey_images(data[name], columns[0], resize=(1, 1), verbose=verbose)
                claim_folders(locks, out, state_path, rid, files, ["arrow"] if output_format == "arrow" else [], overwrite)
            except (ValueError, OSError, RuntimeError) as error:
                failure = error
        failure = broadcast_object_list([failure])[0]
        if failure is not None:
            raise failure

        # Shared state: built once, by every process together (each optimization step is shared
        # out, parallel.py), so each holds the same copy; resumable; the main process saves it.
        final_state = state_path / "state"
        if (final_state / "state.json").exists():
            transform = UGETransform.from_pretrained(final_state, feature_backbone=feature_backbone)
        else:
            transform = UGETransform._fit(data[fit_split], keys, config, image_column=columns[0], label_column=columns[1],
                                          feature_backbone=feature_backbone, cache_dir=state_path / "cache", verbose=verbose)
            if accelerator.is_main_process:
                transform.save_pretrained(final_state)
                atomic_write(state_path / "build.json", json.dumps({"processes": accelerator.num_processes,
                                                                    "phases_s": transform.state.timings}).encode(), private=True)
        accelerator.wait_for_everyone()

        # Shards, dealt round-robin to processes, written into the staging folder (published
        # when all are done); each is skipped if already complete, staged or (a rerun of a
        # finished run) in place.
        progress_dir = private_dir(state_path / "progress")
        progress_record = lambda name, i: progress_dir / f"{name}-{i:05d}.json"  # what a finished shard records
        same_run = published_run(out) == rid
        located = lambda rel: staged_path(out, rel) if staged_path(out, rel).exists() or not same_run else out / rel
        mine = jobs[accelerator.process_index::accelerator.num_processes]
        for name, i, count, rows in progress_bar(mine, desc="protect shards", unit="shard", verbose=verbose):
            path, record = located(shard_name(name, i, count)), progress_record(name, i)
            if path.exists() and record.exists() and json.loads(record.read_text())["sha256"] == sha256_file(path):
                continue
            started = time.time()
            written = protect_shard(transform, data[name], rows, staged_path(out, shard_name(name, i, count)), verbose)
            atomic_write(record, json.dumps({**written, "rows": [rows.start, rows.stop], "process": accelerator.process_index,
                                             "started": started, "finished": time.time()}).encode(), private=True)
        accelerator.wait_for_everyone()

        if accelerator.is_main_process:
            records = {(n, i): json.loads(progress_record(n, i).read_text()) for n, i, _, _ in jobs}
            perturbed = {s: sum(r["changed"] for (n, _), r in records.items() if n == s) /
                         sum(r["values"] for (n, _), r in records.items() if n == s) for s in splits}
            unchanged = [s for s, fraction in perturbed.items() if fraction == 0]
            if unchanged:  # its shards are clean copies: none may stay, nor be published
                discard_staging(out)
                for n, i, _, _ in jobs:
                    progress_record(n, i).unlink(missing_ok=True)
                raise RuntimeError(f"protecting split(s) {unchanged} left every pixel unchanged, so nothing would be protected; "
                                   "refusing to publish it as protected (its shards are removed). Check the config's step_size, "
                                   f"epsilon and loss weights ({config.to_json()})")
            shards = {shard_name(n, i, c): records[(n, i)]["sha256"] for n, i, c, _ in jobs}
            for name, count in copy_counts.items():
                reencoded = clean_copy(data[name], columns[0])
                for i in range(count):
                    path = staged_path(out, shard_name(name, i, count))
                    path.parent.mkdir(parents=True, exist_ok=True)  # a rerun may have staged no protected shard
                    tmp = path.with_name(temporary_name(path.name))
                    reencoded.shard(count, i, contiguous=True).to_parquet(str(tmp))
                    os.replace(tmp, path)
                    shards[shard_name(name, i, count)] = sha256_file(path)
            key_records = [{"fingerprint": k.fingerprint, "weights_sha256": k.weights_file_sha256,
                            **({"architecture": k.architecture, "num_classes": k.num_classes, "in_channels": k.in_channels}
                               if disclose_key_architecture else {})} for k in keys]
            # No run id here: it hashes the whole config with parts a reader can rebuild, so it would
            # give a withheld field away; the manifest, never published, keeps it.
            withheld = withheld_fields(disclose_key_architecture)
            metadata = {
                "uge_hf_version": __version__, "method": "Ungeneralizable Examples (UGE), arXiv 2404.14016",
                "keys": key_records, "config": public_config(config, withheld), "withheld": withheld, "image_column": columns[0],
                "label_column": columns[1],
                "protected_splits": splits, "copied_splits": copied, "fit_split": fit_split,
                "num_rows": {s: len(data[s]) for s in splits + copied}, "perturbed_fraction": perturbed,
                "state_fingerprint": transform.state.fingerprint, "generator_fingerprint": transform.state.generator_fingerprint,
                "shards": dict(sorted(shards.items())), "source": source, "efficacy": public_efficacy(efficacy, disclose_key_architecture),
                "output_format": output_format,
                "card_template": template_text,  # kept (it is the public card's layout) so that a card rendered later keeps it
            }
            staging = out / STAGING_NAME
            if output_format == "arrow":  # every parquet shard is staged: a published arrow run keeps none
                arrow_dir = staging / "arrow"
                splits_read, by_split = read_fresh(staging, shards), shards_by_split(shards)
                for name, split in splits_read.items():
                    # datasets fingerprints a freshly loaded split from its files' paths and times,
                    # and save_to_disk records it: pin it to the shards' hashes, so equal runs
                    # write equal bytes (it only keys datasets' cache).
                    split._fingerprint = hashlib.sha256("".join(shards[p] for p in by_split[name]).encode()).hexdigest()[:16]
                splits_read.save_to_disk(str(arrow_dir))
                shutil.rmtree(staging / "data")
                metadata["shards"] = {p.relative_to(staging).as_posix(): sha256_file(p) for p in sorted(arrow_dir.rglob("*")) if p.is_file()}
            metadata["num_bytes"] = {s: sum(located(p).stat().st_size for p in metadata["shards"] if split_of(p) == s) for s in splits + copied}
            # A rerun of this very run keeps what evaluate recorded. The shards tell whether the
            # uge_hf.json in place is this run's: after an --overwrite killed mid-move the
            # manifest names this run while the replaced run's uge_hf.json is still there.
            published = read_metadata(out) if efficacy is None and same_run and (out / METADATA_NAME).is_file() else {}
            if published.get("shards") == metadata["shards"]:
                metadata["efficacy"] = public_efficacy(published.get("efficacy"), disclose_key_architecture)
            write_metadata(staging, metadata)
            write_card(staging, metadata, data[splits[0]].features)  # with metadata["card_template"]
            publish_output(out)  # only now does the run published here before give way
        accelerator.wait_for_everyone()
        return load_output(out)
    finally:
        locks.close()
        if temporary_state and accelerator.is_main_process:
            shutil.rmtree(state_path, ignore_errors=True)  # θ0 must not outlive a run nobody can resume


def claim_folders(locks: ExitStack, out: Path, state_path: Path, rid: str, files: list[str], dirs: list[str], overwrite: bool) -> None:
    """Create, lock and claim the output and state folders (:mod:`uge_hf.folder`); a refusal
    leaves no folder behind that was not there before."""
    created = [p for p in (out, state_path) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock_folder(locks, out, f"{STAGING_NAME}/{MANIFEST_NAME}")
        state_path.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_folder(locks, state_path, STATE_MARKER)
        takes = [claim_output(out, rid, files, dirs, overwrite), claim_state(state_path, rid, overwrite)]
    except BaseException:
        locks.close()
        for path in created:
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        raise
    for take in takes:  # every check passed: only now does anything change on disk
        take()


def clean_copy(dataset: Dataset, image_column: str) -> Dataset:
    """A split copied unprotected: the pixels ``datasets`` shows, re-encoded as PNG with no
    metadata (EXIF, text chunks) and no path, since an ``Image`` path may name a file on the
    protector's disk and the original file's metadata may name its author."""
    feature = dataset.features[image_column]

    def reencode(batch, indices):
        return {image_column: [reencode_png(item, row, image_column, feature) for item, row in zip(batch[image_column], indices)]}

    raw = dataset.cast_column(image_column, Image(decode=False))
    return raw.map(reencode, batched=True, with_indices=True, desc="copy split").cast_column(image_column, Image())
