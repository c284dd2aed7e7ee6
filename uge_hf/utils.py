"""Small helpers shared by every module: devices, seeding, progress bars, hashing, safe writes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Optional

import torch
from tqdm.auto import tqdm


def default_device() -> torch.device:
    """CUDA when present (the local rank's GPU under Accelerate), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed from any tuple of keys, stable across processes and Python versions
    (``hash()`` is salted per process, so it cannot be used)."""
    digest = hashlib.sha256("/".join(map(str, keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seeded_generator(*keys: int | str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(*keys))


def progress_disabled() -> bool:
    """True when the user silenced progress bars the way ``datasets`` users do."""
    from datasets.utils.tqdm import are_progress_bars_disabled

    return are_progress_bars_disabled() or os.environ.get("HF_DATASETS_DISABLE_PROGRESS_BARS", "").upper() in {"1", "ON", "YES", "TRUE"}


def progress_bar(iterable: Iterable | None = None, *, verbose: bool = True, **kwargs) -> tqdm:
    """A tqdm bar that ``verbose=False`` or ``HF_DATASETS_DISABLE_PROGRESS_BARS`` silences."""
    return tqdm(iterable, disable=not verbose or progress_disabled(), dynamic_ncols=True, **kwargs)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensors_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over tensors in name order: name, dtype, shape and raw bytes.

    Independent of file layout and of how the tensors were saved, so the same weights hash
    the same whether they came from safetensors, a ``state_dict`` or the Hub.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode() + b"\0" + str(t.dtype).encode() + b"\0" + str(tuple(t.shape)).encode() + b"\0")
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def module_fingerprint(module: Optional[torch.nn.Module]) -> Optional[str]:
    """:func:`tensors_fingerprint` of a module's ``state_dict`` (a feature backbone's, say);
    ``None`` for no module."""
    return tensors_fingerprint(module.state_dict()) if module is not None else None


def atomic_write(path: str | os.PathLike, data: bytes, *, private: bool = False) -> None:
    """Write to a temporary name, then rename: a reader never sees half a file.

    ``private=True`` creates the file 0600 from the start (it holds a secret: θ0 or what
    derives from it), whatever the process's umask; otherwise the umask applies, as for
    any file the user publishes.
    """
    path = Path(path)
    tmp = path.with_name(temporary_name(path.name))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def temporary_name(name: str) -> str:
    """The name a file is written under before it is renamed into place: hidden and tagged
    with the writer's pid, so a leftover of a killed run is recognizable as ours."""
    return f".{name}.tmp-{os.getpid()}"


def is_temporary_of(candidate: str, name: str) -> bool:
    """Whether ``candidate`` is a leftover temporary file of ``name`` (see :func:`temporary_name`)."""
    prefix = f".{name}.tmp-"
    return candidate.startswith(prefix) and candidate[len(prefix):].isdigit()


def foreign_entries(entries: Iterable[str], names: Iterable[str]) -> list[str]:
    """The ``entries`` of a folder that are neither one of uge-hf's ``names`` nor a temporary
    file of one (a writer killed mid-write, or another process writing it now)."""
    names = set(names)
    return [e for e in entries if e not in names and not any(is_temporary_of(e, n) for n in names)]


def private_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and its missing parents) readable by its owner only: 0700.

    For folders that hold secrets: the key, and the shared state with θ0 inside.
    """
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path
