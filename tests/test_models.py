import pytest
import torch

from uge_hf.models import DEFAULT_HACKERS, DEFAULT_SURROGATES, create_model, list_models


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("size", [(32, 32), (40, 24)])
def test_every_model_maps_any_size_to_logits(name, size):
    model = create_model(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, *size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_single_channel_models():
    assert create_model("convnet", num_classes=3, in_channels=1)(torch.rand(2, 1, 28, 28)).shape == (2, 3)


def test_panels_are_disjoint_and_diverse():
    assert "convnet" in list_models() and "resnet18" in list_models()
    assert not set(DEFAULT_HACKERS) & set(DEFAULT_SURROGATES)
    assert len(DEFAULT_HACKERS) >= 5 and {"mixer-small", "mobilenet-small", "vgg-small"} <= set(DEFAULT_HACKERS)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown architecture 'resnet-9000'.*convnet"):
        create_model("resnet-9000")
