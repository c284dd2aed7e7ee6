"""The judge: train the key and a hacker panel on clean and on protected data, under each
attack of the threat model (DESIGN.md 2, :mod:`uge_hf.attacks`), and report clean-test
accuracy at the best and at the last epoch, as the field reports it."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .attacks import Attack, get_attack
from .key import AuthorizedModel, authorized_keys
from .models import DEFAULT_HACKERS, create_model
from .training import TrainConfig, accuracy, train_model

KEY = "key θ0"  # the panel's name for the key trained from its own initial weights
SIBLING_PREFIX = "key arch"  # "key arch, seed 7": the key's architecture from another seed


@dataclass
class Training:
    """One training of one model on one set of rows (``"clean"`` or ``"protected"``) under
    one attack, with its clean-test accuracy (percent) after each evaluated epoch."""

    model: str
    attack: str
    data: str
    epochs: list[int]  # the evaluated epochs, 1-based; the last is the final epoch
    accuracies: list[float]
    seconds: float  # training, attack included
    eval_seconds: float = 0.0  # the test evaluations

    @property
    def key(self) -> tuple[str, str, str]:
        return self.model, self.attack, self.data

    @property
    def best_acc(self) -> float:
        return max(self.accuracies)

    @property
    def last_acc(self) -> float:
        return self.accuracies[-1]

    def to_dict(self) -> dict:
        return dict(asdict(self), best_acc=self.best_acc, last_acc=self.last_acc)

    @classmethod
    def from_dict(cls, d: dict) -> "Training":
        return cls(**{k: d[k] for k in ("model", "attack", "data", "epochs", "accuracies", "seconds", "eval_seconds") if k in d})


@dataclass
class Result:
    """One row of the efficacy table: a model under an attack. Accuracies in percent on the
    clean test split; ``*_acc`` at the last epoch, ``*_best_acc`` at the best one."""

    model: str
    attack: str
    clean_acc: float  # trained on the clean rows, no attack
    protected_acc: float  # trained on the protected rows under the attack
    seconds: float  # training on the protected rows
    clean_seconds: Optional[float] = None  # training on the clean rows, in the "none" row
    clean_best_acc: Optional[float] = None
    protected_best_acc: Optional[float] = None
    attack_clean_acc: Optional[float] = None  # the attack applied to the clean rows: what it costs by itself
    attack_clean_best_acc: Optional[float] = None

    @property
    def ratio(self) -> float:
        """Protected-trained over clean-trained accuracy, last epoch."""
        return self.protected_acc / self.clean_acc if self.clean_acc else float("nan")

    @property
    def best_ratio(self) -> Optional[float]:
        """The same at each training's best epoch."""
        if self.protected_best_acc is None or not self.clean_best_acc:
            return None
        return self.protected_best_acc / self.clean_best_acc


def _acc(best: Optional[float], last: Optional[float]) -> str:
    if last is None:
        return ""
    if math.isnan(last):  # the clean training was not run (Evaluation.report)
        return "not measured"
    return f"{last:.2f}" if best is None else f"{best:.2f} / {last:.2f}"


def efficacy_markdown(rows: Sequence[dict]) -> str:
    """The efficacy table in Markdown, from :meth:`EvaluationReport.to_dicts` rows (rows of
    uge-hf 0.1, without best-epoch figures, show the last epoch only; accuracies a public card
    withholds, :func:`uge_hf.card.public_efficacy`, read "withheld")."""
    with_attack_clean = any(r.get("attack_clean_acc") is not None for r in rows)
    head = "| model | attack | clean-trained acc, best / last epoch | protected-trained acc, best / last | protected / clean (last) |"
    lines = [head + (" attack on clean rows, best / last |" if with_attack_clean else ""), "| --- " * (6 if with_attack_clean else 5) + "|"]
    for r in rows:
        line = (f"| {r['model']} | {r['attack']} | {_acc(r.get('clean_best_acc'), r['clean_acc']) or 'withheld'} | "
                f"{_acc(r.get('protected_best_acc'), r['protected_acc']) or 'withheld'} | "
                f"{'not measured' if math.isnan(r['ratio']) else format(r['ratio'], '.2f')} |")
        lines.append(line + (f" {_acc(r.get('attack_clean_best_acc'), r.get('attack_clean_acc'))} |" if with_attack_clean else ""))
    return "\n".join(lines)


class EvaluationReport(list):
    """A list of :class:`Result` rows, with a Markdown table, JSON, a summary and a figure."""

    def to_markdown(self) -> str:
        return efficacy_markdown(self.to_dicts())

    def to_dicts(self) -> list[dict]:
        return [dict(asdict(r), ratio=r.ratio, best_ratio=r.best_ratio) for r in self]

    def to_json(self) -> str:
        return json.dumps(self.to_dicts(), indent=2)

    @classmethod
    def from_dicts(cls, rows: Iterable[dict]) -> "EvaluationReport":
        """Rows as :meth:`to_dicts` (or uge-hf 0.1) wrote them."""
        names = set(Result.__dataclass_fields__)
        return cls(Result(**{k: v for k, v in r.items() if k in names}) for r in rows)

    def summary(self, key_name: str = KEY, sibling_prefix: str = SIBLING_PREFIX) -> dict:
        """The headline figures of DESIGN.md 5 and the efficacy issues: the key's ratio and gap,
        the hackers' ratios without attack, the worst hacker under any hacker's attack, and the
        key under the authorized user's other recipes."""
        def is_key(r: Result) -> bool:
            return r.model.startswith((key_name, sibling_prefix))

        plain = [r for r in self if r.attack == "none"]
        hackers = [r for r in plain if not is_key(r)]
        attacked = [r for r in self if r.attack != "none" and not is_key(r) and not _authorized(r.attack)]
        key = next((r for r in plain if r.model == key_name), None)
        sibling = [r for r in plain if r.model.startswith(sibling_prefix)]
        best = [r.best_ratio for r in hackers if r.best_ratio is not None]
        out = {
            "key_ratio": key.ratio if key else None,
            "key_best_ratio": key.best_ratio if key else None,
            "authorized_gap_pt": key.clean_acc - key.protected_acc if key else None,
            "key_ratios": {r.model: r.ratio for r in plain if r.model.startswith(key_name)},
            "sibling_ratio": sibling[0].ratio if sibling else None,
            "hacker_ratios": {r.model: r.ratio for r in hackers},
            "mean_hacker_ratio": float(np.mean([r.ratio for r in hackers])) if hackers else None,
            "mean_hacker_best_ratio": float(np.mean(best)) if best else None,
            "max_hacker_ratio": max((r.ratio for r in hackers), default=None),
            "mean_hacker_acc": float(np.mean([r.protected_acc for r in hackers])) if hackers else None,
        }
        if attacked:
            worst = max(attacked, key=lambda r: r.ratio)
            out.update(robust_hacker_acc=worst.protected_acc, robust_hacker_ratio=worst.ratio,
                       robust_hacker=f"{worst.model} after {worst.attack}")
        recipes = {r.attack: r.ratio for r in self if r.model == key_name and _authorized(r.attack)}
        if recipes:
            out["key_recipe_ratios"] = recipes
        return out

    def plot(self, path: str | Path, title: Optional[str] = None) -> Path:
        """Draw the table as a heatmap PNG: one row per model, one column per attack, each cell
        the protected-trained over clean-trained accuracy at the last epoch and, in brackets,
        the same for the attack applied to the clean rows when measured. Needs matplotlib
        (``pip install 'uge-hf[plot]'``).

        Raises:
            ImportError: matplotlib is not installed.
        """
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError("drawing the efficacy figure needs matplotlib: pip install 'uge-hf[plot]'") from None
        models = list(dict.fromkeys(r.model for r in self))
        attacks = list(dict.fromkeys(r.attack for r in self))
        ratios = np.full((len(models), len(attacks)), np.nan)
        labels = [[""] * len(attacks) for _ in models]
        for r in self:
            i, j = models.index(r.model), attacks.index(r.attack)
            ratios[i, j] = r.ratio
            labels[i][j] = f"{r.ratio:.2f}" + (f"\n[{r.attack_clean_acc / r.clean_acc:.2f}]" if r.attack_clean_acc is not None else "")
        fig = Figure(figsize=(max(4.5, 2.5 + 0.8 * len(attacks)), 1.5 + 0.45 * len(models)), dpi=120)  # wide enough for the title
        ax = fig.add_subplot()
        image = ax.imshow(np.ma.masked_invalid(ratios), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        for i in range(len(models)):
            for j in range(len(attacks)):
                if labels[i][j]:
                    ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=7, color="white" if ratios[i, j] < 0.6 else "black")
        ax.set_xticks(range(len(attacks)), attacks, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(models)), models, fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02)
        on_clean = any(r.attack_clean_acc is not None for r in self)
        ax.set_title(title or "protected-trained / clean-trained\naccuracy, last epoch" + ("\n[the attack on clean rows / clean]" if on_clean else ""),
                     fontsize=9)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, format="png", metadata={"Software": None})
        return path


def _authorized(attack: str) -> bool:
    """Whether ``attack`` is the authorized user's (a recipe); names of older reports count as a hacker's."""
    try:
        return get_attack(attack).authorized
    except ValueError:
        return False


def model_panel(key: AuthorizedModel | Sequence[AuthorizedModel], hackers: Sequence[str] = DEFAULT_HACKERS,
                sibling_seeds: Sequence[int] = (7,)) -> list[tuple[str, Callable[[], nn.Module]]]:
    """The evaluated models, by name, each a factory of a freshly initialized module: the key
    from θ0 (with several keys, ``"key θ0"``, ``"key θ0 #2"``, …), the first key's architecture
    from each sibling seed, and each hacker (fixed seeds)."""
    keys = authorized_keys(key)
    key = keys[0]
    models = [(KEY, key.build)] + [(f"{KEY} #{i}", k.build) for i, k in enumerate(keys[1:], start=2)]
    models += [(f"{SIBLING_PREFIX}, seed {s}", key.sibling(s).build) for s in sibling_seeds]
    return models + [(arch, _seeded_factory(arch, key, 1000 + i)) for i, arch in enumerate(hackers)]


def _seeded_factory(arch: str, key: AuthorizedModel, seed: int) -> Callable[[], nn.Module]:
    def build():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return create_model(arch, key.num_classes, key.in_channels)

    return build


@dataclass
class Evaluation:
    """The trainings of one evaluation run: each (model, attack, rows) trained at most once.

    Every model trains with ``train_config`` from its fixed initial weights (:func:`model_panel`);
    its clean-test accuracy is measured after every ``eval_every``-th epoch and after the last,
    so each training reports a best and a last epoch. ``done`` holds trainings of an earlier,
    interrupted run of the same setting (they are not repeated); ``on_training`` is called
    after each new one (a benchmark saves its results there).

    Example:
        >>> ev = Evaluation(clean, protected, test, key, hackers=["vgg-small"])  # doctest: +SKIP
        >>> ev.run("vgg-small", "jpeg10").best_acc  # doctest: +SKIP
        >>> print(ev.report().to_markdown())  # doctest: +SKIP
    """

    clean: tuple[torch.Tensor, torch.Tensor] = field(repr=False)
    protected: Optional[tuple[torch.Tensor, torch.Tensor]] = field(repr=False)  # None: a clean baseline only
    test: tuple[torch.Tensor, torch.Tensor] = field(repr=False)
    key: AuthorizedModel | Sequence[AuthorizedModel]  # several: each is a row ("key θ0", "key θ0 #2", …)
    hackers: Sequence[str] = DEFAULT_HACKERS
    sibling_seeds: Sequence[int] = (7,)
    train_config: TrainConfig = TrainConfig()
    seed: int = 0
    eval_every: int = 1
    done: Sequence[Training] = ()
    on_training: Optional[Callable[[Training], None]] = None
    verbose: bool = True
    models: dict = field(init=False, repr=False)  # name -> factory, in panel order
    num_classes: int = field(init=False, repr=False)
    trainings: dict = field(init=False, repr=False)  # (model, attack, data) -> Training
    _teachers: dict = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self):
        if self.protected is not None and len(self.clean[1]) != len(self.protected[1]):
            raise ValueError(f"the clean rows ({len(self.clean[1])}) and the protected rows ({len(self.protected[1])}) differ in number; "
                             "pass the clean rows that were protected, in the same order")
        self.models = dict(model_panel(self.key, self.hackers, self.sibling_seeds))
        self.num_classes = authorized_keys(self.key)[0].num_classes
        self.trainings = {t.key: t for t in self.done}

    def run(self, model: str, attack: str = "none", data: str = "protected") -> Training:
        """Train ``model`` (a name of the panel) on the ``data`` rows under ``attack``, unless done.

        Raises:
            ValueError: an unknown model, attack or ``data``.
        """
        if model not in self.models:
            raise ValueError(f"unknown model {model!r}; the panel is: {', '.join(self.models)}")
        if data not in ("clean", "protected") or (data == "protected" and self.protected is None):
            allowed = "'clean'" if self.protected is None else "'clean' or 'protected'"
            raise ValueError(f"data must be {allowed}, not {data!r}")
        spec = get_attack(attack)
        if (model, spec.name, data) not in self.trainings:
            teacher = self._teacher(data) if spec.needs_teacher else None
            self._train(model, spec, data, teacher)
        return self.trainings[model, spec.name, data]

    def _teacher(self, data: str) -> nn.Module:
        """The key trained on ``data`` without attack (distillation's teacher), trained again
        when a resumed run did not keep it: the same seed gives the same weights."""
        if data not in self._teachers:
            self._train(KEY, get_attack("none"), data, None)
        return self._teachers[data]

    def _train(self, name: str, spec: Attack, data: str, teacher: Optional[nn.Module]) -> None:
        images, labels = self.clean if data == "clean" else self.protected
        start = time.perf_counter()
        model = self.models[name]()
        images, config, transform = spec.prepare(images, model, self.train_config, num_classes=self.num_classes, teacher=teacher)
        epochs, accuracies, eval_seconds = [], [], 0.0

        def on_epoch_end(epoch: int, m: nn.Module, optimizer) -> None:
            nonlocal eval_seconds
            if (epoch + 1) % self.eval_every == 0 or epoch + 1 == config.epochs:
                tic = time.perf_counter()
                accuracies.append(accuracy(m, *self.test))
                epochs.append(epoch + 1)
                eval_seconds += time.perf_counter() - tic

        desc = f"{name} on {data}" + ("" if spec.name == "none" else f", {spec.name}")
        model = train_model(model, images, labels, config, self.seed, on_epoch_end=on_epoch_end, batch_transform=transform,
                            desc=desc, verbose=self.verbose)
        training = Training(name, spec.name, data, epochs, accuracies, time.perf_counter() - start - eval_seconds, eval_seconds)
        if name == KEY and spec.name == "none":
            self._teachers[data] = model
        if training.key not in self.trainings:
            self.trainings[training.key] = training
            if self.on_training is not None:
                self.on_training(training)

    def report(self) -> EvaluationReport:
        """A :class:`Result` row per model and attack trained on the protected rows, in panel
        order, attacks in the order they were first run."""
        attacks = list(dict.fromkeys(a for _, a, d in self.trainings if d == "protected"))
        attacks = ["none"] + [a for a in attacks if a != "none"]
        report = EvaluationReport()
        for attack in attacks:
            for name in self.models:
                protected = self.trainings.get((name, attack, "protected"))
                if protected is None:
                    continue
                clean = self.trainings.get((name, "none", "clean"))
                attacked_clean = self.trainings.get((name, attack, "clean")) if attack != "none" else None
                report.append(Result(
                    name, attack, clean.last_acc if clean else math.nan, protected.last_acc, protected.seconds,
                    clean_seconds=clean.seconds if clean and attack == "none" else None,
                    clean_best_acc=clean.best_acc if clean else None, protected_best_acc=protected.best_acc,
                    attack_clean_acc=attacked_clean.last_acc if attacked_clean else None,
                    attack_clean_best_acc=attacked_clean.best_acc if attacked_clean else None))
        return report


def evaluate_tensors(clean: tuple[torch.Tensor, torch.Tensor], protected: tuple[torch.Tensor, torch.Tensor],
                     test: tuple[torch.Tensor, torch.Tensor], key: AuthorizedModel | Sequence[AuthorizedModel], *, hackers: Sequence[str] = DEFAULT_HACKERS,
                     sibling_seeds: Sequence[int] = (7,), attacks: Sequence[str] = ("none",), attacked_models: Optional[Sequence[str]] = None,
                     attack_clean: bool = False, train_config: TrainConfig = TrainConfig(), seed: int = 0, eval_every: int = 1,
                     baseline: Sequence[Training] = (), on_training: Optional[Callable[[Training], None]] = None,
                     verbose: bool = True) -> EvaluationReport:
    """Train each model on the clean and on the protected set (``uint8 (N, C, H, W)`` tensors
    and ``int64`` labels) with one recipe, and measure clean-test accuracy at the best and the
    last epoch. Rows: the key from θ0, the key's architecture from each of ``sibling_seeds``,
    and each hacker, without attack; then each attack in ``attacks`` (names of
    :func:`uge_hf.attacks.list_attacks`) on the protected rows: a hacker's attack for
    ``attacked_models`` (default: the hackers), an authorized user's recipe for the key. With
    ``attack_clean`` each attack also trains on the clean rows (what it costs by itself).
    ``baseline`` (trainings of an earlier report of the same run, e.g. its clean ones) are not
    repeated, so several protected variants share one clean baseline (and a resumed run skips what
    it finished); ``on_training`` is called after each new training (a benchmark saves it there).

    Raises:
        ValueError: an unknown attack or model name, or clean and protected rows that differ in number.
    """
    specs = [get_attack(a) for a in attacks]  # refuse an unknown name before training anything
    unknown = [m for m in attacked_models or () if m not in dict(model_panel(key, hackers, sibling_seeds))]
    if unknown:
        raise ValueError(f"attacked_models {unknown} are not in the panel (the key, its siblings and the hackers)")
    ev = Evaluation(clean, protected, test, key, hackers=hackers, sibling_seeds=sibling_seeds, train_config=train_config, seed=seed,
                    eval_every=eval_every, done=baseline, on_training=on_training, verbose=verbose)
    for name in ev.models:
        ev.run(name, "none", "clean")
        ev.run(name, "none", "protected")
    for spec in specs:
        if spec.name == "none":
            continue
        targets = [KEY] if spec.authorized else (attacked_models if attacked_models is not None else hackers)
        for name in targets:
            ev.run(name, spec.name, "protected")
            if attack_clean:
                ev.run(name, spec.name, "clean")
    return ev.report()


def evaluate(protected_train, clean_test, key: AuthorizedModel | Sequence[AuthorizedModel], *, clean_train, hackers: Sequence[str] = DEFAULT_HACKERS,
             epochs: int = 15, attacks: Sequence[str] = ("none",), attacked_models: Optional[Sequence[str]] = None,
             attack_clean: bool = False, sibling_seeds: Sequence[int] = (7,), image_column: Optional[str] = None,
             label_column: Optional[str] = None, seed: int = 0, eval_every: int = 1, verbose: bool = True) -> EvaluationReport:
    """Evaluate a protected ``datasets.Dataset`` against the clean rows it came from
    (:func:`evaluate_tensors` on the decoded rows; the arguments are its own).

    Example:
        >>> report = evaluate(protected, ds["test"], key, clean_train=ds["train"].select(range(len(protected))),
        ...                   attacks=["jpeg10", "ueraser"])  # doctest: +SKIP
        >>> print(report.to_markdown())  # doctest: +SKIP
        >>> report.plot("efficacy.png")  # doctest: +SKIP
    """
    from .data import find_columns, load_tensors

    def tensors(ds):
        img, lbl = find_columns(ds, image_column, label_column)
        return load_tensors(ds, img, lbl, authorized_keys(key)[0].in_channels, verbose=verbose)

    if len(clean_train) != len(protected_train):
        raise ValueError(f"clean_train has {len(clean_train)} rows but protected_train has {len(protected_train)}; "
                         "pass the clean rows that were protected, in the same order")
    for name in attacks:
        get_attack(name)
    return evaluate_tensors(tensors(clean_train), tensors(protected_train), tensors(clean_test), key, hackers=hackers,
                            sibling_seeds=sibling_seeds, attacks=attacks, attacked_models=attacked_models, attack_clean=attack_clean,
                            train_config=TrainConfig(epochs=epochs),
                            seed=seed, eval_every=eval_every, verbose=verbose)


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
