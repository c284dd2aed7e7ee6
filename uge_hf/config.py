"""``ProtectConfig``: every knob of a protection run, with named presets."""

from __future__ import annotations

import json
import math
import numbers
import warnings
from dataclasses import asdict, dataclass, fields, replace
from fractions import Fraction
from typing import Optional, Sequence

import numpy as np

from .data import MIN_SIDE
from .key import SEED_SPACE
from .losses import DEFENSE_VIEWS
from .models import DEFAULT_SURROGATES, list_models
from .training import RECIPES

MODES = ("per-sample", "generator")


def parse_epsilon(value: str | float, name: str = "epsilon") -> float:
    """``"8/255"``, ``"0.03"`` or a number (NumPy's included), as a ``float`` on the 0-1 pixel
    scale, checked to lie in [1/255, 1]; ``name`` is the field the errors name.

    Raises:
        ValueError: not a number (``True`` is not one), or outside [1/255, 1]: below one
            8-bit level no pixel can change, so nothing would be protected.
    """
    try:
        if isinstance(value, bool) or not isinstance(value, (str, numbers.Real)):
            raise TypeError
        if isinstance(value, str):
            numerator, slash, denominator = value.partition("/")  # "1.5/255": Fraction takes no decimal numerator
            eps = float(Fraction(numerator.strip())) / (float(Fraction(denominator.strip())) if slash else 1.0)
        else:
            eps = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        raise ValueError(f"{name} {value!r} is not a number; write it like 8/255 or 0.0314") from None
    if not 0 < eps <= 1:
        raise ValueError(f"{name} must lie in (0, 1] (pixel scale, 8/255 ≈ 0.031 is usual); got {value!r}")
    if eps * 255 < 1 - 1e-6:
        raise ValueError(f"{name} {value!r} is below one 8-bit level (1/255 ≈ 0.0039): no pixel of the PNG output could "
                         "change, so nothing would be protected; use at least 1/255 (8/255 is usual)")
    return eps


def _integer(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def _boolean(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False; got {value!r}")
    return bool(value)


def _real(name: str, value, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= minimum:
        raise ValueError(f"{name} must be a number >= {minimum}; got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ProtectConfig:
    """How to protect a dataset. Defaults are what ``bench/efficacy.py`` measures.

    Example:
        >>> from uge_hf import ProtectConfig
        >>> ProtectConfig.preset("fast").steps
        4
        >>> ProtectConfig(epsilon=16/255, mode="generator").mode
        'generator'
    """

    epsilon: float = 8 / 255
    mode: str = "per-sample"
    seed: int = 0
    # Perturbation search (per-sample mode, and refinement of generator output).
    steps: int = 10
    step_size: Optional[float] = None  # first signed step; None: epsilon / 2, decayed linearly to a tenth
    batch_size: int = 250  # rows perturbed together; batches are fixed by row index
    # Momentum of the signed steps (MI-FGSM, Dong et al. 2018): each step follows the sign of
    # μ·m + g/mean|g|, so δ averages the gradients of the steps' random crops and checkpoints
    # instead of chasing the last one's. 0: plain signed steps.
    momentum: float = 0.0
    resize: Optional[tuple[int, int]] = None  # (width, height) every image is resized to; None: native sizes
    # Share of ε given to a low-frequency part of δ, searched on a grid low_frequency_factor times
    # coarser than the image and upsampled (objective.signed_gradient_search); 0: none.
    low_frequency: float = 0.0
    low_frequency_factor: int = 4
    # δ the same on every channel (a luminance perturbation): a grayscale conversion, whose
    # weights sum to 1, keeps it whole, and JPEG keeps luma at full resolution while it
    # subsamples and quantizes the chroma harder. A third of the degrees of freedom.
    luminance: bool = False
    # Share of ε given to a class-consistent part of δ: one pattern per class on that same coarse
    # grid, fitted once on the shared state (class_epochs epochs over generator_sample rows) and
    # added to every image of its class; the per-sample search keeps the rest. 0: none.
    class_share: float = 0.0
    class_epochs: int = 10
    # Objective weights (losses.py).
    lambda_gm: float = 1.0
    # Per-image activation matching at the key's trajectory (losses.activation_matching_loss):
    # on every step (one forward and backward of the key). 0: off.
    lambda_am: float = 0.0
    lambda_fd: float = 1.0
    lambda_ud: float = 0.0
    # The key at θ_T classifies x_u no worse than x (losses.key_consistency_loss): the
    # misalignment kept off the key. On every step (one forward and backward of the key).
    lambda_kc: float = 0.0
    lambda_bind: float = 0.0
    # Gradient matching on every k-th search step (it costs 4x the other terms); on every step
    # when no other term is weighted (ProtectConfig.matching_interval).
    gm_every: int = 2
    gm_classwise: bool = False  # L_gm per class of the batch, averaged (losses.gradient_matching_loss)
    # With several keys: each matching step matches every key instead of one in turn (k times
    # the matching cost, in the search and in the generator's fit); the per-key terms (L_gm,
    # L_am, L_kc, L_ud) are summed over √k, which keeps their pull on δ near one key's if the
    # keys' gradients on δ are near orthogonal (the rationale; measured: README, Several keys).
    match_every_key: bool = False
    # Defenses (uge_hf.losses.DEFENSE_VIEWS: jpeg, libjpeg, grayscale, blur) whose views of x_u
    # the misalignment is averaged over, with x_u itself (expectation over transformations).
    eot: tuple[str, ...] = ()
    # Rounds of retraining: the key is trained on the fit rows as protected so far, and every
    # batch's δ is searched again from where it was, at half the step, with gradient matching
    # along that trajectory instead of the clean one: δ is corrected where the authorized
    # training actually goes, not only where clean training would (UGETransform.fit).
    # Each round adds one pass over the fit rows and one training per key to the build, and one
    # search (of search_steps) to every batch. 0: off.
    retrain_rounds: int = 0
    # Shared state (fitting.py).
    trajectory_epochs: int = 15
    surrogates: tuple[str, ...] = DEFAULT_SURROGATES
    surrogate_epochs: int = 8
    # ε (pixel scale 0-1) of the surrogates' adversarial training, PGD with the true labels
    # (uge_hf.attacks.pgd_training, SURROGATE_PGD_STEPS steps); 0: standard training. Targeted
    # perturbations of slightly robust models transfer further to other architectures
    # (Springer et al. 2021, "A Little Robustness Goes a Long Way").
    surrogate_epsilon: float = 0.0
    # Checkpoints of each surrogate's training that join the feature space as heads of their
    # own, evenly spaced over its epochs, the last the trained surrogate (Self-Ensemble
    # Protection, Chen et al. 2023: a training's checkpoints give a targeted perturbation
    # more diverse gradients than more architectures do, and a hacker's model passes through
    # such states while it learns). Each head adds its forward and backward pass to every
    # search step. 1: the trained surrogate alone.
    surrogate_checkpoints: int = 1
    other_seeds: tuple[int, ...] = ()  # trajectories of the key's architecture used by L_bind
    # L_bind matches only the first k checkpoints of each other seed's trajectory (0: all but the
    # last), where initializations differ most (bench/binding.py).
    bind_checkpoints: int = 0
    fit_sample: Optional[int] = None  # rows used to build the shared state; None: all
    # Each optimization step of the build sums this many micro-batches' gradients in a fixed
    # order, so the state is the same bytes on any number of processes up to this (parallel.py).
    micro_batches: int = 4
    # Training recipe of the key's trajectory and the surrogates (uge_hf.training.RECIPES): an
    # authorized model retraces the trajectory when it is trained with the same one.
    recipe: str = "standard"
    # Generator mode.
    generator_sample: int = 1000
    generator_epochs: int = 30
    refine_steps: int = 0

    def __post_init__(self):
        # Normalize every value once, here: a string epsilon, a NumPy number or a list must not
        # fail after the shared state is built, nor reach the card as anything but plain JSON.
        put = lambda name, value: object.__setattr__(self, name, value)
        put("epsilon", parse_epsilon(self.epsilon))
        if self.mode not in MODES:  # first: the checks below read it
            raise ValueError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        for name, minimum in (("seed", 0), ("batch_size", 1), ("gm_every", 1), ("trajectory_epochs", 1), ("surrogate_epochs", 1),
                              ("micro_batches", 1), ("bind_checkpoints", 0), ("low_frequency_factor", 2),
                              ("generator_sample", 1), ("generator_epochs", 1), ("refine_steps", 0), ("class_epochs", 1),
                              ("retrain_rounds", 0), ("surrogate_checkpoints", 1),
                              ("steps", 1 if self.mode == "per-sample" else 0)):
            put(name, _integer(name, getattr(self, name), minimum))
        for name in ("lambda_gm", "lambda_am", "lambda_fd", "lambda_kc", "lambda_ud", "lambda_bind", "low_frequency", "class_share", "momentum"):
            put(name, _real(name, getattr(self, name), 0.0))
        for name in ("match_every_key", "luminance", "gm_classwise"):
            put(name, _boolean(name, getattr(self, name)))
        if not (self.lambda_gm or self.lambda_am or self.lambda_fd or self.lambda_kc or self.lambda_ud or self.lambda_bind):
            raise ValueError("every loss weight is 0, so nothing would be protected; lambda_fd (the misalignment) is the protection")
        if self.momentum >= 1:
            raise ValueError(f"momentum must lie in [0, 1) (0.9 is usual); got {self.momentum!r}")
        if not 0 <= self.low_frequency <= 1:
            raise ValueError(f"low_frequency is the share of epsilon given to the low-frequency part of δ, in [0, 1]; got {self.low_frequency!r}")
        if self.low_frequency and self.mode == "generator" and not self.refine_steps:
            raise ValueError("low_frequency shapes the per-sample search, which generator mode runs only to refine: "
                             "pass refine_steps > 0, or low_frequency=0")
        if self.low_frequency + self.class_share > 1:
            raise ValueError(f"low_frequency ({self.low_frequency}) and class_share ({self.class_share}) are shares of one epsilon: "
                             "their sum must not exceed 1")
        if self.luminance and (self.class_share or (self.mode == "generator" and not self.refine_steps)):
            raise ValueError("luminance shapes the per-sample search's δ; the class codes and the generator are per channel: "
                             "use luminance with mode='per-sample' (or refine_steps > 0) and class_share=0")
        if self.retrain_rounds and not self.search_steps:
            raise ValueError("a retraining round searches δ again for as many steps as the first search, and generator mode "
                             "without refinement searches none: pass refine_steps > 0, or retrain_rounds=0")
        if self.retrain_rounds and self.low_frequency:
            raise ValueError("a retraining round restarts the search from δ's per-pixel part, which drops a low-frequency part: "
                             "use retrain_rounds=0 or low_frequency=0")
        if self.class_share and self.mode == "generator":
            raise ValueError("class_share shapes the per-sample search's δ; generator mode has class codes of its own: "
                             "use mode='per-sample', or class_share=0")
        if self.surrogate_checkpoints > 1 and not self.surrogates:
            raise ValueError(f"surrogate_checkpoints={self.surrogate_checkpoints} takes checkpoints of the surrogates' trainings, "
                             "and surrogates is empty: name surrogates, or leave surrogate_checkpoints at 1")
        if self.surrogate_checkpoints > self.surrogate_epochs:
            raise ValueError(f"surrogate_checkpoints={self.surrogate_checkpoints} checkpoints of a {self.surrogate_epochs}-epoch "
                             "surrogate training: at most one per epoch; lower it or raise surrogate_epochs")
        if self.surrogate_epsilon != 0:
            put("surrogate_epsilon", parse_epsilon(self.surrogate_epsilon, "surrogate_epsilon"))
        if self.step_size is not None:
            put("step_size", _real("step_size", self.step_size, 1e-9))
            search_steps = self.search_steps
            # Even undecayed, the signed steps move a pixel at most step_size · steps; under half
            # an 8-bit level the PNG output rounds every pixel back to its clean value.
            if search_steps and self.step_size * search_steps * 255 < 0.5:
                raise ValueError(f"step_size {self.step_size!r} over {search_steps} step(s) moves a pixel at most "
                                 f"{self.step_size * search_steps * 255:.3g} of an 8-bit level, so the output would round back "
                                 "to the clean images; leave step_size unset (epsilon/2, decayed) or give at least "
                                 f"{0.5 / 255 / search_steps:.2g}")
        if self.fit_sample is not None:
            put("fit_sample", _integer("fit_sample", self.fit_sample, 1))
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe {self.recipe!r} is not one of {', '.join(RECIPES)}")
        put("surrogates", tuple(str(s) for s in self.surrogates))
        unknown = [s for s in self.surrogates if s not in list_models()]
        if unknown:
            raise ValueError(f"unknown surrogate architecture(s) {unknown}; available: {', '.join(list_models())}")
        put("eot", tuple(str(v) for v in self.eot))
        unknown = [v for v in self.eot if v not in DEFENSE_VIEWS]
        if unknown:
            raise ValueError(f"unknown eot defense(s) {unknown}; available: {', '.join(DEFENSE_VIEWS)}")
        put("other_seeds", tuple(_integer("other_seeds", v, 0) for v in self.other_seeds))
        if self.resize is not None:
            if isinstance(self.resize, (str, bytes)) or len(self.resize) != 2:
                raise ValueError(f"resize must be (width, height) in pixels, got {self.resize!r}")
            put("resize", tuple(_integer("resize", v, MIN_SIDE) for v in self.resize))

    @classmethod
    def preset(cls, name: str, **overrides) -> "ProtectConfig":
        """``"default"`` (the benchmarked setting), ``"fast"`` (a quick, weaker setting for
        tries and tests), ``"key-first"`` (favors the key) or ``"large"`` (for datasets of
        ``LARGE_DATASET_ROWS`` rows and more), with any field overridden.

        Raises:
            ValueError: an unknown preset name.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
        return replace(cls(**PRESETS[name]), **overrides)

    @property
    def epsilon_levels(self) -> int:
        """ε in whole 8-bit levels: the most any ``uint8`` pixel of the output differs from its
        clean one (ε·255 rounded down, with slack for the float error of k/255)."""
        return math.floor(self.epsilon * 255 + 1e-6)

    @property
    def matching_interval(self) -> int:
        """Search steps from one gradient-matching step to the next: ``gm_every``, or 1 when no
        other term is weighted (a step without matching would have no loss to descend)."""
        other_terms = self.lambda_fd or self.lambda_ud or self.lambda_kc or self.lambda_am
        return self.gm_every if other_terms else 1

    @property
    def class_epsilon(self) -> float:
        """The L∞ budget of the class-consistent part of δ, ``class_share · epsilon`` (0-1 scale)."""
        return self.class_share * self.epsilon

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def search_steps(self) -> int:
        """Signed steps of each per-sample search of a batch: ``steps``, or in generator mode
        ``refine_steps`` (0: the generator's output is final)."""
        return self.steps if self.mode == "per-sample" else self.refine_steps

    @property
    def first_step(self) -> float:
        """The search's first signed step (0-1 pixel scale): ``step_size``, else ε/2."""
        return self.step_size or self.epsilon / 2

    @classmethod
    def from_dict(cls, data: dict) -> "ProtectConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


PRESETS: dict[str, dict] = {
    "default": {},
    # Favors the authorized model: 0.95 of its clean accuracy, hackers keep ~0.6 of theirs
    # (bench/results/ablation_gm_h200.json); the default keeps hackers near 0.43 instead.
    "key-first": dict(lambda_gm=3.0, gm_every=1, steps=20),
    "fast": dict(steps=4, trajectory_epochs=2, surrogates=("vgg-tiny",), surrogate_epochs=2, generator_sample=200, generator_epochs=3),
    # For datasets of LARGE_DATASET_ROWS rows and more, where the default loses the key: three
    # times the matching weight on every step. It kept 0.90 of a convnet key's clean accuracy at
    # 10,000 CIFAR-10 rows (8 epochs) against the default's 0.78 (vgg-small 0.34 against 0.25), 0.70 at
    # 20,000 against 0.46 (vgg-small 0.27 against 0.18; bench/results/efficacy_cpu_n*_gm3.json),
    # and 1.02 of a ResNet-18 key's at 20,000 on one H200 (one 6-epoch run), vgg16 0.46
    # (bench/results/paper_scale_h200_n20000_gm3.json). At 5,000 rows it lets hackers
    # keep more than the default does (0.51-0.82 against 0.36-0.63), hence not the default.
    "large": dict(lambda_gm=3.0, gm_every=1),
}

# From this many protected rows up, the default's matching loses the key: it keeps 0.78 of its
# clean accuracy at 10,000 CIFAR-10 rows, 0.46 at 20,000 and 0.16 at 50,000 (README, Paper scale).
LARGE_DATASET_ROWS = 10_000


class LargeDatasetWarning(UserWarning):
    """Too many rows for the config's gradient matching to keep the key (:func:`large_dataset_advice`);
    ``warnings.filterwarnings("ignore", category=LargeDatasetWarning)`` silences it."""


# Seeds below this initialize θ0 through torch.manual_seed alone, which a search covers; keygen
# draws 63-bit seeds from the OS (uge_hf.key.AuthorizedModel.create), which fall below it once in
# 2**31, while an explicit seed, for tests, almost always does.
GUESSABLE_SEED = SEED_SPACE


class GuessableKeyWarning(UserWarning):
    """A key was created from a small explicit seed, which a search rebuilds from the card's
    weight hash (:func:`guessable_key_advice`); ``warnings.filterwarnings("ignore",
    category=GuessableKeyWarning)`` silences it, for tests and benchmarks."""


class MixedKeysWarning(UserWarning):
    """Keys of different architectures take turns in gradient matching, which was measured to
    short-change one of them (:func:`mixed_keys_advice`); ``warnings.filterwarnings("ignore",
    category=MixedKeysWarning)`` silences it."""


def matching_weight(config: ProtectConfig) -> float:
    """The gradient-matching weight a key gets per search step, averaged over the steps:
    ``lambda_gm``, over ``matching_interval`` in per-sample mode (the generator's fit matches on
    every step). Keys that take turns each count as matched at this weight: two convnet keys in
    turns under the preset large kept 0.93-0.94 of their clean accuracy at 10,000 rows, where one
    key alone kept 0.90 (README, Several keys)."""
    return config.lambda_gm / (config.matching_interval if config.mode == "per-sample" else 1)


def large_dataset_advice(rows: int, config: ProtectConfig) -> Optional[str]:
    """The :class:`LargeDatasetWarning` that ``protect`` and ``UGETransform.fit`` give when
    ``rows`` (protected rows a partner may train on: all protected splits together, or the fitted
    dataset's; ``fit_sample`` does not change them) are too many for ``config``'s gradient
    matching to keep the key, or ``None``.

    It warns from ``LARGE_DATASET_ROWS`` rows up when ``matching_weight(config)`` is below the
    ``large`` preset's (3): the default's (0.5) was measured to lose the key there, the ``large``
    preset to hold more of it (README, Paper scale and Several keys: per-sample mode, one convnet
    or ResNet-18 key, or two or three convnet keys in turns; a resnet-small key beside a convnet
    one kept 0.55 under it in turns, 0.75 matched on every step (:func:`mixed_keys_advice`)).

    Example:
        >>> large_dataset_advice(5_000, ProtectConfig()) is None
        True
        >>> large_dataset_advice(50_000, ProtectConfig.preset("large")) is None
        True
        >>> "preset large" in large_dataset_advice(50_000, ProtectConfig())
        True
    """
    large = ProtectConfig.preset("large")
    weight, enough, default = matching_weight(config), matching_weight(large), matching_weight(ProtectConfig())
    if rows < LARGE_DATASET_ROWS or weight >= enough:
        return None
    return (f"{rows:,} rows with a gradient-matching weight of {weight:g} per step, below the preset large's {enough:g}: "
            f"from {LARGE_DATASET_ROWS:,} rows up the default's weight ({default:g}) lost the key's learnability on CIFAR-10 (its key kept "
            "0.78 of its clean accuracy at 10,000 rows, 0.46 at 20,000, 0.16 at 50,000), and the preset large "
            f"(lambda_gm={large.lambda_gm:g}, gm_every={large.gm_every}) kept 0.90 of a convnet key's clean accuracy at 10,000 rows "
            "(two convnet keys in turns: 0.93-0.94) and 0.70 at 20,000, hackers keeping a little more and protect taking about "
            "1.3x as long; it is not yet measured at 50,000 rows. Pass ProtectConfig.preset('large') (uge-hf protect --preset "
            "large), and check the key with uge-hf evaluate before publishing")


def mixed_keys_advice(architectures: Sequence[str], config: ProtectConfig) -> Optional[str]:
    """The :class:`MixedKeysWarning` that ``protect`` and ``UGETransform.fit`` give when keys of
    different ``architectures`` (one name per key, as in ``models.list_models()``) take turns in
    gradient matching (``config.match_every_key`` off), or ``None``.

    The message gives what was measured on CIFAR-10 for a resnet-small key beside a convnet key,
    in turns and matching every key (per-sample mode; README, Several keys).

    Example:
        >>> mixed_keys_advice(["convnet", "convnet"], ProtectConfig()) is None
        True
        >>> mixed_keys_advice(["convnet", "resnet-small"], ProtectConfig(match_every_key=True)) is None
        True
        >>> "match_every_key=True" in mixed_keys_advice(["convnet", "resnet-small"], ProtectConfig())
        True
    """
    if len(set(architectures)) < 2 or config.match_every_key or not config.lambda_gm:
        return None
    return (f"{len(architectures)} keys of {len(set(architectures))} different architectures take turns in gradient matching, "
            "so each is matched on its share of the steps: on CIFAR-10 a resnet-small key beside a convnet key kept 0.30 of its "
            "clean accuracy at 5,000 rows (0.36 as the only key) and 0.55 at 10,000 rows under the preset large (0.73 alone). "
            "match_every_key=True (uge-hf protect --match-every-key) matches every key on each matching step, their terms "
            "summed over the square root of their number: at 10,000 rows under large the resnet-small key kept 0.75 (0.33 at "
            "5,000 rows under the default, 0.36 alone) and the convnet 0.96, the hackers learned about what a release for the "
            "resnet-small key alone leaves them (vgg-small 0.72 against 0.74; 0.34 from a release for the convnet alone), and "
            "protect took 1.3-1.4x as long as for resnet-small alone: "
            "a partner's architecture sets what the release protects. The public card and uge_hf.json leave match_every_key out "
            "(a reader could take it to mean that the keys differ in architecture) unless disclose_key_architecture is set. "
            "Check each key with uge-hf evaluate before publishing")


def guessable_key_advice(seeds: Sequence[Optional[int]]) -> Optional[str]:
    """The :class:`GuessableKeyWarning` for keys created from the given ``seeds`` (one per key,
    ``None`` where unknown), or ``None`` when none is below :data:`GUESSABLE_SEED`. It names
    neither the seed nor the architecture: logs get shared.

    Example:
        >>> guessable_key_advice([2**62 + 5, None]) is None
        True
        >>> guessable_key_advice([2**62, 7]).startswith("key 2 of 2 was created from a small explicit seed")
        True
        >>> guessable_key_advice([1, 2, 3]).startswith("keys 1, 2 and 3 of 3 were created")
        True
    """
    small = [i for i, seed in enumerate(seeds, start=1) if seed is not None and seed < GUESSABLE_SEED]
    if not small:
        return None
    which = f"key {small[0]} of {len(seeds)} was" if len(small) == 1 else \
        f"keys {', '.join(map(str, small[:-1]))} and {small[-1]} of {len(seeds)} were"
    return (f"{which} created from a small explicit seed: trying seeds of each architecture against "
            "the card's weight hash rebuilds θ0 in seconds, and with it all the key gives. For data you publish, create keys "
            "from the OS's random source (AuthorizedModel.create(architecture, num_classes), uge-hf keygen without --seed)")


def advise(rows: int, keys: Sequence, config: ProtectConfig) -> None:
    """Warn, before any work, what the measurements say about this run: :func:`large_dataset_advice`
    for ``rows`` protected rows, :func:`mixed_keys_advice` and :func:`guessable_key_advice` for
    ``keys`` (``AuthorizedModel``s). For ``protect`` and ``UGETransform.fit``: the warnings point
    at their caller's line."""
    for advice, category in ((large_dataset_advice(rows, config), LargeDatasetWarning),
                             (mixed_keys_advice([k.architecture for k in keys], config), MixedKeysWarning),
                             (guessable_key_advice([k.seed for k in keys]), GuessableKeyWarning)):
        if advice:
            warnings.warn(advice, category, stacklevel=3)  # advise, its caller, the user's line
