"""The protected folder and the private state folder: their layout, who owns which file, and
the lock a run holds on them.

uge-hf deletes only what it recorded as its own. A protected folder carries a manifest
(``.uge_hf_manifest.json``: the run, the files and folders it writes, the writer's pid); a
state folder carries ``run.json`` and holds nothing but uge-hf's own entries. A folder with
anything else in it is refused, with ``overwrite`` or without, and its contents named. A run
holds an exclusive lock (``flock``) on both folders from its claim to its end, so a second
run on the same folders is refused with the holder's pid instead of racing it.

Names read from a folder's metadata (which may have been downloaded) are checked to stay
inside ``data/`` or ``arrow/`` before any file is opened.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from contextlib import ExitStack
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Optional

from datasets import DatasetDict, load_dataset

from .utils import atomic_write, foreign_entries, is_temporary_of, private_dir, sha256_file

METADATA_NAME = "uge_hf.json"
CARD_NAME = "README.md"
FIGURE_NAME = "efficacy.png"
MANIFEST_NAME = ".uge_hf_manifest.json"
# Where a run writes until it is complete (folder.claim_output); hidden, so load_dataset never reads it.
STAGING_NAME = ".uge_hf_partial"
DATA_FOLDERS = ("data", "arrow")
# What protect writes in a protected folder besides the data files its metadata lists; the
# figure is evaluate --update-card's (record_figure).
RUN_FILES = (CARD_NAME, METADATA_NAME)
PUBLIC_FILES = (*RUN_FILES, FIGURE_NAME)
STATE_MARKER = "run.json"
STATE_ENTRIES = (STATE_MARKER, "build.json", "state", "cache", "progress")


class RunInProgressError(RuntimeError):
    """Another uge-hf process holds the folder's lock."""


class TamperedShardError(ValueError):
    """A data file's sha256 differs from the one recorded when it was protected, or the
    folder's metadata or card names data files other than the protected ones."""


# -- layout -------------------------------------------------------------------------------

def shard_name(split: str, index: int, count: int) -> str:
    return f"data/{split}-{index:05d}-of-{count:05d}.parquet"


def split_of(path: str) -> str:
    """The split a data file belongs to: ``data/{split}-i-of-n.parquet`` or ``arrow/{split}/…``."""
    parts = PurePosixPath(path).parts
    return parts[1] if parts[0] == "arrow" else re.sub(r"-\d{5}-of-\d{5}\.parquet$", "", parts[-1])


def shards_by_split(shards: Iterable[str]) -> dict[str, list[str]]:
    """Data-file names grouped by their split (:func:`split_of`), each group sorted, splits in
    the order their first file sorts."""
    names = sorted(shards)
    return {split: [n for n in names if split_of(n) == split] for split in dict.fromkeys(map(split_of, names))}


def is_data_file_name(name: object) -> bool:
    """Whether ``name`` is a relative path inside the folder's ``data/`` or ``arrow/``: no
    absolute path, ``..``, backslash or unnormalized part."""
    if not isinstance(name, str):
        return False
    path = PurePosixPath(name)
    return not ("\\" in name or path.is_absolute() or len(path.parts) < 2 or path.parts[0] not in DATA_FOLDERS
                or any(part in ("", ".", "..") for part in path.parts) or str(path) != name)


def check_data_file_name(name: str) -> str:
    """Refuse a data-file name that could point outside the folder's ``data/`` or ``arrow/``
    (an absolute path, ``..``, a device file): metadata may come from a download.

    Raises:
        TamperedShardError: naming the entry.
    """
    if not is_data_file_name(name):
        raise TamperedShardError(f"the metadata lists a data file {name!r} outside data/ or arrow/; refusing to open it: "
                                 "the folder's uge_hf.json was tampered with")
    return name


def is_protected_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a run of :func:`uge_hf.protect` (its manifest, or a ``uge_hf.json``
    that lists keys and shards: a download has no manifest)."""
    if (folder / MANIFEST_NAME).is_file():
        return True
    try:
        metadata = json.loads((folder / METADATA_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(metadata, dict) and {"keys", "shards"} <= set(metadata)


def read_metadata(folder: str | os.PathLike) -> dict:
    """``uge_hf.json`` of a protected folder, its data-file names checked (:func:`check_data_file_name`).

    Raises:
        FileNotFoundError: the folder was not written by :func:`uge_hf.protect`, or holds
            only a run that has not finished.
    """
    path = Path(folder) / METADATA_NAME
    if not path.is_file() and (Path(folder) / STAGING_NAME).is_dir():
        raise FileNotFoundError(f"{folder} holds an unfinished uge-hf run and nothing protected yet (a run puts its files in "
                                "place once complete): rerun the same protect command to finish it")
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {METADATA_NAME}: not a folder written by uge_hf.protect")
    metadata = json.loads(path.read_text())
    for name in metadata.get("shards", {}):
        check_data_file_name(name)
    return metadata


def write_metadata(folder: Path, metadata: dict) -> None:
    """Write ``uge_hf.json`` (atomically, keys sorted, so equal runs give equal bytes)."""
    atomic_write(folder / METADATA_NAME, (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode())


def load_output(folder: str | os.PathLike) -> DatasetDict:
    """Read a protected folder back, whichever layout it was written in.

    Raises:
        TamperedShardError: the Arrow layout's own files name a split or data file that the
            metadata does not list (they may have come with a download).
    """
    folder = Path(folder)
    metadata = read_metadata(folder)
    if metadata.get("output_format") == "arrow":
        from datasets import load_from_disk

        check_arrow_files(folder, metadata["shards"])
        return load_from_disk(str(folder / "arrow"))
    return read_fresh(folder, metadata["shards"])


def check_arrow_files(folder: Path, shards: Iterable[str]) -> None:
    """``load_from_disk`` opens the splits that ``arrow/dataset_dict.json`` names and the files
    that each split's ``state.json`` names, as they are: refuse any but the listed ``shards``
    (whose names :func:`read_metadata` checked and whose hashes ``verify`` checks)."""
    listed = set(shards)
    tampered = lambda what: TamperedShardError(f"{folder / 'arrow'} names {what}, which uge_hf.json does not list; refusing to "
                                               "open it: the folder was tampered with")
    splits = json.loads((folder / "arrow" / "dataset_dict.json").read_text()).get("splits", [])
    for split in splits:
        if not isinstance(split, str) or not any(n.startswith(f"arrow/{split}/") for n in listed):
            raise tampered(f"a split {split!r}")
        for entry in json.loads((folder / "arrow" / split / "state.json").read_text()).get("_data_files", []):
            name = entry.get("filename") if isinstance(entry, dict) else None
            if not isinstance(name, str) or f"arrow/{split}/{name}" not in listed:
                raise tampered(f"a data file {name!r} of split {split!r}")


def read_fresh(folder: Path, shards: Iterable[str]) -> DatasetDict:
    """The folder's parquet ``shards`` (names as ``uge_hf.json`` lists them; never the card's
    ``configs``, which a download may point elsewhere), with the Arrow cache rebuilt:
    ``datasets`` may key the cache of two folders of the same name and layout alike, and
    would then serve stale rows."""
    data_files = {split: [str(folder / n) for n in names] for split, names in shards_by_split(shards).items()}
    return load_dataset("parquet", data_files=data_files, download_mode="force_redownload")


def folder_features(folder: Path):
    """The ``datasets`` features of a protected folder's splits."""
    return next(iter(load_output(folder).values())).features


def unlisted_files(folder: Path, metadata: dict) -> list[str]:
    """Files of a published protected folder that its metadata does not account for: a data
    file slipped in beside the protected shards is loaded by ``load_dataset`` all the same.
    A run in progress's hidden staging folder is not counted, nor a killed writer's temporary
    file of the card, metadata, figure or manifest: nothing loads or publishes them."""
    allowed = set(metadata["shards"]) | set(PUBLIC_FILES) | {MANIFEST_NAME, ".gitattributes"}
    # A temporary file of the card, metadata, figure or manifest, left by a writer killed here:
    # no data, nothing published, and the next run removes it.
    leftover = lambda rel: any(is_temporary_of(rel, name) for name in (*PUBLIC_FILES, MANIFEST_NAME))
    return sorted(rel for rel in _outside_staging(folder) if rel not in allowed and not rel.startswith(".cache/") and not leftover(rel))


def _walk(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()]


# -- ownership ----------------------------------------------------------------------------

def _owned(out: Path) -> Optional[dict]:
    """What uge-hf recorded as its own in ``out``: ``{"run_id", "files", "dirs"}``, or None.

    Raises:
        TamperedShardError: the manifest names an entry uge-hf never writes (it may have come
            with a download): nothing it lists is deleted or trusted.
    """
    manifest = out / MANIFEST_NAME
    if manifest.is_file():
        return _checked_manifest(manifest)
    if (out / METADATA_NAME).is_file():  # written by uge-hf 0.1.0, before manifests: its metadata lists its files
        metadata = read_metadata(out)
        return {"run_id": metadata.get("run_id"), "files": [CARD_NAME, METADATA_NAME, *metadata["shards"]], "dirs": []}
    return None


def _checked_manifest(path: Path) -> dict:
    """The manifest at ``path``, every entry one that uge-hf writes: a file of
    :data:`PUBLIC_FILES` or under ``data/`` or ``arrow/``, a folder of :data:`DATA_FOLDERS`.
    Overwriting deletes what a manifest lists, so a crafted one must not name anything else."""
    try:
        record = json.loads(path.read_text())
    except ValueError:
        record = None
    is_file = lambda n: n in PUBLIC_FILES or is_data_file_name(n)
    is_dir = lambda n: n in DATA_FOLDERS
    if not (isinstance(record, dict) and isinstance(record.get("run_id"), str) and isinstance(record.get("files"), list)):
        bad = ["not a JSON object with a run_id and files"]
    else:
        lists = {key: record.get(key, []) for key in ("files", "stale", "dirs", "stale_dirs")}
        bad = [f"{key} is not a list" for key, names in lists.items() if not isinstance(names, list)]
        bad += [repr(n) for key, names in lists.items() if isinstance(names, list)
                for n in names if not (is_dir if key.endswith("dirs") else is_file)(n)]
    if bad:
        raise TamperedShardError(f"{path} lists what uge-hf never writes ({_listing(bad)}), so it was not written by uge-hf as it "
                                 "is (a download may carry one); nothing it names is deleted. Choose another output_dir (--out), "
                                 "or remove that folder's files by hand")
    return record


def _recorded(record: Optional[dict]) -> tuple[set[str], list[str]]:
    return (set(record["files"]), record.get("dirs", [])) if record else (set(), [])


def _is_ours(rel: str, files: set[str], dirs: Iterable[str]) -> bool:
    if rel in files or rel == MANIFEST_NAME or any(rel.startswith(d + "/") for d in dirs):
        return True
    path = PurePosixPath(rel)
    return any(is_temporary_of(path.name, PurePosixPath(f).name) and PurePosixPath(f).parent == path.parent
               for f in files | {MANIFEST_NAME})


def _is_leftover(rel: str, files: set[str], dirs: Iterable[str]) -> bool:
    """A killed writer's temporary file: ours (:func:`_is_ours`), but no recorded file."""
    return rel not in files and rel != MANIFEST_NAME and not any(rel.startswith(d + "/") for d in dirs)


def _listing(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _outside_staging(out: Path) -> list[str]:
    return [rel for rel in _walk(out) if PurePosixPath(rel).parts[0] != STAGING_NAME]


def record_figure(out: Path) -> Path:
    """Where ``uge-hf evaluate --update-card`` draws the efficacy figure of the protected folder
    ``out``, recorded in the folder's manifest as uge-hf's before it is drawn (so that a later
    run may replace it, and :func:`has_figure` lets it be published), with no hash until
    :func:`record_hashes` records the one drawn: a figure put there after an interrupted
    drawing is not taken for uge-hf's.

    Raises:
        FileExistsError: ``out`` holds an ``efficacy.png`` that uge-hf did not write.
    """
    record = _owned(out) or {"files": [], "dirs": []}
    figure = out / FIGURE_NAME
    if (figure.exists() or figure.is_symlink()) and not _figure_is_ours(record, figure):
        raise FileExistsError(f"{figure} was not written by uge-hf, which never overwrites such a file: move it away and rerun")
    _write_manifest(out, {**record, "run_id": record.get("run_id") or "unknown", "files": sorted({*record["files"], FIGURE_NAME}),
                          "figure_sha256": None})
    return figure


def _figure_is_ours(record: Optional[dict], figure: Path) -> bool:
    """The figure is recorded as uge-hf's and, where the manifest keeps its hash (manifests
    from before that keep none), is the one uge-hf drew."""
    if record is None or FIGURE_NAME not in record["files"] or not figure.is_file() or figure.is_symlink():
        return False
    return "figure_sha256" not in record or record["figure_sha256"] == sha256_file(figure)


def check_card(out: Path) -> None:
    """Refuse to replace ``out``'s card if it was edited since uge-hf wrote it (the manifest
    keeps the hash of the card it wrote; :func:`record_hashes`): a Hub user edits ``README.md``.

    Raises:
        FileExistsError: the card differs from the one uge-hf wrote.
    """
    recorded, card = _card_hashes(_owned(out)), out / CARD_NAME
    if recorded and card.is_file() and sha256_file(card) not in recorded:
        raise FileExistsError(f"{card} was edited since uge-hf wrote it, and uge-hf never overwrites what it did not write: "
                              "keep your edits in a card template (protect(card_template=...), uge-hf protect --card-template) or "
                              "elsewhere, move the card away, and rerun")


def _card_hashes(record: Optional[dict]) -> set[str]:
    """The hashes of the cards uge-hf wrote that a manifest records: the one in place and,
    mid-move (publish_output interrupted, perhaps more than once), every one a move staged."""
    record = record or {}
    return {record.get("card_sha256"), *record.get("moving_card_sha256", [])} - {None}


# The manifest's record of the files whose later edit or swap uge-hf must tell apart.
HASH_FIELDS = {CARD_NAME: "card_sha256", FIGURE_NAME: "figure_sha256"}


def record_hashes(out: Path, *names: str) -> None:
    """Record in ``out``'s manifest the hashes of the files ``names`` (:data:`CARD_NAME`,
    :data:`FIGURE_NAME`) that uge-hf just wrote there, so that an edit or a swap is told apart
    (:func:`check_card`, :func:`record_figure`)."""
    record = _owned(out) or {"files": [CARD_NAME], "dirs": []}
    hashes = {HASH_FIELDS[name]: sha256_file(out / name) for name in names}
    _write_manifest(out, {**record, "run_id": record.get("run_id") or "unknown", **hashes})


def check_complete(out: Path) -> None:
    """Refuse a folder whose run was killed while :func:`publish_output` moved it into place
    (its manifest still lists the replaced files as ``stale``): some files are the new run's,
    others the old one's, and a rerun finishes the move.

    Raises:
        FileNotFoundError: naming the fix.
    """
    try:
        record = _owned(out) or {}
    except TamperedShardError:  # a manifest that came with a download: the other checks speak of the folder
        return
    if "stale" in record:
        raise FileNotFoundError(f"{out} holds a uge-hf run that was interrupted while its files were put in place (some are "
                                "moved, some not): rerun the same protect command to finish it")


def has_figure(out: Path) -> bool:
    """Whether ``out`` holds an efficacy figure that uge-hf drew (:func:`record_figure`)."""
    return _figure_is_ours(_owned(out), out / FIGURE_NAME)


def published_run(out: Path) -> Optional[str]:
    """The run id whose files ``out`` holds in place (published), or None."""
    record = _owned(out)
    return record["run_id"] if record else None


def claim_output(out: Path, run_id: str, files: list[str], dirs: list[str], overwrite: bool) -> Callable[[], None]:
    """Check that ``out`` can be this run's: empty, or holding only files uge-hf recorded. A
    finished or interrupted attempt of the same run is kept (to resume); another run's files
    may be replaced with ``overwrite`` (only those), and are refused without it.

    The run writes into ``out/.uge_hf_partial`` (:data:`STAGING_NAME`: hidden, so
    ``load_dataset`` never reads it) and :func:`publish_output` moves its files into place
    once it is complete. Until then the run published in ``out`` before stays whole and
    loadable, however the new one ends, and a killed first run leaves nothing loadable.

    Returns the step that takes the folder, to run once every check of the run passed: it
    deletes a killed writer's temporary files and an abandoned attempt of another run (with
    ``overwrite``), then records ``files`` and ``dirs`` in the staging folder's manifest.

    Raises:
        FileExistsError: ``out`` holds files uge-hf did not write (named), or another run
            and ``overwrite`` is off.
    """
    staging = out / STAGING_NAME
    published, pending = _owned(out), _owned(staging)
    present, staged = _outside_staging(out), _walk(staging) if staging.is_dir() else []
    foreign = [rel for rel in present if not _is_ours(rel, *_recorded(published))]
    foreign += [f"{STAGING_NAME}/{rel}" for rel in staged if not _is_ours(rel, *_recorded(pending))]
    if foreign:
        raise FileExistsError(f"{out} holds files uge-hf did not write ({_listing(sorted(foreign))}); uge-hf never deletes or writes "
                              "beside files it does not own, even with overwrite (--overwrite): choose a new or empty output_dir (--out)")
    check_card(out)  # a rerun, or an overwrite, would replace it
    if any(record is not None and record["run_id"] != run_id for record in (published, pending)) and not overwrite:
        raise FileExistsError(f"{out} holds another uge-hf run (different data, key, config or layout, or a run of another uge-hf "
                              "version, which is not resumed); pass overwrite=True "
                              "(--overwrite) to replace its files (only those uge-hf recorded there are deleted, and only once "
                              "the new run is complete), or choose another output_dir (--out)")
    abandoned = pending is not None and pending["run_id"] != run_id
    doomed = [out / rel for rel in present if _is_leftover(rel, *_recorded(published))]
    doomed += [staging / rel for rel in staged if abandoned or _is_leftover(rel, *_recorded(pending))]

    def take() -> None:
        for path in doomed:
            path.unlink()
        for path in doomed:
            remove_empty_dirs(path.parent, out)
        staging.mkdir(exist_ok=True)
        _write_manifest(staging, {"run_id": run_id, "files": sorted(files), "dirs": sorted(dirs), "pid": os.getpid()})

    return take


def staged_path(out: Path, rel: str) -> Path:
    """Where this run writes the file ``rel`` of ``out`` until :func:`publish_output`."""
    return out / STAGING_NAME / rel


def publish_output(out: Path) -> None:
    """Move the complete run staged in ``out`` (:func:`claim_output`) into place: its files
    replace the run published there before, whose other recorded files are deleted then,
    and not before. The manifest records every file present at each step, so a crash in
    between leaves nothing uge-hf would not recognize as its own; a rerun finishes the move."""
    check_card(out)  # edited while the run went on: refused here too (the staged run stays, to resume)
    staging = out / STAGING_NAME
    new, old = _owned(staging), _owned(out)
    new_files, new_dirs = set(new["files"]), set(new["dirs"])
    old_files, old_dirs = _recorded(old)
    replace = old is not None and old["run_id"] != new["run_id"]
    # A rerun of this run keeps what evaluate drew when it keeps its table (protect decided that:
    # not after an --overwrite killed mid-move, whose manifest already names this run).
    if not replace and FIGURE_NAME in old_files:
        table_at = next((d for d in (staging, out) if (d / METADATA_NAME).is_file()), None)
        if table_at is not None and (read_metadata(table_at).get("efficacy") or {}).get("figure") == FIGURE_NAME:
            new_files.add(FIGURE_NAME)
    # The data first, the metadata and the card last: a card in place always describes data in place.
    moving = sorted((rel for rel in _walk(staging) if rel != MANIFEST_NAME and PurePosixPath(rel).parts[0] not in new_dirs),
                    key=lambda rel: (rel in RUN_FILES, rel))
    stale = {f for f in old_files if f not in moving and (replace or f not in new_files)} | set((old or {}).get("stale", []))
    stale_dirs = {d for d in old_dirs if replace or d not in new_dirs} | set((old or {}).get("stale_dirs", []))
    # The hashes stay recorded while files move, so that after a crash here an edited card or
    # a swapped figure is still told apart (check_card, record_figure).
    hashes = {field: old[field] for field in HASH_FIELDS.values() if field in (old or {})}
    staged_card = {sha256_file(staging / CARD_NAME)} if (staging / CARD_NAME).is_file() else set()
    hashes["moving_card_sha256"] = sorted(_card_hashes(old) | staged_card)  # an earlier move's too
    _write_manifest(out, {"run_id": new["run_id"], "files": sorted(new_files | old_files), "dirs": sorted(new_dirs | set(old_dirs)),
                          "stale": sorted(stale), "stale_dirs": sorted(stale_dirs), **hashes})
    for name in sorted(stale_dirs | {d for d in new_dirs if (staging / d).is_dir()}):
        shutil.rmtree(out / name, ignore_errors=True)  # a recorded folder: wholly uge-hf's
    for name in sorted(new_dirs):
        if (staging / name).is_dir():
            os.replace(staging / name, out / name)
    for rel in moving:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, out / rel)
    for rel in sorted(stale):
        (out / rel).unlink(missing_ok=True)
        remove_empty_dirs((out / rel).parent, out)
    _write_manifest(out, {"run_id": new["run_id"], "files": sorted(new_files), "dirs": sorted(new_dirs),
                          **({"card_sha256": sha256_file(out / CARD_NAME)} if (out / CARD_NAME).is_file() else {}),
                          **({"figure_sha256": old["figure_sha256"]} if FIGURE_NAME in new_files and "figure_sha256" in (old or {}) else {})})
    discard_staging(out)


def discard_staging(out: Path) -> None:
    """Delete what the run staged in ``out`` (only the files its manifest records, and its
    writers' temporary files), then the staging folder once empty."""
    staging = out / STAGING_NAME
    files, dirs = _recorded(_owned(staging))
    for name in dirs:
        shutil.rmtree(staging / name, ignore_errors=True)
    for rel in sorted(_walk(staging), reverse=True):  # the manifest (".uge…") sorts first: it goes last
        if _is_ours(rel, files, dirs):
            (staging / rel).unlink()
    for folder in sorted((p for p in staging.rglob("*") if p.is_dir()), reverse=True):
        remove_empty_dirs(folder, staging)
    remove_empty_dirs(staging, out)


def _write_manifest(out: Path, manifest: dict) -> None:
    atomic_write(out / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True).encode())


def remove_empty_dirs(folder: Path, top: Path) -> None:
    """Remove ``folder`` and its parents up to (not including) ``top`` while they are empty."""
    while folder != top and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


def claim_state(state: Path, run_id: str, overwrite: bool) -> Callable[[], None]:
    """Check that ``state`` can be this run's: new or empty, or holding only uge-hf's own
    entries. Another run's state is replaced with ``overwrite``, refused without it.

    Returns the step that takes the folder (owner-only, 0700), to run once every check passed.

    Raises:
        FileExistsError: ``state`` holds anything else (named), or another run's state and
            ``overwrite`` is off.
    """
    entries = sorted(p.name for p in state.iterdir()) if state.is_dir() else []
    marker = state / STATE_MARKER
    foreign = foreign_entries(entries, STATE_ENTRIES)
    if entries and (foreign or not marker.is_file()):
        raise FileExistsError(f"state_dir {state} holds files uge-hf did not write ({_listing(foreign or entries)}); "
                              "pass a new or empty state_dir (it will hold θ0: keep it private); the CLI puts it beside "
                              "the output as OUT.uge-state, so there choose another --out, or move those files away")
    replace = marker.is_file() and json.loads(marker.read_text())["run_id"] != run_id
    if replace and not overwrite:
        raise FileExistsError(f"state_dir {state} holds the state of another uge-hf run (or of another uge-hf version); pass "
                              "overwrite=True (--overwrite) "
                              "to replace it, or choose another state_dir (with the CLI: another --out)")

    def take() -> None:
        for name in entries if replace else []:
            path = state / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        private_dir(state)
        atomic_write(marker, json.dumps({"run_id": run_id, "pid": os.getpid()}).encode(), private=True)

    return take


# -- locking ------------------------------------------------------------------------------

def lock_folder(stack: ExitStack, folder: Path, holder_file: str) -> None:
    """Hold an exclusive ``flock`` on ``folder`` until ``stack`` closes (or the process dies).

    Raises:
        RunInProgressError: naming the pid recorded in ``folder / holder_file``.
    """
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            pid = json.loads((folder / holder_file).read_text()).get("pid", "unknown")
        except (OSError, ValueError):
            pid = "unknown"
        raise RunInProgressError(f"another uge-hf run (pid {pid}) is writing to {folder}; wait for it to finish, "
                                 "or choose another folder") from None
    stack.callback(os.close, fd)
