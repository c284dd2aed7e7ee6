"""The key: an architecture plus its initial weights θ0.

Saved the Hub's way for models (``model.safetensors`` + ``config.json``), identified by a
canonical weight hash that does not depend on how the file was written.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from . import __version__
from .models import create_model
from .utils import tensors_fingerprint

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class AuthorizedModel:
    """The authorized model ("key"): an architecture name and its initial weights θ0.

    Only a model trained from exactly these weights learns from the protected data, so the
    key is a secret: share it through a trusted channel and publish only its
    :attr:`fingerprint`.

    Example:
        >>> from uge_hf import AuthorizedModel
        >>> key = AuthorizedModel.create("convnet", num_classes=10, seed=0)
        >>> len(key.fingerprint)
        64
        >>> model = key.build()          # a fresh nn.Module holding θ0, ready to train
    """

    def __init__(self, architecture: str, state_dict: dict[str, torch.Tensor], num_classes: int, in_channels: int = 3,
                 seed: Optional[int] = None, source: Optional[dict] = None):
        self.architecture = architecture
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.seed = seed
        self.source = source  # {"repo_id", "revision"} when loaded from the Hub
        module = create_model(architecture, self.num_classes, self.in_channels)
        module.load_state_dict(state_dict)  # fails loudly if weights and architecture disagree
        self.state_dict = {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}

    # -- construction --------------------------------------------------------------------
    @classmethod
    def create(cls, architecture: str = "convnet", num_classes: int = 10, seed: int = 0, in_channels: int = 3) -> "AuthorizedModel":
        """A new key: ``architecture`` initialized from ``torch.manual_seed(seed)``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = create_model(architecture, num_classes, in_channels)
        return cls(architecture, module.state_dict(), num_classes, in_channels, seed=seed)

    @classmethod
    def from_module(cls, architecture: str, module: nn.Module, num_classes: int, in_channels: int = 3) -> "AuthorizedModel":
        """Wrap weights you already have (a pretrained network works: the method only needs θ0)."""
        return cls(architecture, module.state_dict(), num_classes, in_channels)

    def build(self) -> nn.Module:
        """A fresh ``nn.Module`` holding θ0; training it never changes the key."""
        module = create_model(self.architecture, self.num_classes, self.in_channels)
        module.load_state_dict(copy.deepcopy(self.state_dict))
        return module

    def sibling(self, seed: int) -> "AuthorizedModel":
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
        """Write ``model.safetensors`` and ``config.json`` into ``save_directory``."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / WEIGHTS_NAME).write_bytes(self._weights_bytes())
        (path / CONFIG_NAME).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, revision: Optional[str] = None, token: Optional[str] = None) -> "AuthorizedModel":
        """Load a key from a local folder or a Hub model repo (``revision`` pins a commit)."""
        path = Path(name_or_path)
        source = None
        if path.is_dir():
            config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
            if not weights_file.exists():
                raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}; create a key with `uge-hf keygen --out {path}`")
        elif path.exists():
            raise ValueError(f"{path} is a file; pass the folder that holds {CONFIG_NAME} and {WEIGHTS_NAME}")
        else:
            from huggingface_hub import HfApi, hf_hub_download

            sha = HfApi(token=token).model_info(str(name_or_path), revision=revision).sha
            config_file = hf_hub_download(str(name_or_path), CONFIG_NAME, revision=sha, token=token)
            weights_file = hf_hub_download(str(name_or_path), WEIGHTS_NAME, revision=sha, token=token)
            source = {"repo_id": str(name_or_path), "revision": sha}
        config = json.loads(Path(config_file).read_text())
        state_dict = load_safetensors_bytes(Path(weights_file).read_bytes())
        key = cls(config["architecture"], state_dict, config["num_classes"], config.get("in_channels", 3), config.get("seed"), source)
        if "fingerprint" in config and config["fingerprint"] != key.fingerprint:
            raise ValueError(f"{name_or_path}: weights hash {key.fingerprint} but config.json records {config['fingerprint']}; "
                             "the weights were changed after saving")
        return key

    def push_to_hub(self, repo_id: str, *, private: bool = True, allow_public: bool = False, revision: Optional[str] = None,
                    token: Optional[str] = None, commit_message: str = "Upload UGE key") -> str:
        """Upload the key to a model repo, private by default; returns the commit URL.

        A public key gives the protection away: whoever holds θ0 learns from the data as
        well as you do. Publishing one needs ``private=False, allow_public=True``.
        """
        if not private and not allow_public:
            raise ValueError("refusing to publish a key publicly: anyone holding θ0 can learn from the protected data. "
                             "Keep private=True, or pass allow_public=True if that is really what you want")
        if not private:
            warnings.warn("publishing the key publicly: the protected data becomes learnable for anyone who downloads it", stacklevel=2)
        from huggingface_hub import CommitOperationAdd, HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        ops = [CommitOperationAdd(WEIGHTS_NAME, self._weights_bytes()),
               CommitOperationAdd(CONFIG_NAME, (json.dumps(self.config, indent=2, sort_keys=True) + "\n").encode())]
        info = api.create_commit(repo_id, ops, commit_message=commit_message, revision=revision)
        self.source = {"repo_id": repo_id, "revision": info.oid}
        return info.commit_url
