"""The attacks of the threat model (DESIGN.md 2): what a hacker does to protected data to learn
from it anyway, the field's standard defenses against unlearnable examples, and the recipes
an authorized user may train the key with instead of the protector's.

Every attack is a named :class:`Attack` of one of three kinds:

- a *data defense* maps the training images once, ``uint8 (N, C, H, W)`` to ``uint8``,
  before training (JPEG, grayscale, bit-depth reduction, smoothing);
- a *training defense* changes every batch inside :func:`uge_hf.training.train_model`
  (cutout, cutmix, mixup, UEraser, adversarial training, distillation): a
  :data:`BatchTransform` on float images in ``[0, 1]`` after crop and flip;
- a *recipe* changes the :class:`~uge_hf.training.TrainConfig` (the authorized side).

Settings follow APBench (Qin et al., 2023, github.com/lafeat/apbench), the benchmark whose
tables the field quotes, unless a docstring says otherwise. Batched transforms come from
kornia; every random draw comes from the training's seeded generator, so an attacked training
is as reproducible as a plain one.

Example:
    >>> import torch
    >>> from uge_hf.attacks import get_attack, list_attacks
    >>> "jpeg10" in list_attacks()
    True
    >>> x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    >>> get_attack("grayscale+jpeg10").data(x).dtype
    torch.uint8
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional

import kornia
import kornia.augmentation as K
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import jpeg
from .training import TrainConfig

# (images, labels, generator) -> (images, targets). Images: float (N, C, H, W) in [0, 1];
# labels: int64 (N,); targets: int64 class indices (N,) or float class probabilities (N, K).
BatchTransform = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]

DEFAULT_PGD_STEPS = 10  # APBench: 10 steps (of 0.007) at ε = 8/255


# -- data defenses: uint8 images in, uint8 images out ----------------------------------------

def _pixelwise(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Apply a float ``[0, 1]`` image function to ``uint8`` images, a chunk at a time (a
    50k-image set in float would take 600 MB), rounding back to ``uint8``."""
    out = torch.empty_like(images)
    for i in range(0, len(images), chunk):
        out[i:i + chunk] = fn(images[i:i + chunk].float().div(255)).mul(255).round().clamp(0, 255).to(torch.uint8)
    return out


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma (ITU-R 601 weights, ``kornia.color.rgb_to_grayscale``) replicated to every channel:
    removes perturbations coded in color (ISS). ``uint8 (N, 3, H, W)`` in and out; one-channel
    images are returned unchanged."""
    if images.shape[1] != 3:
        return images
    return _pixelwise(lambda x: kornia.color.rgb_to_grayscale(x).expand_as(x), images)


def bit_depth(images: torch.Tensor, bits: int = 2) -> torch.Tensor:
    """Keep the ``bits`` most significant bits of each channel (``kornia.enhance.posterize``,
    APBench's bit-depth reduction at 2 bits): erases perturbations below one quantization step
    (2^bits levels, 256 / 2^bits apart). ``uint8`` in and out."""
    return _pixelwise(lambda x: kornia.enhance.posterize(x, bits), images)


def gaussian_blur(images: torch.Tensor, kernel_size: int = 3, sigma: float = 1.0) -> torch.Tensor:
    """Gaussian smoothing (``kornia.filters.gaussian_blur2d``, reflected borders). APBench's
    setting (3x3, σ = 0.1) leaves 8-bit images unchanged, so σ = 1 here. ``uint8`` in and out."""
    return _pixelwise(lambda x: kornia.filters.gaussian_blur2d(x, kernel_size, (sigma, sigma)), images)


def median_blur(images: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    """Median filter (``kornia.filters.median_blur``): removes isolated pixel-level
    perturbations while keeping edges. ``uint8`` in and out."""
    return _pixelwise(lambda x: kornia.filters.median_blur(x, kernel_size), images)


# -- training defenses: batch transforms for train_model ------------------------------------

@contextmanager
def _global_rng_from(generator: torch.Generator, device: torch.device) -> Iterator[None]:
    """kornia draws from torch's global RNG: seed it from ``generator`` for the duration, and
    restore it afterwards, so an augmentation is reproducible and leaves no trace outside."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def augmentation(module: nn.Module) -> BatchTransform:
    """A kornia augmentation (any ``kornia.augmentation`` module or container) as a
    :data:`BatchTransform`; the labels pass through."""

    def transform(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        with _global_rng_from(generator, x.device):
            return module(x), y

    return transform


def cutout() -> nn.Module:
    """Cutout (DeVries & Taylor, 2017; APBench: 16x16 on CIFAR): one zeroed square covering a
    quarter of the image (``kornia.augmentation.RandomErasing``). The square always lies wholly
    inside the image; the paper and APBench centre it anywhere and clip it at the border, so
    theirs often erases less."""
    return K.RandomErasing(scale=(0.25, 0.25), ratio=(1.0, 1.0), value=0.0, p=1.0)


def ueraser() -> nn.Module:
    """UEraser-Lite (Qin et al., 2023, "Learning the unlearnable"), APBench's policy: plasma
    brightness and contrast and channel shuffle, each drawn per image, then kornia's
    TrivialAugment (one of 14 photometric and geometric operations drawn per batch, its
    strength per image)."""
    return K.AugmentationSequential(
        K.RandomPlasmaBrightness(roughness=(0.3, 0.7), intensity=(0.5, 1.0), p=0.5),
        K.RandomPlasmaContrast(roughness=(0.3, 0.7), p=0.5),
        K.RandomChannelShuffle(p=0.5),
        K.auto.TrivialAugment(),
    )


def hardest_of(module: nn.Module, model: nn.Module, draws: int = 5) -> BatchTransform:
    """UEraser-Max's adversarial augmentation (Qin et al., 2023; APBench's ``repeat_epoch``
    mode): ``draws`` augmentations of each batch by ``module``, and of each image the copy on
    which ``model`` has the highest cross-entropy to its true label. The losses are taken in
    eval mode without gradients (batch-norm statistics see only the batch trained on). Costs
    ``draws`` extra forward passes per batch; the labels pass through."""

    def transform(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        with _global_rng_from(generator, x.device):
            copies = torch.stack([module(x) for _ in range(draws)])
        was_training = model.training
        model.eval()
        with torch.no_grad():
            losses = torch.stack([F.cross_entropy(model(c), y, reduction="none") for c in copies])
        model.train(was_training)
        return copies[losses.argmax(0), torch.arange(len(y), device=x.device)], y

    return transform


def mixing(kind: str, num_classes: int) -> BatchTransform:
    """CutMix (Yun et al., 2019) or MixUp (Zhang et al., 2018) with kornia's
    ``RandomCutMixV2`` / ``RandomMixUpV2`` at their defaults (mixing ratio drawn uniformly),
    each image paired with another of the batch; the targets become the two labels' one-hot
    vectors weighted by each image's share, float ``(N, num_classes)``."""
    if kind == "cutmix":
        module = K.RandomCutMixV2(data_keys=["input", "class"], use_correct_lambda=True)
    elif kind == "mixup":
        module = K.RandomMixUpV2(data_keys=["input", "class"])
    else:
        raise ValueError(f"mixing kind {kind!r} is not 'cutmix' or 'mixup'")

    def transform(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        with _global_rng_from(generator, x.device):
            mixed, mix = module(x, y)
        # Rows of (label of this image, label of its partner, λ); kornia's λ is the partner's
        # share for MixUp and this image's share for CutMix (use_correct_lambda).
        first, second, lam = mix.reshape(-1, 3).T
        share = lam if kind == "cutmix" else 1 - lam
        targets = share[:, None] * F.one_hot(first.long(), num_classes) + (1 - share[:, None]) * F.one_hot(second.long(), num_classes)
        return mixed, targets.float()

    return transform


def pgd_training(model: nn.Module, epsilon: float = 8 / 255, steps: int = DEFAULT_PGD_STEPS, step_size: Optional[float] = None) -> BatchTransform:
    """Adversarial training (Madry et al., 2018) as the field runs it against unlearnable
    examples: each batch is replaced by its PGD adversary within ``‖δ‖∞ ≤ epsilon`` (pixel
    scale 0-1) that maximizes the cross-entropy to the *true* labels, from a uniform random
    start, ``steps`` signed-gradient steps of ``step_size``, each projected onto the ε-ball
    within the image box ``[0, 1]``. The default step is 2.5·ε/steps (the ``robustness``
    library's rule: 2/255 for ε = 8/255 and 10 steps), and 1.25·ε for a single step (FGSM with
    a random start, Wong et al., 2020: with a step of 2ε or more, training overfits
    catastrophically to the one-step adversary). The model is in eval mode while the adversary
    is built (batch-norm statistics see only training batches), as in APBench. Costs ``steps``
    extra forward and backward passes per batch."""
    alpha = step_size if step_size is not None else (1.25 * epsilon if steps == 1 else 2.5 * epsilon / steps)

    def transform(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        # Project onto the box as well as the ball after every step: a pixel left outside [0, 1]
        # gets no gradient through a clamp in the forward pass and would never move again.
        project = lambda d: (x + d.clamp(-epsilon, epsilon)).clamp(0, 1) - x
        delta = project(((torch.rand(x.shape, generator=generator) * 2 - 1) * epsilon).to(x.device))
        was_training = model.training
        model.eval()
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = F.cross_entropy(model(x + delta), y)
            grad, = torch.autograd.grad(loss, delta)
            delta = project(delta.detach() + alpha * grad.sign())
        model.train(was_training)
        return (x + delta).detach(), y

    return transform


def distillation(teacher: nn.Module, temperature: float = 4.0) -> BatchTransform:
    """Knowledge distillation (after Hinton et al., 2015): the targets become the teacher's
    probabilities at ``temperature`` on the same (augmented) batch, float ``(N, K)``, which the
    student fits by cross-entropy at temperature 1 (Hinton's loss also softens the student's
    logits, scales by T² and adds the hard labels; this soft-target form keeps train_model's
    loss)."""
    teacher.eval()

    def transform(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return x, F.softmax(teacher(x).float() / temperature, 1)

    return transform


# -- the registry -------------------------------------------------------------------------

@dataclass(frozen=True)
class Attack:
    """A named attack. At most one of ``data``, ``batch`` and ``recipe`` is set (none: no attack).

    Attributes:
        name: as in :func:`list_attacks` (``"jpeg10"``, ``"adversarial"``, ...).
        description: one line for tables and help.
        data: the data defense, ``uint8 (N, C, H, W)`` to ``uint8``.
        batch: ``batch(model, teacher, num_classes)`` builds the training defense's
            :data:`BatchTransform` for the model being trained.
        recipe: maps the evaluation's :class:`TrainConfig` to the one this attack trains with.
        authorized: the authorized user's side (trained from the key's θ0), not a hacker's.
        needs_teacher: ``batch`` takes the key trained on the same rows (distillation).
    """

    name: str
    description: str
    data: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    batch: Optional[Callable[[nn.Module, Optional[nn.Module], int], BatchTransform]] = None
    recipe: Optional[Callable[[TrainConfig], TrainConfig]] = None
    authorized: bool = False
    needs_teacher: bool = False

    def prepare(self, images: torch.Tensor, model: nn.Module, config: TrainConfig, *, num_classes: int,
                teacher: Optional[nn.Module] = None) -> tuple[torch.Tensor, TrainConfig, Optional[BatchTransform]]:
        """The training images, the recipe and the batch transform with which ``model`` trains
        under this attack: ``train_model(model, images, labels, config, batch_transform=transform)``.

        Raises:
            ValueError: the attack needs a teacher and none was given.
        """
        if self.needs_teacher and teacher is None:
            raise ValueError(f"attack {self.name!r} needs a teacher: the key trained on the same rows")
        images = self.data(images) if self.data is not None else images
        config = self.recipe(config) if self.recipe is not None else config
        transform = self.batch(model, teacher, num_classes) if self.batch is not None else None
        return images, config, transform


def _adversarial(steps: int) -> Attack:
    return Attack(f"adversarial-{steps}" if steps != DEFAULT_PGD_STEPS else "adversarial",
                  f"adversarial training, PGD-{steps} at ε = 8/255 against the true labels",
                  batch=lambda model, teacher, k: pgd_training(model, steps=steps))


ATTACKS: dict[str, Attack] = {a.name: a for a in (
    Attack("none", "no attack"),
    Attack("jpeg10", "JPEG re-encoding at quality 10 (libjpeg)", data=lambda x: jpeg(x, 10)),
    Attack("jpeg30", "JPEG re-encoding at quality 30", data=lambda x: jpeg(x, 30)),
    Attack("jpeg50", "JPEG re-encoding at quality 50", data=lambda x: jpeg(x, 50)),
    Attack("grayscale", "grayscale, replicated to 3 channels", data=grayscale),
    Attack("grayscale+jpeg10", "grayscale, then JPEG at quality 10", data=lambda x: jpeg(grayscale(x), 10)),
    Attack("bitdepth2", "bit-depth reduction to 2 bits per channel", data=lambda x: bit_depth(x, 2)),
    Attack("bitdepth4", "bit-depth reduction to 4 bits per channel", data=lambda x: bit_depth(x, 4)),
    Attack("gaussian", "Gaussian smoothing, 3x3, σ = 1 pixel", data=gaussian_blur),
    Attack("median", "median filter, 3x3", data=median_blur),
    Attack("cutout", "cutout: a random square of a quarter of the image zeroed", batch=lambda model, teacher, k: augmentation(cutout())),
    Attack("cutmix", "CutMix with soft labels", batch=lambda model, teacher, k: mixing("cutmix", k)),
    Attack("mixup", "MixUp with soft labels", batch=lambda model, teacher, k: mixing("mixup", k)),
    Attack("ueraser", "UEraser-Lite: plasma, channel shuffle, TrivialAugment", batch=lambda model, teacher, k: augmentation(ueraser())),
    Attack("ueraser-max", "UEraser-Max: of 5 UEraser-Lite draws, each image's hardest", batch=lambda model, teacher, k: hardest_of(ueraser(), model)),
    _adversarial(DEFAULT_PGD_STEPS),
    Attack("distill", "distillation (T = 4) from the key trained on the same rows", batch=lambda model, teacher, k: distillation(teacher),
           needs_teacher=True),
    Attack("recipe-adam", "the key trained with Adam (lr 1e-3) instead of SGD", authorized=True,
           recipe=lambda c: replace(c, optimizer="adam", lr=1e-3)),
    Attack("recipe-2x-epochs", "the key trained for twice the epochs", authorized=True, recipe=lambda c: replace(c, epochs=2 * c.epochs)),
    Attack("recipe-batch-256", "the key trained with batches of 256 (same learning rate)", authorized=True,
           recipe=lambda c: replace(c, batch_size=256)),
)}


def list_attacks() -> list[str]:
    """Names :func:`get_attack` knows, in table order; ``adversarial-<steps>`` is PGD with
    another number of steps."""
    return list(ATTACKS)


def get_attack(name: str) -> Attack:
    """The attack called ``name``.

    Raises:
        ValueError: an unknown name, listing the known ones.
    """
    if name in ATTACKS:
        return ATTACKS[name]
    match = re.fullmatch(r"adversarial-([1-9][0-9]*)", name)
    if match:
        return _adversarial(int(match.group(1)))
    raise ValueError(f"unknown attack {name!r}; available: {', '.join(ATTACKS)}, or adversarial-<steps> (PGD with that many steps)")
