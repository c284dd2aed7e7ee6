"""The shared state of a run, built once: the key's trajectory, the common feature space,
trajectories of other seeds (for binding to θ0) and, in generator mode, the generator.

Every training job checkpoints at each epoch into a cache folder and resumes from there,
so an interrupted build finishes with the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from . import __version__
from .config import ProtectConfig
from .key import AuthorizedModel
from .models import create_model
from .parallel import Ranks
from .training import TrainConfig, to_float, train_model
from .utils import default_device, tensors_fingerprint

STATE_WEIGHTS = "state.safetensors"
STATE_CONFIG = "state.json"


class CentroidHead(nn.Module):
    """A frozen feature backbone turned into a classifier of the common feature space:
    scores are cosine similarities to each class's mean clean feature, over a temperature.

    Use it to plug any vision backbone (a ``transformers`` CLIP vision tower loaded from a
    local path, say) into ``L_fd`` through ``protect(..., feature_backbone=...)``.
    """

    def __init__(self, backbone: nn.Module, centroids: torch.Tensor, temperature: float = 0.05):
        super().__init__()
        self.backbone, self.temperature = backbone, temperature
        self.register_buffer("centroids", F.normalize(centroids, dim=1))

    def forward(self, x):
        return F.normalize(self.backbone(x).flatten(1), dim=1) @ self.centroids.T / self.temperature


class Generator(nn.Module):
    """δ = ε · clamp(G(x) + P[y]): a small conv net plus one learned spatial code per class.

    The clamp passes gradients straight through, so unlike a tanh the output never
    saturates into a dead zone (the first prototype's failure); the class codes give the
    misalignment a per-class direction that a per-image network finds hard to learn.
    """

    def __init__(self, in_channels: int, num_classes: int, size: tuple[int, int], width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, in_channels, 3, padding=1),
        )
        # Codes start as random class-wise patterns at full budget (a ready shortcut); the
        # objective then reshapes them so the key still learns.
        self.codes = nn.Parameter(torch.rand(num_classes, in_channels, *size) * 2 - 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor, epsilon: float) -> torch.Tensor:
        codes = self.codes[y]
        if codes.shape[-2:] != x.shape[-2:]:
            codes = F.interpolate(codes, size=x.shape[-2:], mode="bilinear", align_corners=False)
        raw = self.net(x * 2 - 1) + codes
        delta = epsilon * (raw.clamp(-1, 1) - raw).detach() + epsilon * raw  # straight-through clamp
        return (x + delta).clamp(0, 1)


@dataclass
class SharedState:
    """Everything the transform needs besides the images: built by :func:`build_shared_state`,
    saved by :meth:`save_pretrained`, identified by :attr:`fingerprint`."""

    architecture: str
    num_classes: int
    in_channels: int
    key_fingerprint: str
    config: ProtectConfig
    trajectory: list[dict[str, torch.Tensor]]
    surrogates: list[tuple[str, dict[str, torch.Tensor]]]
    other_trajectories: list[list[dict[str, torch.Tensor]]] = field(default_factory=list)
    centroids: Optional[torch.Tensor] = None  # for a user-supplied feature backbone
    backbone_fingerprint: Optional[str] = None
    generator: Optional[dict[str, torch.Tensor]] = None
    image_size: tuple[int, int] = (32, 32)
    timings: dict[str, float] = field(default_factory=dict, compare=False)  # seconds per phase; not part of the state

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for t, w in enumerate(self.trajectory):
            out.update({f"trajectory.{t}.{k}": v for k, v in w.items()})
        for i, (_, w) in enumerate(self.surrogates):
            out.update({f"surrogate.{i}.{k}": v for k, v in w.items()})
        for s, traj in enumerate(self.other_trajectories):
            for t, w in enumerate(traj):
                out.update({f"other.{s}.{t}.{k}": v for k, v in w.items()})
        if self.centroids is not None:
            out["centroids"] = self.centroids
        if self.generator is not None:
            out.update({f"generator.{k}": v for k, v in self.generator.items()})
        return {k: v.contiguous() for k, v in out.items()}

    def metadata(self) -> dict:
        return {"architecture": self.architecture, "num_classes": self.num_classes, "in_channels": self.in_channels,
                "key_fingerprint": self.key_fingerprint, "config": self.config.to_dict(),
                "trajectory_length": len(self.trajectory), "surrogates": [a for a, _ in self.surrogates],
                "other_trajectories": [len(t) for t in self.other_trajectories],
                "backbone_fingerprint": self.backbone_fingerprint, "image_size": list(self.image_size),
                "has_generator": self.generator is not None, "uge_hf_version": __version__}

    @property
    def fingerprint(self) -> str:
        """sha256 over the metadata and every tensor: equal fingerprints, equal outputs."""
        meta = dict(self.metadata(), uge_hf_version=None)
        return hashlib.sha256((json.dumps(meta, sort_keys=True) + tensors_fingerprint(self.tensors())).encode()).hexdigest()

    @property
    def generator_fingerprint(self) -> Optional[str]:
        return tensors_fingerprint(self.generator) if self.generator is not None else None

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(path / STATE_WEIGHTS, save_safetensors_bytes(self.tensors()))
        atomic_write(path / STATE_CONFIG, (json.dumps(self.metadata(), indent=2, sort_keys=True) + "\n").encode())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "SharedState":
        path = Path(directory)
        if not (path / STATE_CONFIG).exists():
            raise FileNotFoundError(f"no {STATE_CONFIG} in {path}: not a saved UGE state (save one with UGETransform.save_pretrained)")
        return cls.from_parts(json.loads((path / STATE_CONFIG).read_text()), load_safetensors_bytes((path / STATE_WEIGHTS).read_bytes()))

    @classmethod
    def from_parts(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "SharedState":
        """Rebuild from :meth:`metadata` and :meth:`tensors`."""

        def group(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        return cls(
            architecture=meta["architecture"], num_classes=meta["num_classes"], in_channels=meta["in_channels"],
            key_fingerprint=meta["key_fingerprint"], config=ProtectConfig.from_dict(meta["config"]),
            trajectory=[group(f"trajectory.{t}.") for t in range(meta["trajectory_length"])],
            surrogates=[(a, group(f"surrogate.{i}.")) for i, a in enumerate(meta["surrogates"])],
            other_trajectories=[[group(f"other.{s}.{t}.") for t in range(n)] for s, n in enumerate(meta["other_trajectories"])],
            centroids=tensors.get("centroids"), backbone_fingerprint=meta["backbone_fingerprint"],
            generator=group("generator.") if meta["has_generator"] else None, image_size=tuple(meta["image_size"]),
        )


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary name, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Checkpoints:
    """Where one optimization of the build keeps its progress in ``cache_dir``:
    ``{name}.resume.pt`` after every epoch, ``{name}.safetensors`` once finished. Every
    process reads them; only the main process writes (all hold the same weights)."""

    def __init__(self, cache_dir: Optional[Path], name: str, ranks: Ranks):
        self.done = cache_dir / f"{name}.safetensors" if cache_dir is not None else None
        self.resume = cache_dir / f"{name}.resume.pt" if cache_dir is not None else None
        self.writer = ranks.is_main

    def finished(self) -> Optional[dict[str, torch.Tensor]]:
        return load_safetensors_bytes(self.done.read_bytes()) if self.done is not None and self.done.exists() else None

    def last_epoch(self) -> Optional[dict]:
        return torch.load(self.resume, weights_only=True) if self.resume is not None and self.resume.exists() else None

    def save_epoch(self, payload: dict) -> None:
        if self.resume is not None and self.writer:
            tmp = self.resume.with_name(self.resume.name + ".tmp")
            torch.save(payload, tmp)
            os.replace(tmp, self.resume)

    def finish(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.done is not None and self.writer:
            atomic_write(self.done, save_safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}))
            self.resume.unlink(missing_ok=True)


def resumable_training(name: str, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig,
                       seed: int, cache_dir: Optional[Path], keep_trajectory: bool, verbose: bool,
                       ranks: Ranks = Ranks()) -> list[dict[str, torch.Tensor]]:
    """Train ``model`` and return its weights after every epoch (or only the last),
    θ0 first when ``keep_trajectory``. With ``cache_dir`` the job saves a checkpoint after each
    epoch and a rerun resumes from the last one."""
    snapshot = lambda m: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
    checkpoints = Checkpoints(cache_dir, name, ranks)
    if (tensors := checkpoints.finished()) is not None:
        count = len({k.split(".", 1)[0] for k in tensors})
        return [{k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{t}.")} for t in range(count)]
    weights = [snapshot(model)] if keep_trajectory else []
    start, opt_state = 0, None
    if (ckpt := checkpoints.last_epoch()) is not None:
        start, opt_state, weights = ckpt["epoch"] + 1, ckpt["optimizer"], ckpt["weights"]
        model.load_state_dict(ckpt["model"])

    def on_epoch_end(epoch, m, optimizer):
        if keep_trajectory:
            weights.append(snapshot(m))
        checkpoints.save_epoch({"epoch": epoch, "model": m.state_dict(), "optimizer": optimizer.state_dict(), "weights": weights})

    train_model(model, images, labels, config, seed, start_epoch=start, optimizer_state=opt_state,
                on_epoch_end=on_epoch_end, ranks=ranks, desc=name, verbose=verbose)
    weights = weights if keep_trajectory else [snapshot(model)]
    checkpoints.finish({f"{t}.{k}": v for t, w in enumerate(weights) for k, v in w.items()})
    return weights


def check_feature_space(config: ProtectConfig, feature_backbone: Optional[nn.Module]) -> None:
    if config.lambda_fd and not config.surrogates and feature_backbone is None:
        raise ValueError("the common feature space is empty, so nothing would be protected: name surrogates in ProtectConfig "
                         "or pass feature_backbone=")


def build_shared_state(images: torch.Tensor, labels: torch.Tensor, key: AuthorizedModel, config: ProtectConfig, *,
                       feature_backbone: Optional[nn.Module] = None, cache_dir: Optional[str | os.PathLike] = None,
                       verbose: bool = True) -> SharedState:
    """Build the shared state on clean ``uint8`` images ``(N, C, H, W)`` and labels.

    Trains the key from θ0 (its trajectory), each surrogate, and each of
    ``config.other_seeds``; with a ``feature_backbone``, computes its class centroids; in
    generator mode, fits the generator. ``cache_dir`` makes the build resumable.

    Under a ``torch.distributed`` group (``accelerate launch``) every process must call this
    with the same arguments: each optimization step is shared among them
    (:mod:`uge_hf.parallel`), and the state is the same bytes as on one process.
    """
    check_feature_space(config, feature_backbone)
    ranks = Ranks.current()
    verbose = verbose and ranks.is_main
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    device = default_device()
    recipe = TrainConfig(epochs=config.trajectory_epochs, micro_batches=config.micro_batches)
    timings, clock = {}, time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[phase] = timings.get(phase, 0.0) + now - clock
        clock = now

    trajectory = resumable_training("trajectory", key.build(), images, labels, recipe, config.seed, cache, True, verbose, ranks)
    lap("trajectory")
    surrogates = []
    for i, arch in enumerate(config.surrogates):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed * 1000 + 101 + i)
            model = create_model(arch, key.num_classes, key.in_channels)
        weights = resumable_training(f"surrogate-{i}-{arch}", model, images, labels, replace(recipe, epochs=config.surrogate_epochs),
                                     config.seed + 1 + i, cache, False, verbose, ranks)
        surrogates.append((arch, weights[-1]))
    centroids = backbone_fp = None
    if feature_backbone is not None:
        centroids = class_centroids(feature_backbone, images, labels, key.num_classes, device)
        backbone_fp = tensors_fingerprint(feature_backbone.state_dict())
    lap("feature_space")
    others = [resumable_training(f"other-seed-{s}", key.sibling(s).build(), images, labels, recipe, config.seed, cache, True, verbose, ranks)
              for s in config.other_seeds]
    lap("other_seeds")
    state = SharedState(key.architecture, key.num_classes, key.in_channels, key.fingerprint, config, trajectory, surrogates,
                        others, centroids, backbone_fp, image_size=tuple(images.shape[-2:]), timings=timings)
    if config.mode == "generator":
        from .transform import fit_generator  # the generator is fitted with the transform's own objective

        state.generator = fit_generator(state, images, labels, feature_backbone=feature_backbone, cache_dir=cache, verbose=verbose,
                                        ranks=ranks)
        lap("generator")
    return state


@torch.no_grad()
def class_centroids(backbone: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int, device: torch.device) -> torch.Tensor:
    backbone.to(device).eval()
    feats = torch.cat([F.normalize(backbone(to_float(images[i:i + 256], device)).flatten(1), dim=1).cpu() for i in range(0, len(images), 256)])
    missing = [c for c in range(num_classes) if not (labels == c).any()]
    if missing:
        raise ValueError(f"classes {missing} have no image in the fit sample; enlarge fit_sample so every class appears")
    return torch.stack([feats[labels == c].mean(0) for c in range(num_classes)])
