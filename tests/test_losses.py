import math

import pytest
import torch

from uge_hf.config import ProtectConfig
from uge_hf.losses import (activation_matching_loss, gradient_matching_loss, key_consistency_loss, layerwise_cosine_distance, misalignment_loss,
                           misalignment_target, undistillation_loss)
from uge_hf.models import create_model
from uge_hf.transform import quantize

torch.manual_seed(0)
NET = create_model("convnet", 10).train()
WEIGHTS = {**{k: v.detach() for k, v in NET.named_parameters()}, **dict(NET.named_buffers())}
X = torch.rand(16, 3, 32, 32)
Y = torch.randint(0, 10, (16,))


def test_gradient_matching_is_zero_for_unperturbed_images():
    assert gradient_matching_loss(NET, WEIGHTS, X, X.clone(), Y).item() < 1e-5


def test_gradient_matching_grows_with_perturbation_and_is_differentiable():
    delta = (torch.rand_like(X) * 2 - 1).mul_(0.3).requires_grad_(True)
    loss = gradient_matching_loss(NET, WEIGHTS, X, (X + delta).clamp(0, 1), Y)
    assert loss.item() > 1e-3
    grad, = torch.autograd.grad(loss, delta)
    assert grad.abs().sum() > 0


def test_gradient_matching_differentiates_through_attention():
    """A ViT key: the matching loss needs a second derivative through attention, which the
    fused CPU kernel lacks."""
    model = create_model("vit-micro", num_classes=10)
    weights = {k: v.detach() for k, v in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()}
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    x_u = (x + 0.03 * torch.randn_like(x)).requires_grad_(True)
    loss = gradient_matching_loss(model, weights, x, x_u, y)
    (grad,) = torch.autograd.grad(loss, x_u)
    assert loss.item() > 0 and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_classwise_gradient_matching_averages_each_class_batch():
    x_u = (X + (torch.rand_like(X) * 2 - 1) * 0.3).clamp(0, 1)
    assert gradient_matching_loss(NET, WEIGHTS, X, X.clone(), Y, classwise=True).item() < 1e-5
    per_class = [gradient_matching_loss(NET, WEIGHTS, X[Y == c], x_u[Y == c], Y[Y == c]) for c in Y.unique()]
    classwise = gradient_matching_loss(NET, WEIGHTS, X, x_u, Y, classwise=True)
    assert torch.allclose(classwise, sum(per_class) / len(per_class))
    assert not torch.allclose(classwise, gradient_matching_loss(NET, WEIGHTS, X, x_u, Y))  # not the mixed batch's


def test_activation_matching_is_per_image_and_differentiable():
    assert activation_matching_loss(NET, WEIGHTS, X, X.clone()).item() < 1e-10
    delta = torch.zeros_like(X)
    delta[0] = 0.1  # one image perturbed: the other images' distances stay 0
    delta.requires_grad_(True)
    loss = activation_matching_loss(NET, WEIGHTS, X, (X + delta).clamp(0, 1))
    alone = activation_matching_loss(NET, WEIGHTS, X[:1], (X[:1] + delta[:1]).clamp(0, 1))
    assert loss.item() > 0
    assert torch.allclose(loss, alone / len(X), rtol=1e-4)  # instance norm: no image sees another
    grad, = torch.autograd.grad(loss, delta)
    assert grad[0].abs().sum() > 0 and grad[1:].abs().sum() == 0


def test_cosine_distance_bounds():
    a = (torch.ones(3), torch.ones(2, 2))
    assert layerwise_cosine_distance(a, a).item() < 1e-6
    assert math.isclose(layerwise_cosine_distance(a, tuple(-t for t in a)).item(), 4.0, rel_tol=1e-6)


def test_misalignment_targets_the_next_class_and_descends():
    assert misalignment_target(torch.tensor([0, 9]), 10).tolist() == [1, 0]
    head = create_model("vgg-tiny", 10).eval()
    x = X.clone().requires_grad_(True)
    loss = misalignment_loss([head], x, Y, 10)
    grad, = torch.autograd.grad(loss, x)
    assert misalignment_loss([head], (x - 0.05 * grad.sign()).detach(), Y, 10) < loss


def test_key_consistency_charges_only_images_made_harder_for_the_key():
    assert key_consistency_loss(NET, WEIGHTS, X, X.clone(), Y).item() == 0
    x = X.clone().requires_grad_(True)
    ce = torch.nn.functional.cross_entropy(NET(x), Y)
    grad, = torch.autograd.grad(ce, x)
    easier, harder = (X - 0.02 * grad.sign()).clamp(0, 1), (X + 0.02 * grad.sign()).clamp(0, 1)
    assert key_consistency_loss(NET, WEIGHTS, X, easier, Y).item() == 0  # no reward for a shortcut
    harder = harder.requires_grad_(True)
    loss = key_consistency_loss(NET, WEIGHTS, X, harder, Y)
    step, = torch.autograd.grad(loss, harder)
    assert loss.item() > 0 and step.abs().sum() > 0


def test_undistillation_is_zero_when_wrong_classes_are_uniform():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(Y, 10).float() * 5

    assert abs(undistillation_loss(Fixed(), {}, X, Y).item()) < 1e-6
    assert undistillation_loss(NET, WEIGHTS, X, Y).item() >= 0


def test_quantize_keeps_every_pixel_within_epsilon_after_rounding():
    clean = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    wild = clean.float() / 255 + (torch.rand(clean.shape) * 2 - 1) * 0.2
    budget = ProtectConfig(epsilon="8/255").epsilon_levels
    out = quantize(wild, clean, budget)
    assert budget == 8 and out.dtype == torch.uint8 and (out.int() - clean.int()).abs().max() == 8
    # A budget between levels rounds down: no pixel may leave the ε-ball.
    assert [ProtectConfig(epsilon=e).epsilon_levels for e in (1 / 255, 8.6 / 255, 16 / 255)] == [1, 8, 16]


def test_defense_views_are_differentiable_seeded_and_change_the_image():
    from uge_hf.losses import DEFENSE_VIEWS, defense_views

    x_u = X.clone().requires_grad_(True)
    views = defense_views(x_u, list(DEFENSE_VIEWS), torch.Generator().manual_seed(0))
    assert views[0] is x_u and len(views) == 1 + len(DEFENSE_VIEWS)
    for name, view in zip(DEFENSE_VIEWS, views[1:]):
        assert view.shape == X.shape and float((view - X).abs().mean()) > 1e-3, name
        grad, = torch.autograd.grad(view.sum(), x_u)
        assert grad.abs().sum() > 0, name
    again = defense_views(X, ["jpeg"], torch.Generator().manual_seed(0))[1]
    assert torch.equal(again, defense_views(X, ["jpeg"], torch.Generator().manual_seed(0))[1])
    gray = views[1 + list(DEFENSE_VIEWS).index("grayscale")]
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])


def test_libjpeg_view_is_the_real_codec_with_a_straight_through_gradient():
    from uge_hf.data import jpeg
    from uge_hf.losses import DEFENSE_VIEWS, EOT_JPEG_QUALITIES

    x_u = X.clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    low, high = EOT_JPEG_QUALITIES
    qualities = torch.randint(low, high + 1, (len(X),), generator=torch.Generator().set_state(gen.get_state())).tolist()
    view = DEFENSE_VIEWS["libjpeg"](x_u, gen)
    pixels = (X * 255).round().to(torch.uint8)
    for i, q in enumerate(qualities):  # each image is libjpeg's output at its drawn quality
        assert torch.equal((view[i] * 255).round().to(torch.uint8), jpeg(pixels[i:i + 1], q)[0])
    grad, = torch.autograd.grad((view * torch.arange(view.numel()).view_as(view)).sum(), x_u)
    assert torch.equal(grad, torch.arange(view.numel()).view_as(view).float())  # the identity's


def test_config_refuses_an_unknown_eot_defense():
    from uge_hf import ProtectConfig

    assert ProtectConfig(eot=["jpeg", "blur"]).eot == ("jpeg", "blur")
    with pytest.raises(ValueError, match="unknown eot defense.*available: jpeg, libjpeg, grayscale, blur"):
        ProtectConfig(eot=("jpg",))
