"""The UGE objective bound to a shared state, and the projected signed-gradient search on δ
that minimizes it (DESIGN.md 3).

:class:`Objective` combines the terms of :mod:`uge_hf.losses` at the shared state's
trajectory checkpoints and feature-space heads; :func:`signed_gradient_search` is the
per-sample search (PGD with signed steps, as in Madry et al. 2018, minimizing instead of
maximizing). The generator is fitted with the same objective (:mod:`uge_hf.fitting`).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .losses import (activation_matching_loss, defense_views, gradient_matching_loss, key_consistency_loss, matched_parameters,
                     misalignment_loss, undistillation_loss)
from .models import create_model
from .state import SharedState
from .training import random_crop_flip
from .utils import default_device, module_fingerprint


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


class Objective:
    """The UGE objective bound to a shared state on one device: ``objective(x, x_u, y, gen)``.

    With several authorized keys, each call matches gradients along one key's trajectory
    (chosen by the caller, or drawn from ``gen``): the search costs the same per step
    whatever the number of keys, and the keys take turns. With ``config.match_every_key``
    each call matches every key's, at k times the matching cost, the per-key terms summed
    over √k.
    """

    def __init__(self, state: SharedState, feature_backbone: Optional[nn.Module] = None, device: Optional[torch.device] = None):
        self.config, self.num_classes = state.config, state.num_classes
        self.device = device = device or default_device()
        self.key_nets = [frozen(create_model(a, state.num_classes, state.in_channels).to(device).train()) for a in state.architectures]
        self.names = [matched_parameters(net) for net in self.key_nets]
        self._follow(state.trajectories)
        self.others = [[self._on_device(w) for w in traj[:-1][:self.config.bind_checkpoints or None]] for traj in state.other_trajectories]
        self.heads: list[nn.Module] = []
        for arch, weights in state.surrogates:
            head = create_model(arch, state.num_classes, state.in_channels)
            head.load_state_dict(weights)
            self.heads.append(frozen(head.to(device).eval()))
        if state.centroids is not None:
            if feature_backbone is None:
                raise ValueError("this state was built with a feature backbone; pass the same feature_backbone to load it")
            if module_fingerprint(feature_backbone) != state.backbone_fingerprint:
                raise ValueError("feature_backbone's weights differ from the backbone the state was built with")
            self.heads.append(frozen(CentroidHead(feature_backbone, state.centroids).to(device).eval()))
        if self.config.lambda_fd and not self.heads:  # a state edited by hand: build_shared_state refuses it
            raise ValueError("lambda_fd > 0 but this state has no feature space (no surrogates, no feature backbone); "
                             "rebuild the state with surrogates, or set lambda_fd=0")
        if "grayscale" in self.config.eot and state.in_channels != 3:
            raise ValueError(f"eot 'grayscale' needs RGB images; these have {state.in_channels} channel(s): drop it from eot")

    def _on_device(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in weights.items()}

    def _follow(self, trajectories: list[list[dict[str, torch.Tensor]]]) -> None:
        # θ_T is where training ends, not a state it passes through: match at θ0 … θ_{T-1};
        # the key-consistency and undistillation terms take θ_T.
        self.trajectories = [[self._on_device(w) for w in t[:-1] or t[:1]] for t in trajectories]
        self.finals = [self._on_device(t[-1]) for t in trajectories]

    def along(self, trajectories: list[list[dict[str, torch.Tensor]]]) -> "Objective":
        """This objective along ``trajectories`` (one per key, θ0 first) instead of the clean
        ones: a retraining round's (``config.retrain_rounds``). Gradient and activation
        matching take their checkpoints, the key-consistency and undistillation terms their
        θ_T. Shares the networks and heads."""
        other = copy.copy(self)
        other._follow(trajectories)
        return other

    @property
    def num_keys(self) -> int:
        return len(self.key_nets)

    def __call__(self, x: torch.Tensor, x_u: torch.Tensor, y: torch.Tensor, gen: torch.Generator, match: bool = True,
                 key: Optional[int] = None) -> torch.Tensor:
        """The loss to minimize; ``match=False`` skips the (costly) gradient-matching term;
        ``key`` picks the authorized key whose trajectory is matched (default: every key with
        ``config.match_every_key``, else one drawn from ``gen`` when there are several)."""
        cfg = self.config
        if key is not None:
            keys = [key]
        elif cfg.match_every_key:
            keys = list(range(self.num_keys))
        else:
            keys = [int(torch.randint(self.num_keys, (1,), generator=gen)) if self.num_keys > 1 else 0]
        # A hacker's data defense acts on whole images, before training augments them: the
        # views come first (a JPEG block grid stays where the hacker's is), then one crop and
        # flip for x, x_u and every view (matched gradients must see the same view, and δ is
        # fitted to survive the augmentation too).
        views = defense_views(x_u, cfg.eot, gen)[1:] if cfg.lambda_fd and self.heads else []
        state = gen.get_state()
        same_crop = lambda v: random_crop_flip(v, torch.Generator().set_state(state))
        x_u = random_crop_flip(x_u, gen)
        x, views = same_crop(x), [x_u] + [same_crop(v) for v in views]
        loss = x_u.new_zeros(())
        # Every key matched at once, the per-key terms are summed over √k: if different keys'
        # gradients on δ are near orthogonal, their sum's norm grows as √k and this keeps the
        # pull of one key. Summed at the full weight (convnet + resnet-small
        # under large, 10,000 rows) the keys kept 0.97 / 0.88 and vgg-small 0.81; averaged,
        # 0.95 / 0.68 (0.73 alone) and 0.64 (README, Several keys).
        share = len(keys) ** -0.5
        if cfg.lambda_gm and match:
            for k in keys:
                loss = loss + cfg.lambda_gm * share * gradient_matching_loss(self.key_nets[k], drawn(self.trajectories[k], gen), x, x_u, y,
                                                                        self.names[k], cfg.gm_classwise)
        if cfg.lambda_am:
            for k in keys:
                loss = loss + cfg.lambda_am * share * activation_matching_loss(self.key_nets[k], drawn(self.trajectories[k], gen), x, x_u)
        if cfg.lambda_fd and self.heads:
            loss = loss + cfg.lambda_fd * sum(misalignment_loss(self.heads, v, y, self.num_classes) for v in views) / len(views)
        if cfg.lambda_kc:
            for k in keys:
                loss = loss + cfg.lambda_kc * share * key_consistency_loss(self.key_nets[k], self.finals[k], x, x_u, y)
        if cfg.lambda_ud:
            for k in keys:
                loss = loss + cfg.lambda_ud * share * undistillation_loss(self.key_nets[k], self.finals[k], x_u, y)
        if cfg.lambda_bind and self.others and match:  # as costly as L_gm: on the matching steps only
            checkpoint = drawn(drawn(self.others, gen), gen)
            loss = loss - cfg.lambda_bind * gradient_matching_loss(self.key_nets[0], checkpoint, x, x_u, y, self.names[0])
        return loss


def drawn(items: list, gen: torch.Generator):
    """One of ``items``, drawn uniformly from ``gen`` (a trajectory's checkpoint, say)."""
    return items[int(torch.randint(len(items), (1,), generator=gen))]


def frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def decayed_step(first: float, k: int, steps: int) -> float:
    """The size of signed step ``k`` of ``steps``: ``first``, decayed linearly to a tenth of it."""
    return first * (1 - 0.9 * k / max(1, steps - 1))


def signed_gradient_search(objective: Objective, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, steps: int,
                           start: Optional[torch.Tensor] = None, offset: Optional[torch.Tensor] = None,
                           step_size: Optional[float] = None) -> torch.Tensor:
    """Projected signed-gradient descent on δ, ``‖δ‖∞ ≤ ε`` and ``x + δ`` in ``[0, 1]``.

    ``x``: float ``(N, C, H, W)`` images on the 0-1 scale; returns ``x + δ`` alike. The step
    decays linearly from ``step_size`` (default ``config.step_size``, else ε/2) to a tenth of
    it: big steps find the misaligned direction, small ones settle the gradient match. Several
    keys take turns on the matching steps (or all match on each, with
    ``config.match_every_key``). ``start`` (a generator's output, or an earlier search's) seeds
    δ (its per-pixel part). With ``config.momentum = μ > 0`` the steps follow the sign of a
    running sum of normalized gradients (MI-FGSM, Dong et al. 2018).

    With ``config.low_frequency = s > 0``, δ = up(δ_low) + δ_high: δ_low lives on a grid
    ``config.low_frequency_factor`` times coarser than the image, upsampled bilinearly, within
    s·ε; δ_high keeps (1 - s)·ε, so ``‖δ‖∞ ≤ ε`` still holds. JPEG and smoothing remove high
    frequencies, which a low-frequency component survives (the subspace of Guo et al. 2018,
    "Low Frequency Adversarial Perturbation"). Each part's step is its share of the step.

    With ``config.luminance``, every part of δ has one channel, added to all ``C``: grayscale
    keeps such a δ whole (its weights sum to 1), where it averages a per-channel δ away.

    With ``config.class_share = c > 0``, ``offset`` is the class-consistent part δ_c (the
    class codes' output minus ``x``, within c·ε, ``x + offset`` in [0, 1]): it stays fixed, and
    δ_high keeps (1 - s - c)·ε on top of it.
    """
    cfg = objective.config
    eps = cfg.epsilon
    if (offset is None) != (cfg.class_share == 0):
        raise ValueError("pass offset (the class codes' δ_c) exactly when config.class_share > 0")
    eps_low = cfg.low_frequency * eps
    eps_high = eps - eps_low - cfg.class_epsilon
    height, width = x.shape[-2:]
    base = x if offset is None else x + offset
    # The δ that keeps x + δ in [0, 1]: per channel, or for a luminance δ (one channel,
    # broadcast to all) per pixel, so that clipping it never parts the channels.
    box_lo, box_hi = -base, 1 - base
    if cfg.luminance:
        box_lo, box_hi = box_lo.amax(1, keepdim=True), box_hi.amin(1, keepdim=True)
    # Each part of δ: (value, lower bound, upper bound, share of the step).
    high_lo, high_hi = box_lo.clamp(min=-eps_high), box_hi.clamp(max=eps_high)
    if start is None:
        high = torch.zeros_like(high_lo)
    else:  # a generator's δ, averaged over the channels for a luminance δ
        high = (start - base).mean(1, keepdim=True) if cfg.luminance else start - base
        high = high.clamp(high_lo, high_hi)
    parts = [(high, high_lo, high_hi, eps_high / eps)]
    if eps_low:
        f = cfg.low_frequency_factor
        parts.append((x.new_zeros(*box_lo.shape[:2], -(-height // f), -(-width // f)), -eps_low, eps_low, eps_low / eps))

    def perturbed(deltas: list[torch.Tensor]) -> torch.Tensor:
        if len(deltas) == 1:  # δ_high alone is within the image's box already
            return base + deltas[0]
        low = F.interpolate(deltas[1], size=(height, width), mode="bilinear", align_corners=False)
        return base + (deltas[0] + low).clamp(box_lo, box_hi)

    first = step_size or cfg.first_step
    # Keys take turns from a key drawn per batch, so that over the batches each key matches as
    # often as the others and has the last matching step as often (a fixed start would give the
    # first key both). One key draws nothing, which keeps its bytes.
    # (With match_every_key the draw is unused; it stays so that the bytes stay put.)
    turn = int(torch.randint(objective.num_keys, (1,), generator=gen)) if objective.num_keys > 1 else 0
    velocity = [torch.zeros_like(d) for d, *_ in parts]
    for k in range(steps):
        deltas = [d.requires_grad_(True) for d, *_ in parts]
        match = k % cfg.matching_interval == 0
        key = None if cfg.match_every_key else turn % objective.num_keys
        loss = objective(x, perturbed(deltas), y, gen, match=match, key=key)
        turn += match
        grads = torch.autograd.grad(loss, deltas)
        if cfg.momentum:  # per image, the gradient over its mean magnitude: every image steps alike
            velocity = [cfg.momentum * v + g / g.abs().mean((1, 2, 3), keepdim=True).clamp(min=1e-12)
                        for v, g in zip(velocity, grads)]
            grads = velocity
        step = decayed_step(first, k, steps)
        parts = [(torch.clamp(d.detach() - share * step * g.sign(), lo, hi), lo, hi, share)
                 for (d, lo, hi, share), g in zip(parts, grads)]
    with torch.no_grad():
        return perturbed([d for d, *_ in parts])
