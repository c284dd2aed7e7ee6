"""The key: an architecture plus its initial weights θ0.

Saved the Hub's way for models (``model.safetensors`` + ``config.json``), identified by a
canonical weight hash that does not depend on how the file was written.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import secrets
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from . import __version__
from .folder import is_protected_folder
from .models import create_model
from .utils import atomic_write, private_dir, tensors_fingerprint

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


# torch's CPU generator (mt19937) keeps only the low 32 bits of a seed.
SEED_SPACE = 2**32


def tensor_seed(seed: int, index: int) -> int:
    """The torch seed of θ0's ``index``-th tensor for a key seed of :data:`SEED_SPACE` or more."""
    return int.from_bytes(hashlib.sha256(f"uge-hf key {seed} tensor {index}".encode()).digest()[:4], "big")


class AuthorizedModel:
    """The authorized model ("key"): an architecture name and its initial weights θ0.

    The protection is built so that a model trained from these weights learns from the
    protected data while other architectures do not. It is *not* bound to the exact weights:
    measured on CIFAR-10 (``bench/binding.py``, README threat model), the key's architecture
    from three other initializations keeps 0.87 of its clean accuracy against the key's 0.85,
    so the architecture is as secret as θ0. Share the key through a trusted channel and publish only
    its :attr:`fingerprint` (what :func:`uge_hf.protect` records, by default).

    Example:
        >>> from uge_hf import AuthorizedModel
        >>> key = AuthorizedModel.create("convnet", num_classes=10)   # θ0 from the OS's random source
        >>> len(key.fingerprint)
        64
        >>> model = key.build()          # a fresh nn.Module holding θ0, ready to train
    """

    def __init__(self, architecture: str, state_dict: dict[str, torch.Tensor], num_classes: int, in_channels: int = 3,
                 seed: Optional[int] = None, source: Optional[dict] = None):
        check_shape(num_classes, in_channels)
        self.architecture = architecture
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.seed = seed
        self.source = source  # {"repo_id", "revision"} when loaded from the Hub
        self.folder: Optional[Path] = None  # the local folder it was loaded from or saved to: protect writes nothing inside it
        module = create_model(architecture, self.num_classes, self.in_channels)
        check_weights(module.state_dict(), state_dict, f"{architecture} ({self.num_classes} classes, {self.in_channels} channels)")
        module.load_state_dict(state_dict)
        self.state_dict = {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}

    # -- construction --------------------------------------------------------------------
    @classmethod
    def create(cls, architecture: str = "convnet", num_classes: int = 10, seed: Optional[int] = None, in_channels: int = 3) -> "AuthorizedModel":
        """A new key: ``architecture`` initialized as :func:`uge_hf.models.create_model` does,
        from ``seed``.

        ``seed=None`` (the default) draws a 63-bit seed from the OS's random source
        (:mod:`secrets`), so nobody can rebuild θ0 by trying seeds. torch's CPU generator
        keeps only a seed's low 32 bits, which a search covers (about 60 core-days for a convnet), so a
        seed of :data:`SEED_SPACE` or more draws each tensor of θ0 from a seed of its own (32
        bits each, derived from the whole seed by SHA-256): the weights hash can only be
        matched by trying whole seeds. A smaller, explicit seed is ``torch.manual_seed(seed)``,
        for tests and reproducible experiments: anyone who guesses it holds the key.

        Raises:
            ValueError: ``num_classes < 2`` or ``in_channels < 1``, or an unknown architecture.
        """
        check_shape(num_classes, in_channels)
        seed = secrets.randbits(63) if seed is None else int(seed)

        def init(torch_seed: int) -> dict[str, torch.Tensor]:
            torch.manual_seed(torch_seed)
            return create_model(architecture, num_classes, in_channels).state_dict()

        with torch.random.fork_rng(devices=[]):
            if seed < SEED_SPACE:
                weights = init(seed)
            else:  # each tensor as the model's own initialization draws it, from its own seed
                names = list(init(0))
                weights = {name: init(tensor_seed(seed, i))[name] for i, name in enumerate(names)}
        return cls(architecture, weights, num_classes, in_channels, seed=seed)

    @classmethod
    def from_module(cls, architecture: str, module: nn.Module, num_classes: int, in_channels: int = 3) -> "AuthorizedModel":
        """Wrap weights you already have (a pretrained network works: the method only needs θ0)."""
        return cls(architecture, module.state_dict(), num_classes, in_channels)

    def build(self) -> nn.Module:
        """A fresh ``nn.Module`` holding θ0; training it never changes the key."""
        module = create_model(self.architecture, self.num_classes, self.in_channels)
        module.load_state_dict(copy.deepcopy(self.state_dict))
        return module

    def sibling(self, seed: Optional[int] = None) -> "AuthorizedModel":
        """The same architecture from another seed: what a hacker who guessed it would hold."""
        return AuthorizedModel.create(self.architecture, self.num_classes, seed, self.in_channels)

    # -- identity -------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """Canonical weight hash: sha256 over the tensors in name order (name, dtype, shape,
        bytes). The value a dataset card records and :func:`uge_hf.load_protected` checks."""
        return tensors_fingerprint(self.state_dict)

    def _weights_bytes(self) -> bytes:
        return save_safetensors_bytes(self.state_dict, metadata={"format": "pt"})

    def secret_digest(self, purpose: str) -> bytes:
        """32 bytes only the holder of θ0 can compute: sha256 of ``purpose`` and the weights.
        Neither public hash (:attr:`fingerprint`, :attr:`weights_file_sha256`) gives it, so it
        can key a value that is recorded where others may read it (the run id)."""
        return hashlib.sha256(f"uge-hf {purpose}\0".encode() + self._weights_bytes()).digest()

    @property
    def weights_file_sha256(self) -> str:
        """sha256 of ``model.safetensors`` as :meth:`save_pretrained` writes it (the Hub's LFS oid)."""
        return hashlib.sha256(self._weights_bytes()).hexdigest()

    @property
    def config(self) -> dict:
        return {"architecture": self.architecture, "num_classes": self.num_classes, "in_channels": self.in_channels,
                "seed": self.seed, "fingerprint": self.fingerprint, "uge_hf_version": __version__}

    def __repr__(self) -> str:
        return f"AuthorizedModel(architecture={self.architecture!r}, num_classes={self.num_classes}, fingerprint={self.fingerprint[:12]}…)"

    # -- persistence ----------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``save_directory``, owner-only
        (files 0600, folder 0700): the key is a secret.

        Raises:
            FileExistsError: the folder holds another key, or files that are not a key. A key
                is never overwritten: every dataset protected for it would be lost with it.
        """
        path = Path(save_directory)
        published = next((p for p in path.resolve().parents if is_protected_folder(p)), None)
        if published is not None:
            raise FileExistsError(f"{path} lies inside {published}, a folder uge-hf protected, which is what gets published: "
                                  "save the key outside it")
        if path.is_dir() and any(path.iterdir()):
            existing = sorted(p.name for p in path.iterdir())
            if set(existing) - {CONFIG_NAME, WEIGHTS_NAME} or not (path / WEIGHTS_NAME).is_file():
                raise FileExistsError(f"{path} holds files that are not a key ({', '.join(existing[:5])}); save the key into a new "
                                      "or empty folder")
            other = AuthorizedModel.from_pretrained(path)
            if other.fingerprint != self.fingerprint:
                raise FileExistsError(f"{path} already holds a key (fingerprint {other.fingerprint[:12]}…); a key is never "
                                      "overwritten, since every dataset protected for it would be lost with it: choose another "
                                      "folder, or move that key away yourself")
        private_dir(path)
        atomic_write(path / WEIGHTS_NAME, self._weights_bytes(), private=True)
        atomic_write(path / CONFIG_NAME, (json.dumps(self.config, indent=2, sort_keys=True) + "\n").encode(), private=True)
        self.folder = path.resolve()
        return path

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, revision: Optional[str] = None, token: Optional[str] = None) -> "AuthorizedModel":
        """Load a key from a local folder or a Hub model repo (``revision`` pins a commit)."""
        path = Path(name_or_path)
        source = None
        if path.is_dir():
            config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
            if not weights_file.exists():
                if any(path.iterdir()):  # keygen refuses a folder that holds anything: do not send the user there
                    raise FileNotFoundError(f"{path} is not a key folder (no {WEIGHTS_NAME}); pass the folder `uge-hf keygen` "
                                            "wrote, or make a key in a new folder with `uge-hf keygen --out NEW_FOLDER`")
                raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}; pass the folder of the key (to verify or train: the one "
                                        f"the data owner gave you; to protect with a new key: make one with `uge-hf keygen --out {path}`)")
        elif path.exists():
            raise ValueError(f"{path} is a file; pass the folder that holds {CONFIG_NAME} and {WEIGHTS_NAME}")
        elif not looks_like_repo_id(str(name_or_path)):
            raise FileNotFoundError(f"no key folder {name_or_path}; pass the folder of the key (to verify or train: the one the data "
                                    f"owner gave you; to protect with a new key: make one with `uge-hf keygen --out {name_or_path}`)")
        else:
            from huggingface_hub import HfApi, hf_hub_download
            from huggingface_hub.errors import RepositoryNotFoundError

            try:
                sha = HfApi(token=token).model_info(str(name_or_path), revision=revision).sha
            except RepositoryNotFoundError:
                raise FileNotFoundError(f"no key folder {name_or_path} here, and no Hub model repo {name_or_path!r} you can read "
                                        "(check the name, and log in or pass token= for a private repo)") from None
            except Exception as error:  # no network, a proxy, a timeout: the client's errors vary by transport
                raise FileNotFoundError(f"no key folder {name_or_path} here, and the Hub could not be reached to look for a repo "
                                        f"of that name ({type(error).__name__}); pass the key's folder") from None
            config_file = hf_hub_download(str(name_or_path), CONFIG_NAME, revision=sha, token=token)
            weights_file = hf_hub_download(str(name_or_path), WEIGHTS_NAME, revision=sha, token=token)
            source = {"repo_id": str(name_or_path), "revision": sha}
        try:
            config = json.loads(Path(config_file).read_text())
            state_dict = load_safetensors_bytes(Path(weights_file).read_bytes())
            key = cls(config["architecture"], state_dict, config["num_classes"], config.get("in_channels", 3), config.get("seed"), source)
        except Exception as error:  # truncated weights, a config of another tool, weights of another architecture
            raise ValueError(f"{name_or_path} is not a readable uge-hf key ({type(error).__name__}: {error}); "
                             "use the folder `uge-hf keygen` wrote") from None
        if "fingerprint" in config and config["fingerprint"] != key.fingerprint:
            raise ValueError(f"{name_or_path}: weights hash {key.fingerprint} but config.json records {config['fingerprint']}; "
                             "the weights were changed after saving")
        key.folder = path.resolve() if source is None else None
        return key

    def push_to_hub(self, repo_id: str, *, private: bool = True, allow_public: bool = False, revision: Optional[str] = None,
                    token: Optional[str] = None, commit_message: str = "Upload UGE key") -> str:
        """Upload the key to a model repo, private by default; returns the commit URL.

        A public key gives the protection away: whoever holds θ0 learns from the data as
        well as you do. Publishing one needs ``private=False, allow_public=True``; pushing
        into a repo that already exists as public is refused on the same terms.

        Raises:
            ValueError: ``private=False`` without ``allow_public=True``.
            PermissionError: the repo exists, is public, and ``allow_public`` is off.
        """
        if not private and not allow_public:
            raise ValueError("refusing to publish a key publicly: anyone holding θ0 can learn from the protected data. "
                             "Keep private=True, or pass allow_public=True if that is really what you want")
        if not private:
            warnings.warn("publishing the key publicly: the protected data becomes learnable for anyone who downloads it", stacklevel=2)
        from huggingface_hub import CommitOperationAdd, HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if not allow_public:
            refuse_public_repo(api, repo_id, "model", "push_to_hub(..., private=False, allow_public=True)")
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        ops = [CommitOperationAdd(WEIGHTS_NAME, self._weights_bytes()),
               CommitOperationAdd(CONFIG_NAME, (json.dumps(self.config, indent=2, sort_keys=True) + "\n").encode())]
        info = api.create_commit(repo_id, ops, commit_message=commit_message, revision=revision)
        self.source = {"repo_id": repo_id, "revision": info.oid}
        return info.commit_url


def check_weights(expected: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], model: str) -> None:
    """Refuse weights made for another model, in one line that says how they differ (torch's
    own error lists every tensor, one per line, and a CLI shows only the first).

    Raises:
        ValueError: names the first missing, unexpected, misshapen and retyped tensor, with counts.
    """
    missing = [n for n in expected if n not in weights]
    unexpected = [n for n in weights if n not in expected]
    misshapen = [f"{n} {tuple(weights[n].shape)}, not {tuple(t.shape)}" for n, t in expected.items()
                 if n in weights and weights[n].shape != t.shape]
    # Another dtype would be cast on loading, so the key's file hash on the card would not be its holder's file's.
    retyped = [f"{n} {weights[n].dtype}, not {t.dtype}" for n, t in expected.items()
               if n in weights and weights[n].shape == t.shape and weights[n].dtype != t.dtype]
    found = [f"{len(names)} {what} (first: {names[0]})" for names, what in
             ((missing, "tensors missing"), (unexpected, "unexpected tensors"), (misshapen, "of another shape"),
              (retyped, "of another dtype")) if names]
    if found:
        fix = ("a key's config.json must name the architecture, classes and channels its weights were made for"
               if missing or unexpected or misshapen else "convert them to the architecture's dtype (module.float())")
        raise ValueError(f"the weights are not those of a {model}: {'; '.join(found)}; {fix}")


def check_shape(num_classes: int, in_channels: int) -> None:
    """A key classifies at least two classes of images with at least one channel."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2 (a one-class model learns nothing to protect); got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer (3 for RGB, 1 for grayscale); got {in_channels!r}")


def looks_like_repo_id(name: str) -> bool:
    """``name`` or ``owner/name`` in the Hub's characters, not a filesystem path."""
    return not name.startswith((".", "/", "~")) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None


def refuse_public_repo(api, repo_id: str, repo_type: str, how: str) -> None:
    """Refuse to push private material into a repo that already exists as public.

    Raises:
        PermissionError: saying how to publish on purpose.
    """
    if not api.repo_info(repo_id, repo_type=repo_type).private:
        raise PermissionError(f"the {repo_type} repo {repo_id} exists and is public, so this push would be public, not private; "
                              f"make the repo private first, push to another repo, or publish on purpose with {how}")


def authorized_keys(keys: "AuthorizedModel | Sequence[AuthorizedModel]") -> list["AuthorizedModel"]:
    """One key or several, as a list: every key a distinct θ0 for the same classes and channels.

    Raises:
        ValueError: no key, a key given twice, or keys for different class counts or channels.
    """
    keys = [keys] if isinstance(keys, AuthorizedModel) else list(keys)
    if not keys or not all(isinstance(k, AuthorizedModel) for k in keys):
        raise ValueError("pass an AuthorizedModel, or a list of them (one per authorized partner)")
    if len({k.fingerprint for k in keys}) < len(keys):
        raise ValueError("the same key is given twice; each authorized partner needs a key of its own")
    shapes = {(k.num_classes, k.in_channels) for k in keys}
    if len(shapes) > 1:
        raise ValueError(f"the keys disagree on (classes, channels): {sorted(shapes)}; every key must fit the same data")
    return keys
