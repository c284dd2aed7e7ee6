"""The one training recipe: SGD with Nesterov momentum, cosine schedule, crop and flip.

The protector uses it for the key's trajectory and the surrogates, the evaluation harness for
every clean and protected run, and the authorized user through
:func:`uge_hf.train_authorized`, so a card's accuracy can be reproduced exactly.
Images travel as ``uint8`` tensors ``(N, C, H, W)`` and become floats in ``[0, 1]`` one
batch at a time, so a 50k-image set costs 150 MB, not 600 MB.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .parallel import Ranks, data_parallel_gradients
from .utils import default_device, progress_bar, seeded_generator


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train_model`; the defaults are the evaluation recipe."""

    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = True
    micro_batches: int = 1  # a step sums this many micro-batches' gradients (uge_hf.parallel)
    # "cosine": lr to 0 over the run; "onecycle": linear warm-up over the first `warmup`
    # fraction of steps, then linear decay to 0 (super-convergence: few epochs, large batches).
    schedule: str = "cosine"
    warmup: float = 0.2
    channels_last: bool = False  # NHWC activations: faster convolutions under bf16 autocast on a GPU
    # "sgd" (Nesterov, `momentum`) or "adam"; both with L2 weight decay on weights, not on
    # biases and norms. Adam is one of the other recipes an authorized user may pick (uge_hf.attacks).
    optimizer: str = "sgd"

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")

    def to_dict(self) -> dict:
        return asdict(self)

    def learning_rate(self, step: int, total: int) -> float:
        """The learning rate at global ``step`` of ``total``."""
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * step / total))
        peak = max(1, round(self.warmup * total))
        return self.lr * ((step + 1) / peak if step < peak else (total - step) / max(1, total - peak))


SCHEDULES = ("cosine", "onecycle")
OPTIMIZERS = ("sgd", "adam")

# Named recipes, so a ProtectConfig (and a dataset card) can say which one the key's trajectory
# followed: an authorized model retraces it only when trained with the same one.
RECIPES: dict[str, TrainConfig] = {
    "standard": TrainConfig(),
    # Full datasets on a GPU (bench/paper_scale.py): 4x the batch, lr scaled with it, one-cycle,
    # channels-last. Batch-norm and SGD as in "standard"; bf16 autocast is on for CUDA in both.
    "fast": TrainConfig(batch_size=512, lr=0.2, schedule="onecycle", channels_last=True),
}


def to_float(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``uint8`` images to float ``[0, 1]`` on ``device``."""
    return images.to(device, non_blocking=True).float().div_(255)


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The standard CIFAR augmentation, vectorized: zero-pad, random crop back, random flip.

    Randomness comes from ``generator`` (on the CPU) so a run is reproducible whatever the
    device.
    """
    n, _, h, w = x.shape
    dx, dy = (torch.randint(0, 2 * pad + 1, (2, n), generator=generator)).to(x.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (torch.arange(h, device=x.device).view(1, h) + dy.view(n, 1)).view(n, 1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, w)
    cols = torch.where(flip.view(n, 1), w - 1 - cols, cols) + dx.view(n, 1)
    cols = cols.view(n, 1, 1, w)
    idx_n = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    idx_c = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    return padded[idx_n, idx_c, rows, cols]


def train_model(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig = TrainConfig(),
    seed: int = 0,
    *,
    device: Optional[torch.device] = None,
    start_epoch: int = 0,
    stop_epoch: Optional[int] = None,
    optimizer_state: Optional[dict] = None,
    on_epoch_end: Optional[Callable[[int, nn.Module, torch.optim.Optimizer], None]] = None,
    batch_transform: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]] = None,
    ranks: Ranks = Ranks(),
    desc: str = "train",
    verbose: bool = True,
) -> nn.Module:
    """Train ``model`` in place and return it.

    Each epoch's shuffle and augmentation come from a generator seeded by ``(seed, epoch)``,
    and the learning rate is a function of the global step, so a run resumed at an epoch
    boundary (``start_epoch`` plus ``optimizer_state``, as saved by ``on_epoch_end``) takes
    exactly the steps an uninterrupted one does. ``stop_epoch`` ends the run before that epoch,
    on the schedule of all ``config.epochs``: the first checkpoints of a full run, for less.

    ``batch_transform(x, y, generator)`` changes each batch after crop and flip (the training
    defenses of :mod:`uge_hf.attacks`) and returns ``(x, targets)``: class indices ``(N,)`` or
    class probabilities ``(N, K)`` (mixing, distillation), both trained with cross-entropy; it
    sees the whole batch, before the micro-batch split. Each step is split into
    ``config.micro_batches`` shared among ``ranks`` (:mod:`uge_hf.parallel`): the trained
    weights are the same bytes on any number of processes.

    Example:
        >>> import torch
        >>> from uge_hf.models import create_model
        >>> from uge_hf.training import TrainConfig, train_model
        >>> x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
        >>> y = torch.randint(0, 10, (64,))
        >>> m = train_model(create_model("convnet"), x, y, TrainConfig(epochs=1), verbose=False)
    """
    device = device or default_device()
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(device, memory_format=layout)
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, lr=config.lr)
    else:
        optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    n = len(labels)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = steps_per_epoch * config.epochs
    labels = labels.to(device)
    stop_epoch = config.epochs if stop_epoch is None else min(stop_epoch, config.epochs)
    bar = progress_bar(total=stop_epoch * steps_per_epoch, initial=start_epoch * steps_per_epoch, desc=desc, verbose=verbose)
    for epoch in range(start_epoch, stop_epoch):
        model.train()  # on_epoch_end may have evaluated it
        gen = seeded_generator(seed, epoch)
        order = torch.randperm(n, generator=gen)
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate(step, total)
            idx = order[i * config.batch_size:(i + 1) * config.batch_size]
            x, y = to_float(images[idx], device), labels[idx.to(device)]
            if config.augment:
                x = random_crop_flip(x, gen)
            if batch_transform is not None:
                x, y = batch_transform(x, y, gen)
            x = x.contiguous(memory_format=layout)
            xs, ys = x.tensor_split(config.micro_batches), y.tensor_split(config.micro_batches)

            def micro_loss(k: int) -> Optional[torch.Tensor]:
                if len(ys[k]) == 0:
                    return None
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = model(xs[k]).float()
                return F.cross_entropy(logits, ys[k], reduction="sum") / len(idx)  # summed over micro-batches: the batch mean

            loss = data_parallel_gradients(model, micro_loss, config.micro_batches, ranks)
            optimizer.step()
            bar.update(1)
            if i % 10 == 0:
                bar.set_postfix(epoch=epoch, loss=f"{loss:.3f}")
        if on_epoch_end is not None:
            on_epoch_end(epoch, model, optimizer)
    bar.close()
    return model.to(memory_format=torch.contiguous_format).eval()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 500, device: Optional[torch.device] = None) -> torch.Tensor:
    """Logits of ``model`` on ``uint8`` images, in eval mode, batch by batch."""
    device = device or default_device()
    model.to(device).eval()
    return torch.cat([model(to_float(images[i:i + batch_size], device)).float().cpu() for i in range(0, len(images), batch_size)])


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: Optional[torch.device] = None) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (predict(model, images, device=device).argmax(1) == labels.cpu()).float().mean().item()
