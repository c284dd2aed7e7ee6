"""Publishing to and consuming from the Hugging Face Hub.

``push_to_hub`` uploads a protected folder's shards, card and metadata in one commit (the
private shared state never leaves the machine); ``load_protected`` fetches a protected
dataset, checks the key and every shard against the card, and returns the data with the
key model ready to train. Tokens come from ``huggingface_hub``'s usual places
(``HF_TOKEN``, ``hf auth login``) and are never written anywhere.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch.nn as nn
from datasets import DatasetDict
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, DatasetCard, HfApi, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

from .card import render_card
from .folder import (CARD_NAME, DATA_FOLDERS, FIGURE_NAME, RUN_FILES, TamperedShardError, check_card, check_complete,
                     folder_features, has_figure, load_output, read_metadata, shards_by_split, unlisted_files)
from .key import AuthorizedModel, looks_like_repo_id, refuse_public_repo
from .utils import sha256_file


class KeyMismatchError(ValueError):
    """The key's weight hash differs from the one the dataset card records."""


def published_files(folder: Path) -> list[str]:
    """What a protected folder publishes, relative to it: the card, ``uge_hf.json``, the
    efficacy figure if uge-hf drew one there, and the data files listed in the metadata (never the
    shared state, which holds θ0, nor anything else in the folder)."""
    names = [*RUN_FILES] + ([FIGURE_NAME] if has_figure(folder) else [])
    return names + sorted(read_metadata(folder)["shards"])


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool = True, revision: Optional[str] = None,
                token: Optional[str] = None, commit_message: str = "Upload UGE-protected dataset") -> str:
    """Push a folder written by :func:`uge_hf.protect` to a Hub dataset repo in one commit.

    The card is re-rendered with ``repo_id`` so its loading snippet is copy-paste ready. The
    commit replaces the repo's data files (under ``data/`` and ``arrow/``) with exactly this
    run's, so no earlier run's shard lingers beside them; other files of the repo stay.
    Private by default: pushing into an existing *public* repo is refused unless
    ``private=False`` says that publishing is meant. Returns the commit URL.

    Raises:
        FileNotFoundError: ``folder`` was not written by :func:`uge_hf.protect`.
        TamperedShardError: a data file differs from its recorded hash, or is not listed.
        PermissionError: the repo exists, is public, and ``private=True``.

    Example:
        >>> push_to_hub("cifar10-uge", "acme/cifar10-uge")  # doctest: +SKIP
    """
    folder = Path(folder)
    check_card(folder)  # the card pushed is rendered afresh: edits to README.md would be lost
    metadata = read_metadata(folder)
    check_shards(folder, metadata)
    card = render_card(metadata, folder_features(folder), repo_id=repo_id)
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    if private:
        refuse_public_repo(api, repo_id, "dataset", "push_to_hub(..., private=False) (uge-hf push --public)")
    if revision is not None:
        api.create_branch(repo_id, repo_type="dataset", branch=revision, exist_ok=True)
    names = published_files(folder)
    stale = [f for f in api.list_repo_files(repo_id, repo_type="dataset", revision=revision)
             if (f.split("/")[0] in DATA_FOLDERS or f == FIGURE_NAME) and f not in names]
    operations = [CommitOperationDelete(f) for f in stale] + [CommitOperationAdd(CARD_NAME, str(card).encode())]
    operations += [CommitOperationAdd(name, str(folder / name)) for name in names[1:]]
    info = api.create_commit(repo_id, operations, repo_type="dataset", revision=revision, commit_message=commit_message)
    return info.commit_url


def check_shards(folder: Path, metadata: dict) -> int:
    """Compare every data file's sha256 with ``uge_hf.json``, naming the first that differs,
    and refuse any file the metadata does not account for (``load_dataset`` would read an
    extra shard as if it were protected). Returns the number of data files checked."""
    check_complete(folder)  # a half-moved run would read as a tampered one
    unlisted = unlisted_files(folder, metadata)
    if unlisted:
        raise TamperedShardError(f"{folder} holds file(s) its uge_hf.json does not list: {', '.join(unlisted[:5])}; "
                                 "they were not protected by this run: remove them, or re-download the dataset")
    for name, expected in sorted(metadata["shards"].items()):
        path = folder / name
        if not path.exists():
            raise TamperedShardError(f"data file {name} is missing from {folder}")
        actual = sha256_file(path)
        if actual != expected:
            raise TamperedShardError(f"data file {name} was modified: sha256 {actual}, recorded {expected}; re-download it")
    return len(metadata["shards"])


def fetch(dataset: str | os.PathLike, revision: Optional[str], token: Optional[str]) -> Path:
    """A local folder for a protected dataset: the folder itself, or a Hub snapshot."""
    if Path(dataset).is_dir():
        return Path(dataset)
    if not looks_like_repo_id(str(dataset)):
        raise FileNotFoundError(f"no folder {dataset}: pass a folder written by `uge-hf protect`, or a Hub dataset id")
    try:
        return Path(snapshot_download(str(dataset), repo_type="dataset", revision=revision, token=token))
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"no folder {dataset} here, and no Hub dataset repo {str(dataset)!r} you can read (check the name, "
                                "and log in or set HF_TOKEN for a private repo)") from None
    except LocalEntryNotFoundError:  # offline, or the Hub unreachable, and nothing cached
        raise FileNotFoundError(f"no folder {dataset} here, and the Hub could not be reached to fetch {str(dataset)!r} (nor is a "
                                "copy cached): check the path, or your connection") from None


def card_record(folder: Path, metadata: dict) -> dict:
    """The ``uge_hf:`` block of the folder's dataset card, after checking that the card's
    ``configs`` (what ``load_dataset`` reads) name exactly the shards of ``metadata`` (its
    ``uge_hf.json``).

    Raises:
        FileNotFoundError: the folder has no card: not a protected dataset.
        TamperedShardError: the card points ``load_dataset`` at other files.
    """
    if not (folder / CARD_NAME).is_file():
        raise FileNotFoundError(f"{folder} has no {CARD_NAME} (the dataset card): not a folder written by uge_hf.protect")
    data = DatasetCard.load(folder / CARD_NAME).data.to_dict()
    block = data.get("uge_hf")
    if not block:
        raise ValueError(f"the dataset card in {folder} has no uge_hf block: not a UGE-protected dataset")
    expected = shards_by_split(metadata["shards"]) if metadata.get("output_format", "parquet") == "parquet" else None
    if (listed := card_data_files(data)) != expected:
        raise TamperedShardError(f"the dataset card's configs point load_dataset at {listed}, not at the protected shards "
                                 f"{expected}; the card was modified: re-download the dataset")
    return block


def card_data_files(card_data: dict) -> Optional[dict]:
    """``{split: sorted paths}`` of a card's ``configs``, as ``load_dataset`` would read them;
    ``None`` without configs; the raw value where it has another shape than uge-hf writes."""
    configs = card_data.get("configs")
    if configs is None:
        return None
    try:
        return {f["split"]: sorted([f["path"]] if isinstance(f["path"], str) else f["path"]) for c in configs for f in c["data_files"]}
    except (TypeError, KeyError):
        return configs


def verify(dataset: str | os.PathLike, authorized_model: Union[str, os.PathLike, AuthorizedModel], *, revision: Optional[str] = None,
           key_revision: Optional[str] = None, token: Optional[str] = None, trust_mismatch: bool = False) -> dict:
    """Check a key against a protected dataset's card (any of its keys, when it has several),
    and every data file against its hash.

    Returns ``{"folder", "key", "key_fingerprint", "key_index", "num_keys", "shards_checked"}``:
    ``key_index`` is which of the card's keys matched (0-based; ``None`` on a trusted mismatch).

    Raises:
        KeyMismatchError: the key's hash is none of the card's (both shown), unless
            ``trust_mismatch=True``.
        TamperedShardError: a data file was modified, is missing, or is not listed; the
            card's ``configs`` name other files than the protected shards; or the card and
            ``uge_hf.json`` disagree on the shards' or the keys' hashes.
        FileNotFoundError: ``dataset`` is no protected dataset (no card or ``uge_hf.json``).
    """
    folder = fetch(dataset, revision, token)
    metadata = read_metadata(folder)  # before the key: a folder that is no protected dataset fails first
    record = card_record(folder, metadata)
    if metadata["shards"] != record["shards"]:
        raise TamperedShardError("the shard hashes in uge_hf.json differ from those on the dataset card; the folder was modified")
    # The keys too, before any key is judged: an edit of one file alone must not authorize another key.
    for field, name in (("key_fingerprints", "fingerprint"), ("key_weights_sha256", "weights_sha256")):
        if field in record and record[field] != [k.get(name) for k in metadata.get("keys", [])]:
            raise TamperedShardError(f"the key hashes ({field}) in uge_hf.json differ from those on the dataset card; "
                                     "the folder was modified: re-download it, and ask the data owner which key is yours")
    key = authorized_model if isinstance(authorized_model, AuthorizedModel) else \
        AuthorizedModel.from_pretrained(authorized_model, revision=key_revision, token=token)
    recorded = record.get("key_fingerprints") or [record["key_fingerprint"]]  # one key, as uge-hf 0.1.0 wrote it
    index = recorded.index(key.fingerprint) if key.fingerprint in recorded else None
    if index is None:
        message = (f"the key does not match this dataset: its weight hash is {key.fingerprint}, the card records "
                   f"{' or '.join(recorded)}. Use the checkpoint the data owner gave you")
        if not trust_mismatch:
            raise KeyMismatchError(message + " (or, in Python, load_protected(..., trust_mismatch=True) to load anyway)")
        warnings.warn(message + "; loading anyway because trust_mismatch=True: the model will not learn from this data", stacklevel=2)
    elif "key_weights_sha256" in record and record["key_weights_sha256"][index] != key.weights_file_sha256:
        raise TamperedShardError(f"the key's weight hash is the card's key {index + 1}, but its file hash "
                                 f"{key.weights_file_sha256} is not the one recorded beside it; the card was modified")
    return {"folder": folder, "key": key, "key_fingerprint": key.fingerprint, "key_index": index, "num_keys": len(recorded),
            "shards_checked": check_shards(folder, metadata)}


def load_protected(dataset: str | os.PathLike, authorized_model: Union[str, os.PathLike, AuthorizedModel], *, revision: Optional[str] = None,
                   key_revision: Optional[str] = None, token: Optional[str] = None, trust_mismatch: bool = False) -> tuple[DatasetDict, nn.Module]:
    """Load a protected dataset (local folder or Hub id) with its key, after checking both.

    Returns the ``DatasetDict`` and the key model at θ0, ready for :func:`uge_hf.train_authorized`.

    Example:
        >>> ds, model = load_protected("acme/cifar10-uge", authorized_model="acme/cifar10-key")  # doctest: +SKIP
    """
    checked = verify(dataset, authorized_model, revision=revision, key_revision=key_revision, token=token, trust_mismatch=trust_mismatch)
    return load_output(checked["folder"]), checked["key"].build()
