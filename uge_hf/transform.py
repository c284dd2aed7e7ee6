"""The applied transform: δ for a batch of images, and :class:`UGETransform`, the picklable,
fingerprinted callable that ``datasets.Dataset.map`` runs.

Per-sample mode searches δ by projected signed-gradient steps on the objective of
``losses.py``; generator mode runs the fitted generator once (optionally refined by a few
per-sample steps). Every random choice of a batch (trajectory checkpoint, augmentation) is
seeded by the run's seed and the batch's *content*, so a batch gives the same bytes in any
process, on any number of processes, in any order.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn as nn

from . import __version__
from .config import ProtectConfig
from .fitting import CentroidHead, Checkpoints, Generator, SharedState, atomic_write
from .key import AuthorizedModel
from .losses import gradient_matching_loss, matched_parameters, misalignment_loss, undistillation_loss
from .models import create_model
from .parallel import Ranks, data_parallel_gradients
from .training import random_crop_flip, to_float
from .utils import default_device, progress_bar, seeded_generator, tensors_fingerprint


_IMPORT_PID = os.getpid()
GENERATOR_CHUNK = 64  # rows per generator forward pass when applying


def fork_safe_threads() -> None:
    """A worker forked after torch used its thread pool (``Dataset.map(num_proc=N)``) hangs
    on its first parallel op: such a worker computes on one thread, as is right anyway for
    N workers sharing the cores."""
    if os.getpid() != _IMPORT_PID and torch.get_num_threads() > 1:
        torch.set_num_threads(1)


class Objective:
    """The UGE objective bound to a shared state on one device: ``objective(x, x_u, y, gen)``."""

    def __init__(self, state: SharedState, feature_backbone: Optional[nn.Module] = None, device: Optional[torch.device] = None):
        self.config, self.num_classes = state.config, state.num_classes
        device = device or default_device()
        on_device = lambda w: {k: v.to(device) for k, v in w.items()}
        self.key_net = frozen(create_model(state.architecture, state.num_classes, state.in_channels).to(device).train())
        self.names = matched_parameters(self.key_net)
        # θ_T is where training ends, not a state it passes through: match at θ0 … θ_{T-1}.
        self.trajectory = [on_device(w) for w in state.trajectory[:-1]] or [on_device(state.trajectory[0])]
        self.final = on_device(state.trajectory[-1])
        self.others = [[on_device(w) for w in traj[:-1]] for traj in state.other_trajectories]
        self.heads: list[nn.Module] = []
        for arch, weights in state.surrogates:
            head = create_model(arch, state.num_classes, state.in_channels)
            head.load_state_dict(weights)
            self.heads.append(frozen(head.to(device).eval()))
        if state.centroids is not None:
            if feature_backbone is None:
                raise ValueError("this state was built with a feature backbone; pass the same feature_backbone to load it")
            if tensors_fingerprint(feature_backbone.state_dict()) != state.backbone_fingerprint:
                raise ValueError("feature_backbone's weights differ from the backbone the state was built with")
            self.heads.append(frozen(CentroidHead(feature_backbone, state.centroids).to(device).eval()))
        # Terms other than gradient matching: without any, every step must match.
        self.has_cheap_terms = bool((self.config.lambda_fd and self.heads) or self.config.lambda_ud)

    def __call__(self, x: torch.Tensor, x_u: torch.Tensor, y: torch.Tensor, gen: torch.Generator, match: bool = True) -> torch.Tensor:
        """The loss to minimize; ``match=False`` skips the (costly) gradient-matching term."""
        cfg = self.config
        # One crop and flip for both x and x_u (matched gradients must see the same view),
        # so the perturbation is also fitted to survive the hacker's augmentation.
        state = gen.get_state()
        x_u = random_crop_flip(x_u, gen)
        x = random_crop_flip(x, torch.Generator().set_state(state))
        loss = x_u.new_zeros(())
        if cfg.lambda_gm and match:
            t = int(torch.randint(len(self.trajectory), (1,), generator=gen))
            loss = loss + cfg.lambda_gm * gradient_matching_loss(self.key_net, self.trajectory[t], x, x_u, y, self.names)
        if cfg.lambda_fd and self.heads:
            loss = loss + cfg.lambda_fd * misalignment_loss(self.heads, x_u, y, self.num_classes)
        if cfg.lambda_ud:
            loss = loss + cfg.lambda_ud * undistillation_loss(self.key_net, self.final, x_u, y)
        if cfg.lambda_bind and self.others:
            traj = self.others[int(torch.randint(len(self.others), (1,), generator=gen))]
            t = int(torch.randint(len(traj), (1,), generator=gen))
            loss = loss - cfg.lambda_bind * gradient_matching_loss(self.key_net, traj[t], x, x_u, y, self.names)
        return loss


def frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def signed_gradient_search(objective: Objective, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator,
                           steps: int, start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Projected signed-gradient descent on δ, ``‖δ‖∞ ≤ ε`` and ``x + δ`` in ``[0, 1]``.

    The step decays linearly from ``step_size`` (default ε/2) to a tenth of it: big steps
    find the misaligned direction, small ones settle the gradient match.
    """
    cfg = objective.config
    eps = cfg.epsilon
    lo, hi = (-x).clamp(min=-eps), (1 - x).clamp(max=eps)
    delta = torch.zeros_like(x) if start is None else (start - x).clamp(lo, hi)
    first = cfg.step_size or eps / 2
    for k in range(steps):
        delta.requires_grad_(True)
        match = k % cfg.gm_every == 0 or not objective.has_cheap_terms
        grad, = torch.autograd.grad(objective(x, x + delta, y, gen, match=match), delta)
        alpha = first * (1 - 0.9 * k / max(1, steps - 1))
        delta = torch.max(torch.min(delta.detach() - alpha * grad.sign(), hi), lo)
    return x + delta.detach()


def quantize(x_u: torch.Tensor, clean: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Round to ``uint8`` and keep every pixel within ε of the clean one *after* rounding."""
    budget = math.floor(epsilon * 255 + 1e-6)
    rounded = (x_u * 255).round().cpu().to(torch.int16)
    clean = clean.to(torch.int16)
    return torch.max(torch.min(rounded, clean + budget), clean - budget).clamp(0, 255).to(torch.uint8)


def fit_generator(state: SharedState, images: torch.Tensor, labels: torch.Tensor, *, feature_backbone: Optional[nn.Module] = None,
                  cache_dir: Optional[Path] = None, verbose: bool = True, ranks: Ranks = Ranks()) -> dict[str, torch.Tensor]:
    """Fit the generator on a seeded sample of ``config.generator_sample`` images with the
    same objective the per-sample search minimizes; returns its weights.

    Data-parallel over ``ranks`` like the rest of the build, checkpointed after every epoch
    into ``cache_dir`` and resumed from there."""
    checkpoints = Checkpoints(cache_dir, "generator", ranks)
    if (weights := checkpoints.finished()) is not None:
        return weights
    cfg, device = state.config, default_device()
    sample = torch.randperm(len(labels), generator=seeded_generator(cfg.seed, "generator-sample"))[:cfg.generator_sample]
    images, labels = images[sample], labels[sample]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        generator = Generator(state.in_channels, state.num_classes, tuple(images.shape[-2:])).to(device)
    objective = Objective(state, feature_backbone, device)
    optimizer = torch.optim.Adam([{"params": generator.net.parameters(), "lr": 1e-3}, {"params": [generator.codes], "lr": 2e-2}])
    start = 0
    if (ckpt := checkpoints.last_epoch()) is not None:
        start = ckpt["epoch"] + 1
        generator.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    batch = min(cfg.batch_size, len(labels))
    steps_per_epoch = math.ceil(len(labels) / batch)
    bar = progress_bar(total=cfg.generator_epochs * steps_per_epoch, initial=start * steps_per_epoch, desc="generator", verbose=verbose)
    for epoch in range(start, cfg.generator_epochs):
        order = torch.randperm(len(labels), generator=seeded_generator(cfg.seed, "generator", epoch))
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            pieces = idx.tensor_split(cfg.micro_batches)

            def micro_loss(k: int) -> Optional[torch.Tensor]:
                if len(pieces[k]) == 0:
                    return None
                x, y = to_float(images[pieces[k]], device), labels[pieces[k]].to(device)
                gen = seeded_generator(cfg.seed, "generator", epoch, i, k)
                return objective(x, generator(x, y, cfg.epsilon), y, gen) * (len(pieces[k]) / len(idx))

            loss = data_parallel_gradients(generator, micro_loss, cfg.micro_batches, ranks)
            optimizer.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
        checkpoints.save_epoch({"epoch": epoch, "model": generator.state_dict(), "optimizer": optimizer.state_dict()})
    bar.close()
    weights = {k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    checkpoints.finish(weights)
    return weights


def to_pixels(image: Any, channels: int, size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """A decoded ``datasets`` image (PIL, or a dict with bytes) as ``uint8`` ``(C, H, W)``
    in the key's color mode: RGB for 3 channels (alpha dropped, palettes expanded), L for 1;
    resized (bicubic) to ``size = (width, height)`` if given."""
    if isinstance(image, dict):
        image = PIL.Image.open(io.BytesIO(image["bytes"]))
    image = image.convert("RGB" if channels == 3 else "L")
    if size is not None and image.size != tuple(size):
        image = image.resize(tuple(size), PIL.Image.BICUBIC)
    array = np.array(image, dtype=np.uint8)
    return array.reshape(*array.shape[:2], -1).transpose(2, 0, 1)


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless, deterministic PNG bytes of ``uint8`` ``(C, H, W)`` pixels."""
    hwc = pixels.transpose(1, 2, 0)
    image = PIL.Image.fromarray(hwc[..., 0] if hwc.shape[2] == 1 else hwc)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


class UGETransform:
    """The shared state plus its perturbation mode, as a ``datasets.map`` function.

    Picklable (``num_proc > 1`` works) and deterministically fingerprinted: ``datasets``
    hashes its pickle, which carries the state's exact bytes, so a rerun reuses the cache and
    any change to the state or config invalidates it. With ``with_rank=True`` each worker
    perturbs on its own GPU.

    Example:
        >>> from datasets import load_dataset
        >>> from uge_hf import AuthorizedModel, ProtectConfig, UGETransform
        >>> ds = load_dataset("../shared/data/cifar10", split="train[:200]")  # doctest: +SKIP
        >>> key = AuthorizedModel.create("convnet", num_classes=10, seed=0)
        >>> transform = UGETransform.fit(ds, key, ProtectConfig.preset("fast"))  # doctest: +SKIP
        >>> protected = ds.map(transform, batched=True, batch_size=transform.batch_size)  # doctest: +SKIP

    Batches of ``transform.batch_size`` rows give exactly the bytes that :func:`uge_hf.protect`
    writes; another ``batch_size`` gives equally valid but different perturbations.
    """

    def __init__(self, state: SharedState, *, image_column: str = "image", label_column: str = "label",
                 feature_backbone: Optional[nn.Module] = None, verbose: bool = False):
        self.state, self.image_column, self.label_column = state, image_column, label_column
        self.feature_backbone, self.verbose = feature_backbone, verbose
        self._objective: Optional[Objective] = None
        self._generator: Optional[Generator] = None

    # -- construction --------------------------------------------------------------------
    @classmethod
    def fit(cls, dataset, key: AuthorizedModel, config: Optional[ProtectConfig] = None, *, image_column: Optional[str] = None,
            label_column: Optional[str] = None, feature_backbone: Optional[nn.Module] = None,
            cache_dir: Optional[str | os.PathLike] = None, verbose: bool = True) -> "UGETransform":
        """Build the shared state on ``dataset`` (its first ``config.fit_sample`` rows) for ``key``.

        Under ``accelerate launch`` every process calls it alike and shares the work; each gets
        the same state, byte for byte (see :mod:`uge_hf.parallel`)."""
        from .data import find_columns, load_tensors, validate_labels
        from .fitting import build_shared_state

        config = config or ProtectConfig()
        image_column, label_column = find_columns(dataset, image_column, label_column)
        validate_labels(dataset, label_column, key.num_classes)
        rows = range(min(len(dataset), config.fit_sample or len(dataset)))
        images, labels = load_tensors(dataset, image_column, label_column, key.in_channels, rows=rows, size=config.resize, verbose=verbose)
        state = build_shared_state(images, labels, key, config, feature_backbone=feature_backbone, cache_dir=cache_dir, verbose=verbose)
        return cls(state, image_column=image_column, label_column=label_column, feature_backbone=feature_backbone, verbose=verbose)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Save the shared state and column names; reload with :meth:`from_pretrained`."""
        self.state.save_pretrained(directory)
        atomic_write(Path(directory) / "transform.json", json.dumps(
            {"image_column": self.image_column, "label_column": self.label_column}, sort_keys=True).encode())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, feature_backbone: Optional[nn.Module] = None, verbose: bool = False) -> "UGETransform":
        columns = json.loads((Path(directory) / "transform.json").read_text())
        return cls(SharedState.from_pretrained(directory), feature_backbone=feature_backbone, verbose=verbose, **columns)

    # -- identity and pickling -----------------------------------------------------------
    @property
    def config(self) -> ProtectConfig:
        return self.state.config

    @property
    def batch_size(self) -> int:
        return self.state.config.batch_size

    @property
    def fingerprint(self) -> str:
        """sha256 of the shared state, the columns and the package version."""
        return hashlib.sha256(f"{self.state.fingerprint}/{self.image_column}/{self.label_column}/{__version__}".encode()).hexdigest()

    def __reduce__(self):
        from safetensors.torch import save as save_bytes

        blob = save_bytes(self.state.tensors())
        return (_restore_transform, (blob, json.dumps(self.state.metadata(), sort_keys=True), self.image_column,
                                     self.label_column, self.feature_backbone))

    def __repr__(self) -> str:
        return (f"UGETransform(mode={self.config.mode!r}, epsilon={self.config.epsilon:.4f}, "
                f"key={self.state.architecture}:{self.state.key_fingerprint[:12]}…, fingerprint={self.fingerprint[:12]}…)")

    # -- applying --------------------------------------------------------------------------
    def pixels(self, image: Any) -> torch.Tensor:
        """One decoded image as the ``uint8`` tensor this transform perturbs (color mode, size)."""
        return torch.from_numpy(to_pixels(image, self.state.in_channels, self.config.resize))

    def _bind(self, device: torch.device) -> None:
        if self._objective is None:
            self._objective = Objective(self.state, self.feature_backbone, device)
            if self.state.generator is not None:
                self._generator = Generator(self.state.in_channels, self.state.num_classes, self.state.image_size)
                self._generator.load_state_dict(self.state.generator)
                frozen(self._generator.to(device).eval())

    def perturb(self, images: Sequence[torch.Tensor], labels: torch.Tensor, device: Optional[torch.device] = None) -> list[torch.Tensor]:
        """Protect one batch: ``uint8`` ``(C, H, W)`` images (sizes may differ) and labels in,
        ``uint8`` protected images out. Images of one size are optimized together."""
        fork_safe_threads()
        device = device or default_device()
        self._bind(device)
        cfg = self.config
        out: list[Optional[torch.Tensor]] = [None] * len(images)
        by_size: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):
            by_size.setdefault(tuple(img.shape), []).append(i)
        for shape, idx in sorted(by_size.items()):
            clean = torch.stack([images[i] for i in idx])
            gen = seeded_generator(cfg.seed, hashlib.sha256(clean.numpy().tobytes() + labels[idx].numpy().tobytes()).hexdigest())
            x, y = to_float(clean, device), labels[idx].to(device)
            if self._generator is None:
                x_u = signed_gradient_search(self._objective, x, y, gen, cfg.steps)
            else:
                with torch.no_grad():  # in chunks: a chunk's activations stay in cache (2x faster on a CPU core)
                    start = torch.cat([self._generator(xc, yc, cfg.epsilon)
                                       for xc, yc in zip(x.split(GENERATOR_CHUNK), y.split(GENERATOR_CHUNK))])
                x_u = signed_gradient_search(self._objective, x, y, gen, cfg.refine_steps, start) if cfg.refine_steps else start
            for i, protected in zip(idx, quantize(x_u, clean, cfg.epsilon)):
                out[i] = protected
        return out

    def __call__(self, batch: dict[str, list], *args) -> dict[str, list]:
        """``Dataset.map(transform, batched=True)``; also accepts ``with_indices=True`` and
        ``with_rank=True`` (the rank picks the GPU)."""
        if self.image_column not in batch or self.label_column not in batch:
            raise KeyError(f"batch has columns {sorted(batch)}, but this transform reads image_column={self.image_column!r} "
                           f"and label_column={self.label_column!r}; pass them to UGETransform.fit")
        rank = args[-1] if args and isinstance(args[-1], int) else None
        device = torch.device("cuda", rank % torch.cuda.device_count()) if rank is not None and torch.cuda.is_available() else None
        pixels = [self.pixels(img) for img in batch[self.image_column]]
        protected = self.perturb(pixels, torch.as_tensor(batch[self.label_column]), device)
        return {**batch, self.image_column: [{"bytes": encode_png(p.numpy()), "path": None} for p in protected]}


def _restore_transform(blob: bytes, metadata: str, image_column: str, label_column: str, feature_backbone) -> UGETransform:
    from safetensors.torch import load as load_bytes

    state = SharedState.from_parts(json.loads(metadata), load_bytes(blob))
    return UGETransform(state, image_column=image_column, label_column=label_column, feature_backbone=feature_backbone)
