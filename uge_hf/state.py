"""The shared state of a run: the key's trajectory, the common feature space (surrogates, or
a backbone's class centroids), trajectories of other seeds, and the generator's weights (or
the class codes of δ's class-consistent part).

Built once by :mod:`uge_hf.fitting`, used by :mod:`uge_hf.objective` and
:mod:`uge_hf.transform`. It holds θ0 (the trajectory starts there): it is saved 0600, and
never published.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from . import __version__
from .config import ProtectConfig
from .utils import atomic_write, foreign_entries, private_dir, tensors_fingerprint

STATE_WEIGHTS = "state.safetensors"
STATE_CONFIG = "state.json"
TRANSFORM_CONFIG = "transform.json"  # the columns a UGETransform saves beside its state
STATE_FILES = (STATE_WEIGHTS, STATE_CONFIG, TRANSFORM_CONFIG)  # what a saved state (and its transform) folder holds


def check_state_folder(directory: str | os.PathLike) -> None:
    """Refuse to save a state into a folder that holds anything but an earlier saved state
    (uge-hf never overwrites or re-permissions what it did not write).

    Raises:
        FileExistsError: naming the foreign entries.
    """
    path = Path(directory)
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a folder: save the state into a new or empty folder")
    entries = sorted(p.name for p in path.iterdir())
    foreign = foreign_entries(entries, STATE_FILES)
    ours = (path / STATE_CONFIG).is_file() and "key_fingerprints" in _json_or_empty(path / STATE_CONFIG)
    if foreign or (entries and not ours):
        raise FileExistsError(f"{path} holds files uge-hf did not write ({', '.join(foreign or entries)}); save the state "
                              "into a new or empty folder (it holds θ0: keep it private)")


def _json_or_empty(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (ValueError, OSError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass(repr=False)  # the fields hold θ0: see __repr__
class SharedState:
    """Everything the transform needs besides the images: built by :func:`build_shared_state`,
    saved by :meth:`save_pretrained`, identified by :attr:`fingerprint`."""

    architectures: list[str]  # one per authorized key
    num_classes: int
    in_channels: int
    key_fingerprints: list[str]
    config: ProtectConfig
    trajectories: list[list[dict[str, torch.Tensor]]]  # per key: θ0 … θT of its clean training
    surrogates: list[tuple[str, dict[str, torch.Tensor]]]
    other_trajectories: list[list[dict[str, torch.Tensor]]] = field(default_factory=list)
    centroids: Optional[torch.Tensor] = None  # for a user-supplied feature backbone
    backbone_fingerprint: Optional[str] = None
    generator: Optional[dict[str, torch.Tensor]] = None
    class_codes: Optional[dict[str, torch.Tensor]] = None  # a Generator(per_image=False), with config.class_share
    # per round of config.retrain_rounds, per key: θ0 … θT of its training on the rows protected one round earlier
    retrained: list[list[list[dict[str, torch.Tensor]]]] = field(default_factory=list)
    image_size: tuple[int, int] = (32, 32)
    timings: dict[str, float] = field(default_factory=dict, compare=False)  # seconds per phase; not part of the state

    def __repr__(self) -> str:
        # No architecture, weights or timings: a printed state (a notebook's last line) must
        # not show what the key is.
        return f"SharedState(keys={len(self.key_fingerprints)}, retraining_rounds={len(self.retrained)}, fingerprint={self.fingerprint[:12]}…)"

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, trajectory in enumerate(self.trajectories):
            for t, w in enumerate(trajectory):
                out.update({f"trajectory.{i}.{t}.{k}": v for k, v in w.items()})
        for i, (_, w) in enumerate(self.surrogates):
            out.update({f"surrogate.{i}.{k}": v for k, v in w.items()})
        for s, traj in enumerate(self.other_trajectories):
            for t, w in enumerate(traj):
                out.update({f"other.{s}.{t}.{k}": v for k, v in w.items()})
        for r, trajectories in enumerate(self.retrained):
            for i, trajectory in enumerate(trajectories):
                for t, w in enumerate(trajectory):
                    out.update({f"retrained.{r}.{i}.{t}.{k}": v for k, v in w.items()})
        if self.centroids is not None:
            out["centroids"] = self.centroids
        if self.generator is not None:
            out.update({f"generator.{k}": v for k, v in self.generator.items()})
        if self.class_codes is not None:
            out.update({f"class_codes.{k}": v for k, v in self.class_codes.items()})
        return {k: v.contiguous() for k, v in out.items()}

    def metadata(self) -> dict:
        return {"architectures": self.architectures, "num_classes": self.num_classes, "in_channels": self.in_channels,
                "key_fingerprints": self.key_fingerprints, "config": self.config.to_dict(),
                "trajectory_lengths": [len(t) for t in self.trajectories], "surrogates": [a for a, _ in self.surrogates],
                "other_trajectories": [len(t) for t in self.other_trajectories],
                "backbone_fingerprint": self.backbone_fingerprint, "image_size": list(self.image_size),
                "has_generator": self.generator is not None, "has_class_codes": self.class_codes is not None,
                "uge_hf_version": __version__, "retrained_lengths": [[len(t) for t in ts] for ts in self.retrained]}

    @property
    def fingerprint(self) -> str:
        """sha256 over the metadata and every tensor: equal fingerprints, equal outputs."""
        meta = dict(self.metadata(), uge_hf_version=None)
        return hashlib.sha256((json.dumps(meta, sort_keys=True) + tensors_fingerprint(self.tensors())).encode()).hexdigest()

    @property
    def generator_fingerprint(self) -> Optional[str]:
        return tensors_fingerprint(self.generator) if self.generator is not None else None

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``state.safetensors`` and ``state.json``, owner-only (0600 in a 0700 folder):
        the trajectory starts at θ0, so the state is as secret as the key.

        Raises:
            FileExistsError: ``directory`` holds files other than an earlier saved state.
        """
        check_state_folder(directory)
        path = private_dir(directory)
        atomic_write(path / STATE_WEIGHTS, save_safetensors_bytes(self.tensors()), private=True)
        atomic_write(path / STATE_CONFIG, (json.dumps(self.metadata(), indent=2, sort_keys=True) + "\n").encode(), private=True)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "SharedState":
        path = Path(directory)
        if not (path / STATE_CONFIG).exists():
            raise FileNotFoundError(f"no {STATE_CONFIG} in {path}: not a saved UGE state (save one with UGETransform.save_pretrained)")
        return cls.from_parts(json.loads((path / STATE_CONFIG).read_text()), load_safetensors_bytes((path / STATE_WEIGHTS).read_bytes()))

    @classmethod
    def from_parts(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "SharedState":
        """Rebuild from :meth:`metadata` and :meth:`tensors`.

        Raises:
            ValueError: the state was saved by an earlier uge-hf, in another layout, or holds
                another number of retraining rounds than its config names (:meth:`check_rounds`).
        """
        if "architectures" not in meta:
            raise ValueError(f"this shared state was saved by uge-hf {meta.get('uge_hf_version', 'before 0.2')} in an older layout; "
                             "rebuild it (rerun protect, or UGETransform.fit)")
        config = ProtectConfig.from_dict(meta["config"])

        def group(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        state = cls(
            architectures=meta["architectures"], num_classes=meta["num_classes"], in_channels=meta["in_channels"],
            key_fingerprints=meta["key_fingerprints"], config=config,
            trajectories=[[group(f"trajectory.{i}.{t}.") for t in range(n)] for i, n in enumerate(meta["trajectory_lengths"])],
            surrogates=[(a, group(f"surrogate.{i}.")) for i, a in enumerate(meta["surrogates"])],
            other_trajectories=[[group(f"other.{s}.{t}.") for t in range(n)] for s, n in enumerate(meta["other_trajectories"])],
            retrained=[[[group(f"retrained.{r}.{i}.{t}.") for t in range(n)] for i, n in enumerate(lengths)]
                       for r, lengths in enumerate(meta.get("retrained_lengths", []))],
            centroids=tensors.get("centroids"), backbone_fingerprint=meta["backbone_fingerprint"],
            generator=group("generator.") if meta["has_generator"] else None,
            class_codes=group("class_codes.") if meta.get("has_class_codes") else None, image_size=tuple(meta["image_size"]),
        )
        state.check_rounds()
        return state

    def check_rounds(self) -> None:
        """Refuse a state whose retraining rounds are not the ones its config names: a transform
        would protect with the rounds it has, silently (:func:`build_shared_state` adds none;
        ``UGETransform.fit`` adds them).

        Raises:
            ValueError: naming both counts and the fix.
        """
        if len(self.retrained) != self.config.retrain_rounds:
            raise ValueError(f"this shared state holds {len(self.retrained)} retraining round(s) and its config names "
                             f"{self.config.retrain_rounds}: build it with UGETransform.fit (or protect), which adds the rounds")
