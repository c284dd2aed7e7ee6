"""The attack suite (uge_hf.attacks) on real CIFAR-10 rows, and the evaluation that runs it:
best and last epoch, the attack on clean rows, the figure and the card that shows it."""

import json
import math
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import DatasetCard

from uge_hf.attacks import ATTACKS, get_attack, list_attacks, pgd_training
from uge_hf.data import load_tensors
from uge_hf.evaluation import KEY, EvaluationReport, Result, evaluate
from uge_hf.models import create_model
from uge_hf.training import TrainConfig, train_model

DATA_ATTACKS = [a.name for a in ATTACKS.values() if a.data is not None]
BATCH_ATTACKS = [a.name for a in ATTACKS.values() if a.batch is not None and a.name != "adversarial"] + ["adversarial-2"]


@pytest.fixture(scope="module")
def rows(cifar):
    """16 real training images, uint8 (16, 3, 32, 32), and their labels."""
    return load_tensors(cifar["train"], "img", "label", 3, rows=range(16), verbose=False)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("convnet")


@pytest.mark.parametrize("name", DATA_ATTACKS)
def test_data_defense_maps_uint8_to_uint8_deterministically_and_changes_the_images(rows, name):
    x = rows[0]
    out = get_attack(name).data(x)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out, get_attack(name).data(x.clone()))
    assert (out != x).float().mean() > 0.3, "the defense left most pixels as they were"


def test_data_defenses_do_what_their_names_say(rows):
    x = rows[0]
    gray = get_attack("grayscale").data(x)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    assert set(get_attack("bitdepth2").data(x).unique().tolist()) <= {0, 64, 128, 192}
    assert torch.equal(get_attack("bitdepth4").data(x) % 16, torch.zeros_like(x))
    error = {q: (get_attack(f"jpeg{q}").data(x).float() - x.float()).abs().mean() for q in (10, 30, 50)}
    assert error[10] > error[30] > error[50] > 0  # lower quality, coarser re-encoding

    def roughness(images):  # mean absolute difference between horizontal neighbours
        return (images[..., 1:].float() - images[..., :-1].float()).abs().mean()

    for smoothing in ("gaussian", "median"):
        assert roughness(get_attack(smoothing).data(x)) < 0.8 * roughness(x)


@pytest.mark.parametrize("name", BATCH_ATTACKS)
def test_training_defense_is_seeded_keeps_pixel_range_and_leaves_the_global_rng_alone(rows, name):
    x, y = rows[0].float() / 255, rows[1]
    _, _, transform = get_attack(name).prepare(rows[0], _model(), TrainConfig(), num_classes=10, teacher=_model(1))
    state = torch.random.get_rng_state()
    out, targets = transform(x, y, torch.Generator().manual_seed(3))
    assert torch.equal(torch.random.get_rng_state(), state)
    again, targets_again = transform(x, y, torch.Generator().manual_seed(3))
    assert torch.equal(out, again) and torch.equal(targets, targets_again)
    assert out.shape == x.shape and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    if targets.dtype == torch.int64:
        assert torch.equal(targets, y)
    else:  # mixing and distillation: class probabilities
        assert targets.shape == (16, 10) and torch.allclose(targets.sum(1), torch.ones(16), atol=1e-5)
    if name != "distill":  # the only one without randomness: the teacher's softened outputs
        other, _ = transform(x, y, torch.Generator().manual_seed(4))
        assert not torch.equal(out, other)
        assert (out - x).abs().mean() > 1e-3


def test_mixing_targets_weight_each_label_by_its_share_of_the_image(rows):
    x, y = rows[0].float() / 255, rows[1]
    for name in ("cutmix", "mixup"):
        _, _, transform = get_attack(name).prepare(rows[0], _model(), TrainConfig(), num_classes=10)
        out, targets = transform(x, y, torch.Generator().manual_seed(0))
        own = targets[torch.arange(16), y]
        assert (own >= 0).all() and (own <= 1 + 1e-6).all() and (own < 1 - 1e-3).any(), name
        # An image still holding most of its own pixels keeps most of its own label.
        if name == "cutmix":
            same = (out == x).all(1).float().mean((1, 2))
            changed = targets.max(1).values < 1
            assert torch.allclose(own[changed], same[changed], atol=0.05)


def test_adversarial_training_attacks_the_true_labels_within_epsilon(rows):
    x, y = rows[0].float() / 255, rows[1]
    model = _model()
    _, _, transform = get_attack("adversarial-3").prepare(rows[0], model, TrainConfig(), num_classes=10)
    adv, targets = transform(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(targets, y) and (adv - x).abs().max() <= 8 / 255 + 1e-6
    with torch.no_grad():
        model.eval()
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y) + 0.05
    shifted, _ = transform(x, (y + 1) % 10, torch.Generator().manual_seed(0))
    assert not torch.equal(adv, shifted), "the perturbation must depend on the labels"
    assert get_attack("adversarial").description.startswith("adversarial training, PGD-10")


def test_the_pgd_adversary_moves_saturated_pixels_too(rows):
    # Over-exposed photos: half the pixels at 1. An adversary clamped only in the forward pass
    # froze the saturated pixels its random start pushed outside [0, 1] (a quarter of them
    # moved); projected onto the box after each step, those follow the gradient too.
    x = (rows[0].float() / 255 * 2).clamp(max=1)
    adv, _ = pgd_training(_model(), steps=3)(x, rows[1], torch.Generator().manual_seed(0))
    saturated = x == 1
    assert saturated.float().mean() > 0.3 and 0 <= adv.min() and adv.max() <= 1
    assert (adv != x)[saturated].float().mean() > 0.45


def test_ueraser_max_keeps_each_images_hardest_draw(rows):
    # Its first draw is UEraser-Lite's under the same seed, so per image it is at least as hard.
    x, y = rows[0].float() / 255, rows[1]
    model = _model()
    lite = get_attack("ueraser").prepare(rows[0], model, TrainConfig(), num_classes=10)[2](x, y, torch.Generator().manual_seed(0))[0]
    hardest = get_attack("ueraser-max").prepare(rows[0], model, TrainConfig(), num_classes=10)[2](x, y, torch.Generator().manual_seed(0))[0]
    assert model.training, "the attack restores the model's training mode"
    with torch.no_grad():
        model.eval()
        loss = lambda images: F.cross_entropy(model(images), y, reduction="none")
        assert (loss(hardest) >= loss(lite) - 1e-5).all() and (loss(hardest) > loss(lite) + 1e-3).any()


def test_recipes_change_the_key_training_and_adam_trains(rows):
    base = TrainConfig(epochs=2)
    assert get_attack("recipe-adam").prepare(rows[0], _model(), base, num_classes=10)[1].optimizer == "adam"
    assert get_attack("recipe-2x-epochs").prepare(rows[0], _model(), base, num_classes=10)[1].epochs == 4
    assert get_attack("recipe-batch-256").prepare(rows[0], _model(), base, num_classes=10)[1].batch_size == 256
    assert all(get_attack(r).authorized for r in ("recipe-adam", "recipe-2x-epochs", "recipe-batch-256"))
    with pytest.raises(ValueError, match="optimizer 'rmsprop' is not one of sgd, adam"):
        TrainConfig(optimizer="rmsprop")
    config = TrainConfig(epochs=1, batch_size=8)
    sgd = train_model(_model(), *rows, config, verbose=False)
    adam = train_model(_model(), *rows, replace(config, optimizer="adam", lr=1e-3), verbose=False)
    assert not torch.equal(sgd.classifier.weight, adam.classifier.weight)


def test_an_attacked_training_gives_the_same_weights_twice(rows):
    config = TrainConfig(epochs=1, batch_size=8)
    weights = []
    for _ in range(2):
        model = _model()
        images, cfg, transform = get_attack("ueraser").prepare(rows[0], model, config, num_classes=10)
        weights.append(train_model(model, images, rows[1], cfg, seed=5, batch_transform=transform, verbose=False).classifier.weight)
    assert torch.equal(*weights)


def test_unknown_attack_names_the_known_ones():
    assert get_attack("adversarial-5").name == "adversarial-5" and get_attack("adversarial-10").name == "adversarial"
    with pytest.raises(ValueError, match="unknown attack 'jpeg'; available: none, jpeg10"):
        get_attack("jpeg")
    assert list_attacks()[:2] == ["none", "jpeg10"]


@pytest.fixture(scope="module")
def small_clean(cifar, tmp_path_factory):
    """A Hub-layout folder with the 250 training rows protected_dir came from and 200 test rows."""
    folder = tmp_path_factory.mktemp("clean")
    (folder / "data").mkdir()
    cifar["train"].select(range(250)).to_parquet(folder / "data" / "train-00000-of-00001.parquet")
    cifar["test"].select(range(200)).to_parquet(folder / "data" / "test-00000-of-00001.parquet")
    return folder


def test_evaluate_runs_the_attacks_with_best_and_last_epoch(protected_dir, small_clean, key, tmp_path):
    from datasets import load_dataset

    protected = load_dataset(str(protected_dir))["train"]
    clean = load_dataset(str(small_clean))
    report = evaluate(protected, clean["test"], key, clean_train=clean["train"], hackers=["vgg-tiny"], sibling_seeds=(), epochs=2,
                      attacks=["none", "jpeg10", "cutmix", "recipe-adam"], attack_clean=True, verbose=False)
    rows = {(r.model, r.attack): r for r in report}
    assert set(rows) == {(KEY, "none"), ("vgg-tiny", "none"), ("vgg-tiny", "jpeg10"), ("vgg-tiny", "cutmix"), (KEY, "recipe-adam")}
    for r in report:
        assert 0 <= r.protected_acc <= r.protected_best_acc <= 100 and r.clean_acc <= r.clean_best_acc
        assert (r.attack_clean_acc is not None) == (r.attack != "none")
    summary = report.summary()
    assert set(summary["key_recipe_ratios"]) == {"recipe-adam"} and summary["robust_hacker"].startswith("vgg-tiny after")
    worst = rows["vgg-tiny", summary["robust_hacker"].removeprefix("vgg-tiny after ")]  # one row: its ratio and its accuracy
    assert (summary["robust_hacker_ratio"], summary["robust_hacker_acc"]) == (worst.ratio, worst.protected_acc)
    assert "best / last" in report.to_markdown()
    again = EvaluationReport.from_dicts(json.loads(report.to_json()))
    assert again.to_markdown() == report.to_markdown()
    figure = report.plot(tmp_path / "efficacy.png")
    header = figure.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", header[16:24])[0] > 300


def test_a_row_without_its_clean_training_reads_not_measured_not_nan():
    markdown = EvaluationReport([Result("vgg-tiny", "none", math.nan, 30.0, 1.0, protected_best_acc=31.0)]).to_markdown()
    assert "nan" not in markdown and "| vgg-tiny | none | not measured | 31.00 / 30.00 | not measured |" in markdown


def test_cli_evaluate_writes_the_figure_into_the_card(protected_dir, small_clean, key, tmp_path):
    from uge_hf.cli import main
    from uge_hf.hub import published_files

    folder = tmp_path / "protected"
    shutil.copytree(protected_dir, folder)  # the shared folder stays as the other tests read it
    key.save_pretrained(tmp_path / "key")
    code = main(["evaluate", str(folder), "--clean", str(small_clean), "--key", str(tmp_path / "key"), "--hackers", "vgg-tiny,resnet-tiny",
                 "--attacked-models", "vgg-tiny", "--epochs", "1", "--attacks", "jpeg10", "--attack-clean", "--figure", str(tmp_path / "fig.png"),
                 "--update-card", "--quiet"])
    assert code == 0
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (folder / "efficacy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = DatasetCard.load(folder / "README.md")
    assert "](efficacy.png)" in card.text and "| vgg-tiny | jpeg10 |" in card.text
    assert "| resnet-tiny | none |" in card.text and "| resnet-tiny | jpeg10 |" not in card.text  # --attacked-models
    assert "efficacy.png" in [Path(p).name for p in published_files(folder)]
    public = json.loads((folder / "uge_hf.json").read_text())["efficacy"]["rows"]
    assert public and not any(k.endswith("seconds") for row in public for k in row)  # how long the key trained: its size
