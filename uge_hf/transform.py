"""The applied transform: δ for a batch of images, and :class:`UGETransform`, the picklable,
fingerprinted callable that ``datasets.Dataset.map`` runs.

Per-sample mode searches δ by projected signed-gradient steps on the objective
(:mod:`uge_hf.objective`), on top of the class codes' fixed part with ``class_share``;
generator mode runs the fitted generator once (optionally refined by a few per-sample
steps). With ``retrain_rounds``, each round searches δ again from there along the key's
training on the rows protected one round earlier (:meth:`UGETransform.fit` builds those
trajectories). Every random choice of a batch (trajectory checkpoint, augmentation) is
seeded by the run's seed and the batch's *content*, so a batch gives the same bytes in any
process, on any number of processes, in any order.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from . import __version__
from .config import ProtectConfig, advise
from .data import DecodedRows, encode_png, find_columns, label_tensor, load_tensors, pil_image, to_pixels, validate_labels
from .fitting import Checkpoints, Generator, build_generator, build_shared_state, resumable_training, trajectory_recipe
from .key import AuthorizedModel, authorized_keys
from .objective import Objective, frozen, signed_gradient_search
from .parallel import Ranks, share_out
from .state import TRANSFORM_CONFIG, SharedState
from .training import to_float
from .utils import atomic_write, default_device, private_dir, progress_bar, seeded_generator


_IMPORT_PID = os.getpid()
GENERATOR_CHUNK = 64  # rows per generator forward pass when applying


def fork_safe_threads() -> None:
    """A worker forked after torch used its thread pool (``Dataset.map(num_proc=N)``) hangs
    on its first parallel op: such a worker computes on one thread, as is right anyway for
    N workers sharing the cores."""
    if os.getpid() != _IMPORT_PID and torch.get_num_threads() > 1:
        torch.set_num_threads(1)


def quantize(x_u: torch.Tensor, clean: torch.Tensor, budget: int) -> torch.Tensor:
    """Round to ``uint8`` and keep every pixel within ``budget`` levels (ε) of the clean one *after* rounding."""
    rounded = (x_u * 255).round().cpu().to(torch.int16)
    clean = clean.to(torch.int16)
    return torch.max(torch.min(rounded, clean + budget), clean - budget).clamp(0, 255).to(torch.uint8)


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
    writes *at the same number of torch threads per process*: CPU kernels split their
    reductions by thread, so floating-point sums, and now and then a rounded pixel, depend on
    it. ``Dataset.map(num_proc=N)`` workers compute on one thread each (a forked worker
    cannot reuse torch's thread pool), so they match ``protect`` run on one thread
    (``OMP_NUM_THREADS=1``, as ``accelerate launch`` sets). Another ``batch_size`` gives
    equally valid but different perturbations.
    """

    def __init__(self, state: SharedState, *, image_column: str = "image", label_column: str = "label",
                 feature_backbone: Optional[nn.Module] = None, verbose: bool = False):
        """Raises:
            ValueError: ``state`` holds other retraining rounds than its config names
                (:meth:`SharedState.check_rounds`): build it with :meth:`fit`.
        """
        state.check_rounds()
        self.state, self.image_column, self.label_column = state, image_column, label_column
        self.feature_backbone, self.verbose = feature_backbone, verbose
        self._objective: Optional[Objective] = None
        self._retrained: list[Objective] = []  # one per retraining round
        self._generator: Optional[Generator] = None
        self._class_codes: Optional[Generator] = None

    # -- construction --------------------------------------------------------------------
    @classmethod
    def fit(cls, dataset, key: AuthorizedModel | Sequence[AuthorizedModel], config: Optional[ProtectConfig] = None, *,
            image_column: Optional[str] = None,
            label_column: Optional[str] = None, feature_backbone: Optional[nn.Module] = None,
            cache_dir: Optional[str | os.PathLike] = None, verbose: bool = True) -> "UGETransform":
        """Build the shared state on ``dataset`` (its first ``config.fit_sample`` rows) for ``key``
        (or a list of keys, one per authorized partner); with ``config.retrain_rounds``, then
        protect those rows and train each key on them, once per round.

        Under ``accelerate launch`` every process calls it alike and shares the work; each gets
        the same state, byte for byte (see :mod:`uge_hf.parallel`). ``cache_dir`` keeps every
        training's progress (owner-only: it holds θ0), so that a rerun resumes.

        Warns ``LargeDatasetWarning`` when ``dataset`` has too many rows for ``config``'s
        gradient matching to keep the key, and ``MixedKeysWarning`` when keys of different
        architectures take turns in it (:func:`uge_hf.config.advise`).

        Raises:
            FileExistsError: ``cache_dir`` holds the progress of a build on other rows, keys
                or config.
        """
        config = config or ProtectConfig()
        advise(len(dataset), authorized_keys(key), config)
        return cls._fit(dataset, key, config, image_column=image_column, label_column=label_column,
                        feature_backbone=feature_backbone, cache_dir=cache_dir, verbose=verbose)

    @classmethod
    def _fit(cls, dataset, key: AuthorizedModel | Sequence[AuthorizedModel], config: ProtectConfig, *, image_column: Optional[str],
             label_column: Optional[str], feature_backbone: Optional[nn.Module], cache_dir: Optional[str | os.PathLike],
             verbose: bool) -> "UGETransform":
        """:meth:`fit` without its advice (``protect`` gives it earlier, for every protected split)."""
        keys = authorized_keys(key)
        image_column, label_column = find_columns(dataset, image_column, label_column)
        validate_labels(dataset, label_column, keys[0].num_classes)
        rows = range(min(len(dataset), config.fit_sample or len(dataset)))
        images, labels = load_tensors(dataset, image_column, label_column, keys[0].in_channels, rows=rows, size=config.resize,
                                      verbose=verbose)
        state = build_shared_state(images, labels, keys, config, feature_backbone=feature_backbone, cache_dir=cache_dir, verbose=verbose)
        # Without its rounds yet, the state is one of retrain_rounds=0; each round adds one.
        transform = cls(replace(state, config=replace(config, retrain_rounds=0)), image_column=image_column, label_column=label_column,
                        feature_backbone=feature_backbone, verbose=verbose)
        size = (images.shape[-1], images.shape[-2])
        del images  # the rounds decode the rows as the shards do
        transform._retrain(config.retrain_rounds, dataset, labels, size, keys, cache_dir, verbose)
        return transform

    def _retrain(self, rounds: int, dataset, labels: torch.Tensor, size: tuple[int, int], keys: list[AuthorizedModel],
                 cache_dir: Optional[str | os.PathLike], verbose: bool) -> None:
        """Add ``rounds`` retraining rounds to the state: each protects the fit rows (the
        first ``len(labels)`` of ``dataset``) exactly as the shards will, the rounds before it
        included, and trains every key from its θ0 on them, resized to the build's training
        ``size`` (width, height), with the trajectory's recipe, keeping every epoch (resumable
        in ``cache_dir``).

        Matching along the clean trajectory pins the key's gradients where clean training
        goes; training on the protected rows drifts from there (the more, the longer the
        training: at 20,000 rows the key kept 0.46 of its clean accuracy), and the search
        never saw where it goes. A round matches there. The processes of a distributed run share
        out the fit rows' batches and the trainings, as in the build and the shards.
        """
        start = time.perf_counter()
        ranks = Ranks.current()
        cache = private_dir(cache_dir) if cache_dir is not None else None
        recipe, batch, fit_rows = trajectory_recipe(self.config), self.batch_size, len(labels)
        clean: Optional[tuple[DecodedRows, torch.Tensor]] = None  # read when a round must protect
        for r in range(rounds):
            names = [f"retrained-{r}-{i}" for i in range(len(keys))]
            protected = None  # unread when every training of the round is in the cache
            if not all(Checkpoints(cache, name, ranks).is_finished() for name in names):
                if clean is None:  # the shards' batches: whole ones from row 0, each image as a shard decodes it
                    rows = range(min(len(dataset), -(-fit_rows // batch) * batch))
                    clean = DecodedRows(dataset, self.image_column, rows, self.pixels), label_tensor(dataset, self.label_column, rows)
                out = self.perturb_rows(*clean, desc=f"retraining round {r + 1}: protect fit rows", verbose=verbose and ranks.is_main,
                                        ranks=ranks)
                protected = torch.stack([torch.from_numpy(to_pixels(pil_image(p.numpy()), self.state.in_channels, size))
                                         for p in out[:fit_rows]])
            trained = [resumable_training(name, key.build(), protected, labels, recipe, self.config.seed, cache, True,
                                          verbose and ranks.is_main, ranks) for name, key in zip(names, keys)]
            self.state = replace(self.state, config=replace(self.config, retrain_rounds=r + 1), retrained=[*self.state.retrained, trained])
            self._objective = None  # bind the new round's trajectories
        if rounds:
            self.state.timings["retrain"] = time.perf_counter() - start

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Save the shared state and column names, owner-only (θ0 is inside); reload with
        :meth:`from_pretrained`.

        Raises:
            FileExistsError: ``directory`` holds files other than an earlier saved state.
        """
        self.state.save_pretrained(directory)
        atomic_write(private_dir(directory) / TRANSFORM_CONFIG, json.dumps(
            {"image_column": self.image_column, "label_column": self.label_column}, sort_keys=True).encode(), private=True)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, feature_backbone: Optional[nn.Module] = None, verbose: bool = False) -> "UGETransform":
        columns = json.loads((Path(directory) / TRANSFORM_CONFIG).read_text())
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
                f"keys={[f[:12] + '…' for f in self.state.key_fingerprints]}, fingerprint={self.fingerprint[:12]}…)")

    # -- applying --------------------------------------------------------------------------
    def pixels(self, image: Any) -> torch.Tensor:
        """One decoded image as the ``uint8`` tensor this transform perturbs (color mode, size)."""
        return torch.from_numpy(to_pixels(image, self.state.in_channels, self.config.resize))

    def _bind(self, device: torch.device) -> None:
        if self._objective is None:
            self._objective = Objective(self.state, self.feature_backbone, device)
            self._retrained = [self._objective.along(trajectories) for trajectories in self.state.retrained]

            def loaded(weights: Optional[dict], class_only: bool) -> Optional[Generator]:
                if weights is None:
                    return None
                generator = build_generator(self.state, class_only=class_only)
                generator.load_state_dict(weights)
                return frozen(generator.to(device).eval())

            self._generator = loaded(self.state.generator, False)
            self._class_codes = loaded(self.state.class_codes, True)

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
            offset = None
            if self._generator is None:
                if self._class_codes is not None:
                    with torch.no_grad():
                        offset = self._class_codes(x, y, cfg.class_epsilon) - x
                x_u = signed_gradient_search(self._objective, x, y, gen, cfg.steps, offset=offset)
            else:
                with torch.no_grad():  # in chunks: a chunk's activations stay in cache (2x faster on a CPU core)
                    start = torch.cat([self._generator(xc, yc, cfg.epsilon)
                                       for xc, yc in zip(x.split(GENERATOR_CHUNK), y.split(GENERATOR_CHUNK))])
                x_u = signed_gradient_search(self._objective, x, y, gen, cfg.search_steps, start) if cfg.search_steps else start
            for objective in self._retrained:  # from where the last search ended, at half its step
                x_u = signed_gradient_search(objective, x, y, gen, cfg.search_steps, x_u, offset, cfg.first_step / 2)
            for i, protected in zip(idx, quantize(x_u, clean, cfg.epsilon_levels)):
                out[i] = protected
        return out

    def perturb_rows(self, images: Sequence[torch.Tensor], labels: torch.Tensor, *, desc: str = "protect", verbose: bool = False,
                     ranks: Ranks = Ranks()) -> list[torch.Tensor]:
        """Protect rows in batches of :attr:`batch_size` from the first, as a shard does (shards
        start on a batch boundary): ``uint8`` ``(C, H, W)`` images and ``int64`` labels ``(N,)``
        in, ``uint8`` protected images out, the same bytes as in the published shards. With
        ``ranks``, every process of the group protects its share of the batches and gets all;
        ``images`` is only sliced batch by batch, so a :class:`~uge_hf.data.DecodedRows`
        decodes no more than this process's share."""
        size, count = self.batch_size, -(-len(labels) // self.batch_size)
        bar = progress_bar(total=len(range(ranks.index, count, ranks.count)), desc=desc, verbose=verbose)

        def batch(k: int) -> list[torch.Tensor]:
            out = self.perturb(list(images[k * size:(k + 1) * size]), labels[k * size:(k + 1) * size])
            bar.update()
            return [p.clone() for p in out]  # each its own storage: gathered views would pickle the whole batch each

        batches = share_out(count, batch, ranks)
        bar.close()
        return [p for b in batches for p in b]

    def __call__(self, batch: dict[str, list], *args) -> dict[str, list]:
        """``Dataset.map(transform, batched=True)``; also accepts ``with_indices=True`` and
        ``with_rank=True`` (the rank picks the GPU)."""
        if self.image_column not in batch or self.label_column not in batch:
            raise KeyError(f"batch has columns {sorted(batch)}, but this transform reads image_column={self.image_column!r} "
                           f"and label_column={self.label_column!r}; pass them to UGETransform.fit")
        if not isinstance(batch[self.label_column], (list, tuple)):  # map() without batched=True hands over one row
            raise TypeError(f"the transform perturbs batches of rows: call ds.map(transform, batched=True, "
                            f"batch_size={self.batch_size}) (the batch size is part of the bytes out)")
        rank = args[-1] if args and isinstance(args[-1], int) else None
        device = torch.device("cuda", rank % torch.cuda.device_count()) if rank is not None and torch.cuda.is_available() else None
        pixels = [self.pixels(img) for img in batch[self.image_column]]
        protected = self.perturb(pixels, torch.as_tensor(batch[self.label_column]), device)
        return {**batch, self.image_column: [{"bytes": encode_png(p.numpy()), "path": None} for p in protected]}


def _restore_transform(blob: bytes, metadata: str, image_column: str, label_column: str, feature_backbone) -> UGETransform:
    from safetensors.torch import load as load_bytes

    state = SharedState.from_parts(json.loads(metadata), load_bytes(blob))
    return UGETransform(state, image_column=image_column, label_column=label_column, feature_backbone=feature_backbone)
