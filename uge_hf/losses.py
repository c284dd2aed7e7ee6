"""The UGE objective ``L = λ_gm·L_gm + λ_am·L_am + λ_fd·L_fd + λ_kc·L_kc + λ_ud·L_ud + λ_bind·L_bind`` (DESIGN.md 3).

Every term takes clean images ``x``, protected images ``x_u`` (a function of δ) and labels
``y``, and returns a scalar to *minimize* with respect to δ:

- :func:`gradient_matching_loss`: the key's parameter gradients on ``x_u`` follow those on
  ``x`` at a checkpoint of its clean trajectory, so training from θ0 on the protected data
  retraces the clean run (learnability for the key);
- :func:`misalignment_loss`: in the common feature space, ``x_u`` of class ``y`` looks like
  class ``π(y)`` (unlearnability for everyone else; targeted, because untargeted feature
  distance did not protect, DESIGN.md 6);
- :func:`key_consistency_loss`: the key at the end of its clean trajectory classifies ``x_u``
  no worse than ``x``, so the misalignment aimed at the feature space does not transfer to
  the key (a transferable targeted perturbation is kept off one named model);
- :func:`undistillation_loss`: a key trained on the protected data gives soft labels on it
  that carry no dark knowledge a student could distil;
- :func:`defense_views` gives the views ``L_fd`` is averaged over when the run names
  defenses (expectation over transformations, Athalye et al. 2018; a real codec passes the
  gradient straight through), so δ is fitted to survive the field's data defenses;
- the binding term reuses :func:`gradient_matching_loss` with the sign flipped, on
  trajectories of the key's architecture from *other* seeds, so learnability is tied to θ0
  rather than to the architecture.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import kornia
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from .data import jpeg


def matched_parameters(module: nn.Module) -> list[str]:
    """Names of the weights whose gradients are matched: conv and linear kernels (ndim > 1),
    as in dataset condensation; biases and norm scales carry little of the direction."""
    return [name for name, p in module.named_parameters() if p.ndim > 1]


def parameter_gradients(module: nn.Module, weights: dict[str, torch.Tensor], names: list[str], x: torch.Tensor,
                        y: torch.Tensor, create_graph: bool) -> tuple[torch.Tensor, ...]:
    """Gradients of the cross-entropy of ``module`` evaluated at ``weights``, for ``names``.

    ``weights`` holds parameters and buffers; buffers are cloned so that batch-norm running
    statistics of a checkpoint are never updated by the perturbation search.
    """
    params = {n: weights[n].detach().requires_grad_(True) for n in names}
    # Attention's fused CPU kernels have no second derivative, which matching needs: with
    # create_graph, attention runs as plain matrix products (a ViT key; nothing else changes).
    with sdpa_kernel(SDPBackend.MATH) if create_graph else nullcontext():
        loss = F.cross_entropy(call_at(module, {**weights, **params}, x), y)
        return torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph)


def call_at(module: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with ``weights`` swapped in; buffers are cloned so that batch-norm
    running statistics of a checkpoint are never updated by the perturbation search."""
    buffers = {n for n, _ in module.named_buffers()}
    return functional_call(module, {n: t.clone() if n in buffers else t for n, t in weights.items()}, (x,))


def layerwise_cosine_distance(reference: tuple[torch.Tensor, ...], other: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Sum over layers of ``1 - cos(reference_l, other_l)``; 0 when the gradients align."""
    return sum(1 - F.cosine_similarity(r.flatten(), o.flatten(), dim=0, eps=1e-12) for r, o in zip(reference, other))


def gradient_matching_loss(module: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor, x_u: torch.Tensor,
                           y: torch.Tensor, names: list[str] | None = None, classwise: bool = False) -> torch.Tensor:
    """``L_gm`` at one checkpoint: layer-wise cosine distance between the training gradients
    on clean and on protected images. Differentiable with respect to ``x_u``.

    With ``classwise``, the distance is taken per class present in ``y`` (each class's images
    a batch of their own) and averaged, as dataset condensation matches (Zhao et al. 2021): a
    class-specific change of the images (the misalignment is one) can hide in a mixed batch's
    gradient, whose direction the other classes dominate. Batch-norm statistics are then those
    of each class's images.
    """
    names = names or matched_parameters(module)
    groups = [y == c for c in y.unique()] if classwise else [slice(None)]
    distances = [layerwise_cosine_distance(parameter_gradients(module, weights, names, x[g], y[g], create_graph=False),
                                           parameter_gradients(module, weights, names, x_u[g], y[g], create_graph=True))
                 for g in groups]
    return sum(distances) / len(distances)


def layer_outputs(module: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of every convolution and linear layer of ``module`` at ``weights`` on ``x``,
    in the order the forward pass reaches them."""
    outputs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _in, out: outputs.append(out))
             for m in module.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    try:
        call_at(module, weights, x)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def activation_matching_loss(module: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor,
                             x_u: torch.Tensor) -> torch.Tensor:
    """``L_am`` at one checkpoint: per image and per convolution or linear layer, the squared
    distance between the layer's outputs on ``x_u`` and on ``x``, relative to the clean
    output's squared norm; averaged over images and layers. Differentiable w.r.t. ``x_u``.

    A layer's weight gradient on one image is its backpropagated error times its input, so
    when every layer's output on ``x_u`` equals that on ``x``, so does every per-image
    gradient: training on ``x_u`` then takes the clean steps whatever the batches, crops and
    order. :func:`gradient_matching_loss` constrains only a batch's summed gradient, which
    per-image shortcut components that cancel within the search's batch still satisfy.
    One forward and backward pass, no second-order term: cheaper than ``L_gm``.
    """
    with torch.no_grad():
        clean = layer_outputs(module, weights, x)
    protected = layer_outputs(module, weights, x_u)
    distances = [(p - c).flatten(1).pow(2).sum(1) / c.flatten(1).pow(2).sum(1).clamp(min=1e-12) for p, c in zip(protected, clean)]
    return torch.stack(distances).mean()


def misalignment_target(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The fixed class permutation π(y) = (y + 1) mod C that protected features point to."""
    return (y + 1) % num_classes


def misalignment_loss(feature_space: list[nn.Module], x_u: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``L_fd``: mean cross-entropy of each feature-space head on ``x_u`` towards π(y).

    A head is any module mapping images to class scores: a surrogate classifier, or a
    frozen backbone followed by cosine similarity to class centroids
    (:class:`uge_hf.fitting.CentroidHead`).
    """
    target = misalignment_target(y, num_classes)
    return sum(F.cross_entropy(head(x_u), target) for head in feature_space) / len(feature_space)


EOT_JPEG_QUALITIES = (10, 50)  # the field's JPEG-10 … JPEG-50: each JPEG view draws a quality in this range per image


def _jpeg(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    quality = torch.empty(len(x)).uniform_(*EOT_JPEG_QUALITIES, generator=gen).to(x.device)
    return kornia.enhance.jpeg_codec_differentiable(x, quality)


def _libjpeg(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The hacker's real codec (:func:`uge_hf.data.jpeg`, libjpeg) at a random integer quality
    per image, with the identity as its gradient (straight-through, the BPDA of Athalye et al.
    2018): the loss is taken on what libjpeg really outputs, which kornia's smooth
    approximation is not."""
    low, high = EOT_JPEG_QUALITIES
    qualities = torch.randint(low, high + 1, (len(x),), generator=gen).tolist()
    pixels = (x.detach() * 255).round().clamp(0, 255).to(torch.uint8).cpu()
    coded = torch.cat([jpeg(pixels[i:i + 1], q) for i, q in enumerate(qualities)]).to(x.device, x.dtype) / 255
    return x + (coded - x).detach()


# The data defenses of uge_hf.attacks as views the loss can differentiate through: float
# (N, C, H, W) in [0, 1] in and out (grayscale needs C = 3).
DEFENSE_VIEWS = {
    "jpeg": _jpeg,  # kornia's differentiable approximation of JPEG
    "libjpeg": _libjpeg,  # the real codec, straight-through
    "grayscale": lambda x, gen: kornia.color.rgb_to_grayscale(x).expand_as(x),
    "blur": lambda x, gen: kornia.filters.gaussian_blur2d(x, (3, 3), (1.0, 1.0)),
}


def defense_views(x_u: torch.Tensor, names: Sequence[str], gen: torch.Generator) -> list[torch.Tensor]:
    """``x_u`` and its image under each named differentiable defense (:data:`DEFENSE_VIEWS`),
    all differentiable with respect to ``x_u``; random draws come from ``gen``."""
    return [x_u] + [DEFENSE_VIEWS[name](x_u, gen) for name in names]


def key_consistency_loss(module: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor, x_u: torch.Tensor,
                         y: torch.Tensor) -> torch.Tensor:
    """``L_kc``: per image, how much more the key's cross-entropy at ``weights`` (θ_T, its clean
    training's end) is on ``x_u`` than on ``x``, floored at 0, averaged.

    The misalignment is a targeted perturbation of the surrogates, and targeted perturbations
    transfer to other trained models, the key's architecture among them: a key whose trained
    self sees class π(y) in ``x_u`` learns the permuted shortcut too. The floor keeps ``x_u``
    from becoming *easier* than ``x`` for the key, which would be a shortcut of its own (an
    error-minimizing noise, Huang et al. 2021). Differentiable with respect to ``x_u``.
    """
    with torch.no_grad():
        clean = F.cross_entropy(call_at(module, weights, x), y, reduction="none")
    protected = F.cross_entropy(call_at(module, weights, x_u), y, reduction="none")
    return (protected - clean).clamp(min=0).mean()


def undistillation_loss(module: nn.Module, weights: dict[str, torch.Tensor], x_u: torch.Tensor, y: torch.Tensor,
                        temperature: float = 4.0) -> torch.Tensor:
    """``L_ud``: KL from uniform to the key's softened distribution over the *wrong* classes.

    A distilling student learns from how a teacher ranks the wrong classes (dark
    knowledge); driving that ranking to uniform on the protected data leaves a student only
    the hard labels, which are no more learnable than the data itself.
    """
    logits = call_at(module, weights, x_u)
    wrong = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")) / temperature
    log_p = F.log_softmax(wrong, 1).masked_fill(F.one_hot(y, logits.shape[1]).bool(), 0.0)
    k = logits.shape[1] - 1
    return (-(log_p.sum(1) / k) - torch.log(torch.tensor(float(k), device=x_u.device))).mean()
