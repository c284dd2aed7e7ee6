"""Building the shared state of a run, once: the key's trajectory, the common feature space,
trajectories of other seeds (for binding to θ0) and, in generator mode, the generator (or,
with ``class_share``, the class-consistent part of δ).

Every training job checkpoints at each epoch into a cache folder and resumes from there,
so an interrupted build finishes with the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from . import __version__
from .attacks import BatchTransform, pgd_training
from .config import ProtectConfig
from .key import AuthorizedModel, authorized_keys
from .models import create_model
from .objective import Objective
from .parallel import Ranks, data_parallel_gradients
from .state import SharedState
from .training import RECIPES, TrainConfig, to_float, train_model
from .utils import (atomic_write, default_device, foreign_entries, module_fingerprint, private_dir, progress_bar, seeded_generator,
                    tensors_fingerprint)

# PGD steps of the surrogates' adversarial training (ProtectConfig.surrogate_epsilon): each
# costs one more forward and backward pass per batch, and a slightly robust model needs few.
SURROGATE_PGD_STEPS = 2


class Generator(nn.Module):
    """δ = ε · clamp(G(x) + up(P[y])): a small conv net plus one learned spatial code per class.

    The clamp passes gradients straight through, so unlike a tanh the output never
    saturates into a dead zone (the first prototype's failure); the class codes give the
    misalignment a per-class direction that a per-image network finds hard to learn.

    With ``per_image=False`` only the codes remain, on a grid ``factor`` times coarser than
    ``size`` (height, width) and upsampled bilinearly: the class-consistent part of δ
    (``ProtectConfig.class_share``), the same for every image of a class.
    """

    def __init__(self, in_channels: int, num_classes: int, size: tuple[int, int], width: int = 32, *,
                 per_image: bool = True, factor: int = 1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, in_channels, 3, padding=1),
        ) if per_image else None
        # Codes start as random class-wise patterns at full budget (a ready shortcut); the
        # objective then reshapes them so the key still learns.
        self.codes = nn.Parameter(torch.rand(num_classes, in_channels, -(-size[0] // factor), -(-size[1] // factor)) * 2 - 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor, epsilon: float) -> torch.Tensor:
        """``x``: float ``(N, C, H, W)`` on the 0-1 scale; returns ``x + δ`` in [0, 1], ``‖δ‖∞ ≤ epsilon``."""
        raw = self.codes[y]
        if raw.shape[-2:] != x.shape[-2:]:
            raw = F.interpolate(raw, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.net is not None:
            raw = self.net(x * 2 - 1) + raw
        delta = epsilon * (raw.clamp(-1, 1) - raw).detach() + epsilon * raw  # straight-through clamp
        return (x + delta).clamp(0, 1)


def build_generator(state: SharedState, *, class_only: bool = False) -> Generator:
    """The untrained generator of ``state``'s run, or with ``class_only`` its class codes (on
    the low-frequency grid): what :func:`fit_generator` fits and the transform loads."""
    factor = state.config.low_frequency_factor if class_only else 1
    return Generator(state.in_channels, state.num_classes, state.image_size, per_image=not class_only, factor=factor)


class Checkpoints:
    """Where one optimization of the build keeps its progress in ``cache_dir``:
    ``{name}.resume.pt`` after every epoch, ``{name}.safetensors`` once finished. Every
    process reads them; only the main process writes (all hold the same weights)."""

    def __init__(self, cache_dir: Optional[Path], name: str, ranks: Ranks):
        self.done = cache_dir / f"{name}.safetensors" if cache_dir is not None else None
        self.resume = cache_dir / f"{name}.resume.pt" if cache_dir is not None else None
        self.writer = ranks.is_main

    def is_finished(self) -> bool:
        return self.done is not None and self.done.exists()

    def finished(self) -> Optional[dict[str, torch.Tensor]]:
        return load_safetensors_bytes(self.done.read_bytes()) if self.is_finished() else None

    def last_epoch(self) -> Optional[dict]:
        return torch.load(self.resume, weights_only=True) if self.resume is not None and self.resume.exists() else None

    def save_epoch(self, payload: dict) -> None:
        if self.resume is not None and self.writer:
            buffer = io.BytesIO()
            torch.save(payload, buffer)
            atomic_write(self.resume, buffer.getvalue(), private=True)

    def finish(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.done is not None and self.writer:
            atomic_write(self.done, save_safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}), private=True)
            self.resume.unlink(missing_ok=True)


def claim_cache(cache_dir: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor, keys: Sequence[AuthorizedModel],
                config: ProtectConfig, backbone_fingerprint: Optional[str], ranks: Ranks) -> Path:
    """``cache_dir`` as this build's cache (owner-only: it holds θ0's trajectory), marked with
    what the build depends on: a cached training is valid only for the rows, keys, config
    and version that made it, and its name says none of that.

    Raises:
        FileExistsError: ``cache_dir`` holds the progress of another build, or files that
            uge-hf did not write (it neither writes beside them nor re-permissions them).
    """
    marker = Path(cache_dir) / "build-identity"
    # Another process of the run may be writing the marker: its temporary file is ours.
    foreign = foreign_entries(sorted(p.name for p in marker.parent.iterdir()) if marker.parent.is_dir() else [], [marker.name])
    if foreign and not marker.is_file():
        raise FileExistsError(f"cache_dir {cache_dir} holds files uge-hf did not write ({', '.join(foreign[:5])}); pass a new or "
                              "empty folder (it will hold θ0's trajectory: keep it private)")
    cache = private_dir(cache_dir)
    parts = [tensors_fingerprint({"images": images, "labels": labels}), *(k.fingerprint for k in keys), config.to_json(),
             str(backbone_fingerprint), __version__]
    identity = hashlib.sha256("/".join(parts).encode()).hexdigest()
    if marker.exists() and marker.read_text() != identity:
        raise FileExistsError(f"cache_dir {cache} holds the progress of a build on other rows, keys or config (or another uge-hf "
                              "version); pass an empty cache_dir, or remove that one, to build afresh")
    if not marker.exists() and ranks.is_main:
        atomic_write(marker, identity.encode(), private=True)
    return cache


def resumable_training(name: str, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig,
                       seed: int, cache_dir: Optional[Path], keep_trajectory: bool, verbose: bool,
                       ranks: Ranks = Ranks(), stop_epoch: Optional[int] = None,
                       batch_transform: Optional[BatchTransform] = None) -> list[dict[str, torch.Tensor]]:
    """Train ``model`` and return its weights after every epoch (or only the last),
    θ0 first when ``keep_trajectory``; ``stop_epoch`` ends it early and ``batch_transform``
    changes every batch, as in ``train_model``.
    With ``cache_dir`` the job saves a checkpoint after each epoch and a rerun resumes from the
    last one."""
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

    train_model(model, images, labels, config, seed, start_epoch=start, stop_epoch=stop_epoch, optimizer_state=opt_state,
                on_epoch_end=on_epoch_end, batch_transform=batch_transform, ranks=ranks, desc=name, verbose=verbose)
    weights = weights if keep_trajectory else [snapshot(model)]
    checkpoints.finish({f"{t}.{k}": v for t, w in enumerate(weights) for k, v in w.items()})
    return weights


def trajectory_recipe(config: ProtectConfig) -> TrainConfig:
    """How the build trains each key (its trajectory) and, with its own epochs, the surrogates."""
    return replace(RECIPES[config.recipe], epochs=config.trajectory_epochs, micro_batches=config.micro_batches)


def check_feature_space(config: ProtectConfig, feature_backbone: Optional[nn.Module]) -> None:
    if config.lambda_fd and not config.surrogates and feature_backbone is None:
        raise ValueError("the common feature space is empty, so nothing would be protected: name surrogates in ProtectConfig "
                         "or pass feature_backbone=")


def build_shared_state(images: torch.Tensor, labels: torch.Tensor, keys: AuthorizedModel | Sequence[AuthorizedModel], config: ProtectConfig, *,
                       feature_backbone: Optional[nn.Module] = None, cache_dir: Optional[str | os.PathLike] = None,
                       verbose: bool = True) -> SharedState:
    """Build the shared state on clean ``uint8`` images ``(N, C, H, W)`` and labels.

    Trains each authorized key from its θ0 (its trajectory), each surrogate, and each of
    ``config.other_seeds`` (of the first key's architecture); with a ``feature_backbone``, computes its class centroids; in
    generator mode, fits the generator; with ``config.class_share``, the class codes.
    ``cache_dir`` makes the build resumable (:func:`claim_cache` refuses another build's).

    Under a ``torch.distributed`` group (``accelerate launch``) every process must call this
    with the same arguments: each optimization step is shared among them
    (:mod:`uge_hf.parallel`), and the state is the same bytes as on one process.
    """
    check_feature_space(config, feature_backbone)
    keys = authorized_keys(keys)
    key = keys[0]  # all keys share the class count and channels (authorized_keys checks)
    if config.lambda_bind and len(keys) > 1:
        raise ValueError("lambda_bind (negative matching on other seeds of one key's architecture) takes a single key")
    ranks = Ranks.current()
    verbose = verbose and ranks.is_main
    backbone_fp = module_fingerprint(feature_backbone)
    cache = claim_cache(cache_dir, images, labels, keys, config, backbone_fp, ranks) if cache_dir is not None else None
    device = default_device()
    recipe = trajectory_recipe(config)
    timings, clock = {}, time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[phase] = timings.get(phase, 0.0) + now - clock
        clock = now

    # One trajectory per key; the first keeps the single-key cache name, so a one-key state is unchanged.
    trajectories = [resumable_training("trajectory" if i == 0 else f"trajectory-{i}", k.build(), images, labels, recipe, config.seed,
                                       cache, True, verbose, ranks) for i, k in enumerate(keys)]
    lap("trajectory")
    surrogates = []
    for i, arch in enumerate(config.surrogates):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed * 1000 + 101 + i)
            model = create_model(arch, key.num_classes, key.in_channels)
        robust = pgd_training(model, config.surrogate_epsilon, SURROGATE_PGD_STEPS) if config.surrogate_epsilon else None
        n, epochs = config.surrogate_checkpoints, config.surrogate_epochs
        weights = resumable_training(f"surrogate-{i}-{arch}", model, images, labels, replace(recipe, epochs=epochs),
                                     config.seed + 1 + i, cache, n > 1, verbose, ranks, batch_transform=robust)
        # weights holds θ0 … θ_E when kept: the checkpoints after epochs E·j/n, j = 1 … n
        surrogates += [(arch, weights[-1])] if n == 1 else [(arch, weights[round(epochs * j / n)]) for j in range(1, n + 1)]
    centroids = class_centroids(feature_backbone, images, labels, key.num_classes, device) if feature_backbone is not None else None
    lap("feature_space")
    # L_bind matches θ0 … θ_{k-1} of each other seed (objective.py): k epochs of training give them.
    others = [resumable_training(f"other-seed-{s}", key.sibling(s).build(), images, labels, recipe, config.seed, cache, True, verbose, ranks,
                                 stop_epoch=config.bind_checkpoints or None) for s in config.other_seeds]
    lap("other_seeds")
    state = SharedState([k.architecture for k in keys], key.num_classes, key.in_channels, [k.fingerprint for k in keys], config,
                        trajectories, surrogates, others, centroids, backbone_fp, image_size=tuple(images.shape[-2:]), timings=timings)
    if config.mode == "generator":
        state.generator = fit_generator(state, images, labels, feature_backbone=feature_backbone, cache_dir=cache, verbose=verbose,
                                        ranks=ranks)
        lap("generator")
    if config.class_share:
        state.class_codes = fit_generator(state, images, labels, class_only=True, feature_backbone=feature_backbone, cache_dir=cache,
                                          verbose=verbose, ranks=ranks)
        lap("class_codes")
    return state


@torch.no_grad()
def class_centroids(backbone: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int, device: torch.device) -> torch.Tensor:
    backbone.to(device).eval()
    feats = torch.cat([F.normalize(backbone(to_float(images[i:i + 256], device)).flatten(1), dim=1).cpu() for i in range(0, len(images), 256)])
    missing = [c for c in range(num_classes) if not (labels == c).any()]
    if missing:
        raise ValueError(f"classes {missing} have no image in the fit sample; enlarge fit_sample so every class appears")
    return torch.stack([feats[labels == c].mean(0) for c in range(num_classes)])


def fit_generator(state: SharedState, images: torch.Tensor, labels: torch.Tensor, *, class_only: bool = False,
                  feature_backbone: Optional[nn.Module] = None, cache_dir: Optional[Path] = None, verbose: bool = True,
                  ranks: Ranks = Ranks()) -> dict[str, torch.Tensor]:
    """Fit the generator on a seeded sample of ``config.generator_sample`` images with the
    same objective the per-sample search minimizes; returns its weights. With ``class_only``,
    fit the class codes alone instead (``Generator(per_image=False)`` on the low-frequency
    grid, at ``class_share·ε``, for ``class_epochs``): the class-consistent part of δ.

    Data-parallel over ``ranks`` like the rest of the build, checkpointed after every epoch
    into ``cache_dir`` and resumed from there."""
    cfg, device = state.config, default_device()
    name, epochs, epsilon = ("class-codes", cfg.class_epochs, cfg.class_epsilon) if class_only else \
        ("generator", cfg.generator_epochs, cfg.epsilon)
    checkpoints = Checkpoints(cache_dir, name, ranks)
    if (weights := checkpoints.finished()) is not None:
        return weights
    sample = torch.randperm(len(labels), generator=seeded_generator(cfg.seed, f"{name}-sample"))[:cfg.generator_sample]
    images, labels = images[sample], labels[sample]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        generator = build_generator(state, class_only=class_only).to(device)
    objective = Objective(state, feature_backbone, device)
    groups = [{"params": [generator.codes], "lr": 2e-2}]
    if generator.net is not None:
        groups.insert(0, {"params": generator.net.parameters(), "lr": 1e-3})
    optimizer = torch.optim.Adam(groups)
    start = 0
    if (ckpt := checkpoints.last_epoch()) is not None:
        start = ckpt["epoch"] + 1
        generator.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    batch = min(cfg.batch_size, len(labels))
    steps_per_epoch = math.ceil(len(labels) / batch)
    bar = progress_bar(total=epochs * steps_per_epoch, initial=start * steps_per_epoch, desc=name, verbose=verbose)
    for epoch in range(start, epochs):
        order = torch.randperm(len(labels), generator=seeded_generator(cfg.seed, name, epoch))
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            pieces = idx.tensor_split(cfg.micro_batches)

            def micro_loss(k: int) -> Optional[torch.Tensor]:
                if len(pieces[k]) == 0:
                    return None
                x, y = to_float(images[pieces[k]], device), labels[pieces[k]].to(device)
                gen = seeded_generator(cfg.seed, name, epoch, i, k)
                return objective(x, generator(x, y, epsilon), y, gen) * (len(pieces[k]) / len(idx))

            loss = data_parallel_gradients(generator, micro_loss, cfg.micro_batches, ranks)
            optimizer.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
        checkpoints.save_epoch({"epoch": epoch, "model": generator.state_dict(), "optimizer": optimizer.state_dict()})
    bar.close()
    weights = {k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    checkpoints.finish(weights)
    return weights
