"""The judge: train the key and a hacker panel on clean and on protected data, report
clean-test accuracy, under each attack of the threat model (DESIGN.md 2)."""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn as nn
import torch.nn.functional as F

from .key import AuthorizedModel
from .models import DEFAULT_HACKERS, create_model
from .training import TrainConfig, accuracy, train_model


def jpeg(images: torch.Tensor, quality: int = 10) -> torch.Tensor:
    """Re-encode each image as JPEG: the compression defense against unlearnable examples."""
    out = []
    for img in images.permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        PIL.Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(buffer, format="JPEG", quality=quality)
        decoded = np.asarray(PIL.Image.open(buffer).convert("RGB" if img.shape[-1] == 3 else "L"))
        out.append(decoded.reshape(*decoded.shape[:2], -1))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma, replicated to every channel: kills color-coded perturbations."""
    weights = torch.tensor([0.299, 0.587, 0.114])[: images.shape[1]]
    luma = (images.float() * (weights / weights.sum()).view(1, -1, 1, 1)).sum(1, keepdim=True).round()
    return luma.expand_as(images).to(torch.uint8).contiguous()


def bit_depth(images: torch.Tensor, bits: int = 3) -> torch.Tensor:
    """Quantize to ``bits`` per channel (bin centers): erases perturbations below a bin."""
    step = 256 // (1 << bits)
    return (images // step * step + step // 2).to(torch.uint8)


# An attack returns (training images, train_model keyword arguments) given the data and the
# authorized teacher; data attacks only touch the images.
ATTACKS: dict[str, Callable] = {
    "none": lambda x: x,
    "jpeg": jpeg,
    "grayscale": grayscale,
    "bitdepth": bit_depth,
    "adversarial": None,  # adversarial training, see _attack_kwargs
    "distill": None,  # distilling the authorized model trained on the protected data
}


def adversarial_training(model: nn.Module, epsilon: float = 8 / 255) -> Callable:
    """An ``input_transform`` for :func:`train_model`: one signed-gradient step of size ε
    from a random start (FGSM with random init, the cheap adversarial training)."""

    def transform(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        start = (torch.rand(x.shape, generator=gen).to(x.device) * 2 - 1) * epsilon
        x_adv = (x + start).clamp(0, 1).requires_grad_(True)
        was_training = model.training
        model.eval()
        logits = model(x_adv)
        model.train(was_training)
        # Labels are unknown here, so push away from the current prediction.
        grad, = torch.autograd.grad(F.cross_entropy(logits, logits.argmax(1)), x_adv)
        return (x + (start + 1.25 * epsilon * grad.sign()).clamp(-epsilon, epsilon)).clamp(0, 1).detach()

    return transform


@dataclass
class Result:
    model: str
    attack: str
    clean_acc: float
    protected_acc: float
    seconds: float  # training on the protected (or attacked) data
    clean_seconds: Optional[float] = None  # training on the clean data, when it ran here

    @property
    def ratio(self) -> float:
        return self.protected_acc / self.clean_acc if self.clean_acc else float("nan")


class EvaluationReport(list):
    """A list of :class:`Result` rows, with a Markdown table and JSON."""

    def to_markdown(self) -> str:
        lines = ["| model | attack | clean-trained acc | protected-trained acc | protected / clean |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r.model} | {r.attack} | {r.clean_acc:.2f} | {r.protected_acc:.2f} | {r.ratio:.2f} |" for r in self]
        return "\n".join(lines)

    def to_dicts(self) -> list[dict]:
        return [dict(asdict(r), ratio=r.ratio) for r in self]

    def to_json(self) -> str:
        return json.dumps(self.to_dicts(), indent=2)

    def summary(self, key_name: str = "key θ0", sibling_prefix: str = "key arch") -> dict:
        """The headline figures of DESIGN.md 5 and the efficacy issue."""
        plain = [r for r in self if r.attack == "none"]
        hackers = [r for r in plain if not r.model.startswith((key_name, sibling_prefix))]
        attacked = [r for r in self if r.attack != "none" and not r.model.startswith((key_name, sibling_prefix))]
        key = next((r for r in plain if r.model == key_name), None)
        sibling = [r for r in plain if r.model.startswith(sibling_prefix)]
        out = {
            "key_ratio": key.ratio if key else None,
            "authorized_gap_pt": key.clean_acc - key.protected_acc if key else None,
            "sibling_ratio": sibling[0].ratio if sibling else None,
            "hacker_ratios": {r.model: r.ratio for r in hackers},
            "mean_hacker_ratio": float(np.mean([r.ratio for r in hackers])) if hackers else None,
            "max_hacker_ratio": max((r.ratio for r in hackers), default=None),
            "mean_hacker_acc": float(np.mean([r.protected_acc for r in hackers])) if hackers else None,
        }
        if attacked:
            out["robust_hacker_acc"] = max(r.protected_acc for r in attacked)
            out["robust_hacker_ratio"] = max(r.ratio for r in attacked)
        return out


def evaluate_tensors(clean: tuple[torch.Tensor, torch.Tensor], protected: tuple[torch.Tensor, torch.Tensor],
                     test: tuple[torch.Tensor, torch.Tensor], key: AuthorizedModel, *, hackers: Sequence[str] = DEFAULT_HACKERS,
                     sibling_seeds: Sequence[int] = (7,), attacks: Sequence[str] = ("none",), attacked_models: Optional[Sequence[str]] = None,
                     train_config: TrainConfig = TrainConfig(), seed: int = 0, clean_acc: Optional[dict[str, float]] = None,
                     verbose: bool = True) -> EvaluationReport:
    """Train each model on the clean and on the protected set (``uint8`` tensors and labels)
    with one recipe, and measure clean-test accuracy. Rows: the key from θ0, the key's
    architecture from each of ``sibling_seeds``, and each hacker; each attack in ``attacks``
    (besides ``"none"``) is run for ``attacked_models`` (default: all hackers) on the
    protected data only (its clean-trained accuracy is the un-attacked one). ``clean_acc``
    (model name to accuracy, from an earlier report of the same run) skips clean trainings
    already done, so several protected variants share one clean baseline."""
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; available: {', '.join(ATTACKS)}")
    models = model_panel(key, hackers, sibling_seeds)
    report, teachers = EvaluationReport(), {}
    clean_acc = dict(clean_acc or {})
    for name, factory in models:
        row = {"clean": clean_acc.get(name)}
        for which, (x, y) in (("clean", clean), ("protected", protected)):
            if row.get(which) is not None:
                continue
            start = time.perf_counter()
            model = train_model(factory(), x, y, train_config, seed, desc=f"{name} on {which}", verbose=verbose)
            row[which] = accuracy(model, *test)
            row[which + "_s"] = time.perf_counter() - start
            if name == "key θ0" and which == "protected":
                teachers["distill"] = model
        clean_acc[name] = row["clean"]
        report.append(Result(name, "none", row["clean"], row["protected"], row["protected_s"], row.get("clean_s")))
    for attack in attacks:
        if attack == "none":
            continue
        for name, factory in models:
            if name.startswith("key") or (attacked_models is not None and name not in attacked_models):
                continue
            start = time.perf_counter()
            model = factory()
            x, y = protected
            kwargs = {}
            if attack == "adversarial":
                kwargs["input_transform"] = adversarial_training(model)
            elif attack == "distill":
                teacher = teachers["distill"]
                kwargs["soft_targets"] = lambda batch: F.softmax(teacher(batch) / 4.0, 1)
            else:
                x = ATTACKS[attack](x)
            model = train_model(model, x, y, train_config, seed, desc=f"{name} on protected, {attack}", verbose=verbose, **kwargs)
            report.append(Result(name, attack, clean_acc[name], accuracy(model, *test), time.perf_counter() - start))
    return report


def model_panel(key: AuthorizedModel, hackers: Sequence[str] = DEFAULT_HACKERS, sibling_seeds: Sequence[int] = (7,)) -> list[tuple[str, Callable[[], nn.Module]]]:
    """The evaluated models, by name, each a factory of a freshly initialized module: the key
    from θ0, the key's architecture from each sibling seed, and each hacker (fixed seeds)."""
    models = [("key θ0", key.build)] + [(f"key arch, seed {s}", key.sibling(s).build) for s in sibling_seeds]
    return models + [(arch, _seeded_factory(arch, key, 1000 + i)) for i, arch in enumerate(hackers)]


def _seeded_factory(arch: str, key: AuthorizedModel, seed: int) -> Callable[[], nn.Module]:
    def build():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return create_model(arch, key.num_classes, key.in_channels)

    return build


def evaluate(protected_train, clean_test, key: AuthorizedModel, *, clean_train, hackers: Sequence[str] = DEFAULT_HACKERS,
             epochs: int = 15, attacks: Sequence[str] = ("none",), sibling_seeds: Sequence[int] = (7,), image_column: Optional[str] = None,
             label_column: Optional[str] = None, seed: int = 0, verbose: bool = True) -> EvaluationReport:
    """Evaluate a protected ``datasets.Dataset`` against the clean rows it came from.

    Example:
        >>> report = evaluate(protected, ds["test"], key, clean_train=ds["train"].select(range(len(protected))))  # doctest: +SKIP
        >>> print(report.to_markdown())  # doctest: +SKIP
    """
    from .data import find_columns, load_tensors

    def tensors(ds):
        img, lbl = find_columns(ds, image_column, label_column)
        return load_tensors(ds, img, lbl, key.in_channels, verbose=verbose)

    if len(clean_train) != len(protected_train):
        raise ValueError(f"clean_train has {len(clean_train)} rows but protected_train has {len(protected_train)}; "
                         "pass the clean rows that were protected, in the same order")
    return evaluate_tensors(tensors(clean_train), tensors(protected_train), tensors(clean_test), key, hackers=hackers,
                            sibling_seeds=sibling_seeds, attacks=attacks, train_config=TrainConfig(epochs=epochs), seed=seed, verbose=verbose)


def train_authorized(model: nn.Module, dataset, *, epochs: int = 15, seed: int = 0, image_column: Optional[str] = None,
                     label_column: Optional[str] = None, verbose: bool = True) -> nn.Module:
    """Train the key model on a protected dataset with the evaluation's recipe, so the
    authorized accuracy on a dataset card can be reproduced.

    Example:
        >>> ds, model = load_protected("cifar10-uge", authorized_model="key/")  # doctest: +SKIP
        >>> model = train_authorized(model, ds["train"], epochs=15)  # doctest: +SKIP
    """
    from .data import find_columns, load_tensors

    img, lbl = find_columns(dataset, image_column, label_column)
    channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    x, y = load_tensors(dataset, img, lbl, channels, verbose=verbose)
    return train_model(model, x, y, TrainConfig(epochs=epochs), seed, desc="authorized", verbose=verbose)
