import io
import json
import pickle
from dataclasses import replace

import numpy as np
import PIL.Image
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Image, Value, load_dataset

from uge_hf import ProtectConfig, UGETransform, protect
from uge_hf.config import parse_epsilon
from uge_hf.data import DecodedRows, load_tensors, to_pixels
from uge_hf.state import SharedState
from uge_hf.utils import sha256_file


def pixels(ds, column="img"):
    return load_tensors(ds, column, "label", 3, verbose=False)[0].int()


def test_protected_folder_is_a_hub_dataset_repo(protected_dir, small_train):
    files = sorted(p.relative_to(protected_dir).as_posix() for p in protected_dir.rglob("*") if p.is_file())
    assert files == [".uge_hf_manifest.json", "README.md", "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
                     "uge_hf.json"]
    out = load_dataset(str(protected_dir))
    assert list(out) == ["train"] and len(out["train"]) == len(small_train)
    assert out["train"].features == small_train.features
    assert out["train"]["label"][:] == small_train["label"][:]


def test_every_pixel_within_epsilon_and_actually_perturbed(protected_dir, small_train):
    diff = (pixels(load_dataset(str(protected_dir))["train"]) - pixels(small_train)).abs()
    assert diff.max().item() == 8  # the whole budget is used, never more
    assert diff.float().mean().item() > 1.0


def test_stored_as_png_without_source_paths(protected_dir):
    raw = load_dataset(str(protected_dir))["train"].cast_column("img", Image(decode=False))
    for item in raw.select(range(5))["img"]:
        assert item["path"] is None
        assert PIL.Image.open(io.BytesIO(item["bytes"])).format == "PNG"


def test_metadata_records_key_config_and_shard_hashes(protected_dir, key, fast_config):
    meta = json.loads((protected_dir / "uge_hf.json").read_text())
    assert meta["keys"] == [{"fingerprint": key.fingerprint, "weights_sha256": key.weights_file_sha256}]
    assert ProtectConfig.from_dict(meta["config"]) == fast_config
    for name, sha in meta["shards"].items():
        assert sha256_file(protected_dir / name) == sha
    assert not list(protected_dir.rglob("*.safetensors")), "the shared state (θ0 inside) must never be in the output"


def test_same_inputs_same_bytes(tmp_path, protected_dir, small_train, key, fast_config):
    protect(small_train, key, fast_config, output_dir=tmp_path / "again", shard_size=125, verbose=False)
    for shard in (protected_dir / "data").iterdir():
        assert sha256_file(tmp_path / "again" / "data" / shard.name) == sha256_file(shard)


def test_transform_in_datasets_map_matches_protect(protected_dir, small_train, key, fast_config):
    transform = UGETransform.from_pretrained(protected_dir.with_name(protected_dir.name + ".uge-state") / "state")
    mapped = small_train.map(transform, batched=True, batch_size=transform.batch_size)
    expected = load_dataset(str(protected_dir))["train"]
    assert (pixels(mapped) == pixels(expected)).all()
    with pytest.raises(TypeError, match=f"batched=True, batch_size={transform.batch_size}"):  # one row at a time
        small_train.select(range(2)).map(transform)


def test_transform_pickles_and_fingerprints_deterministically(protected_dir, small_train):
    from datasets.fingerprint import Hasher

    state_dir = protected_dir.with_name(protected_dir.name + ".uge-state") / "state"
    a, b = UGETransform.from_pretrained(state_dir), UGETransform.from_pretrained(state_dir)
    assert Hasher.hash(a) == Hasher.hash(b)
    assert pickle.loads(pickle.dumps(a)).fingerprint == a.fingerprint
    two = small_train.select(range(250)).map(a, batched=True, batch_size=125, num_proc=2)
    one = small_train.select(range(250)).map(b, batched=True, batch_size=125)
    assert two._fingerprint == one._fingerprint
    assert (pixels(two) == pixels(one)).all()


def test_generator_mode_is_fast_and_within_budget(tmp_path, small_train, key):
    config = ProtectConfig.preset("fast", mode="generator", batch_size=125)
    out = protect(small_train, key, config, output_dir=tmp_path / "gen", verbose=False)
    diff = (pixels(out["train"]) - pixels(small_train)).abs()
    assert diff.max().item() <= 8 and diff.float().mean().item() > 1.0
    assert json.loads((tmp_path / "gen" / "uge_hf.json").read_text())["generator_fingerprint"]


def test_dataset_dict_protects_named_splits_and_copies_the_rest(tmp_path, cifar, key, fast_config):
    # The copied split's images live in files on the protector's disk: their paths must not travel.
    files = []
    for i, image in enumerate(cifar["test"].select(range(50))["img"]):
        files.append(str(tmp_path / f"secret-{i}.png"))
        image.save(files[-1])
    test = Dataset.from_dict({"img": files, "label": cifar["test"]["label"][:50]}, features=cifar["test"].features)
    ds = DatasetDict({"train": cifar["train"].select(range(125)), "test": test})
    out = protect(ds, key, fast_config, output_dir=tmp_path / "dd", splits=["train"], verbose=False)
    assert set(out) == {"train", "test"}
    assert (pixels(out["test"]) == pixels(ds["test"])).all()
    assert all(item["path"] is None for item in out["test"].cast_column("img", Image(decode=False))["img"])
    dropped = protect(ds, key, fast_config, output_dir=tmp_path / "dd2", splits=["train"], other_splits="drop", verbose=False)
    assert set(dropped) == {"train"}


def test_modes_and_mixed_sizes(tmp_path, cifar, key):
    """L, RGBA, P images and mixed sizes: each perturbed at native size, output RGB PNG."""
    base = cifar["train"].select(range(12))
    images = []
    for i, img in enumerate(base["img"]):
        img = img.resize((40, 28)) if i % 3 == 0 else img
        images.append(img.convert(["L", "RGBA", "P", "RGB"][i % 4]))
    ds = Dataset.from_dict({"img": images, "label": base["label"]}, features=base.features)
    out = protect(ds, key, ProtectConfig.preset("fast", batch_size=6), output_dir=tmp_path / "modes", verbose=False)
    sizes = [im.size for im in out["train"]["img"]]
    assert sizes == [im.size for im in images]
    for before, after in zip(images, out["train"]["img"]):
        diff = np.abs(np.asarray(after.convert("RGB"), dtype=int) - np.asarray(before.convert("RGB"), dtype=int))
        assert after.mode == "RGB" and diff.max() <= 8


def test_resize_policy(tmp_path, cifar, key):
    """With ProtectConfig.resize every image comes out at that size, within epsilon of the resized original."""
    ds = cifar["train"].select(range(8))
    config = ProtectConfig.preset("fast", batch_size=8, resize=(24, 20))
    out = protect(ds, key, config, output_dir=tmp_path / "resized", verbose=False)
    assert {im.size for im in out["train"]["img"]} == {(24, 20)}
    resized = load_tensors(ds, "img", "label", 3, size=(24, 20), verbose=False)[0].int()
    assert (pixels(out["train"]) - resized).abs().max() <= 8


# -- bad input: a clear error before any work, nothing written ------------------------------

def assert_refused(tmp_path, dataset, key, match, **kwargs):
    out = tmp_path / "refused"
    with pytest.raises((ValueError, FileExistsError), match=match):
        protect(dataset, key, ProtectConfig.preset("fast"), output_dir=out, verbose=False, **kwargs)
    assert not out.exists() and not out.with_name("refused.uge-state").exists()


def test_refuses_missing_image_column(tmp_path, small_train, key):
    assert_refused(tmp_path, small_train.remove_columns("img"), key, "no Image column found.*columns are: label.*image_column=")


def test_refuses_wrong_column_name(tmp_path, small_train, key):
    assert_refused(tmp_path, small_train, key, "column 'image' not found; columns are: img, label", image_column="image")


def test_refuses_missing_label_column(tmp_path, small_train, key):
    assert_refused(tmp_path, small_train.remove_columns("label"), key, "no ClassLabel column.*label_column=")


def test_refuses_labels_outside_the_key(tmp_path, small_train, key):
    ds = small_train.cast_column("label", Value("int64")).map(lambda r, i: {"label": 12 if i == 7 else r["label"]}, with_indices=True)
    assert_refused(tmp_path, ds, key, "row 7 has label 12, outside the key's classes 0..9", label_column="label")


@pytest.mark.parametrize("classes", [20, 8])
def test_refuses_a_key_of_another_number_of_classes(tmp_path, small_train, key, classes):
    ds = small_train.filter(lambda r: r["label"] < 8).cast_column("label", ClassLabel(num_classes=classes))
    assert_refused(tmp_path, ds, key, f"{classes} classes but the key has 10; a key is made for one dataset's classes")


def test_refuses_empty_split(tmp_path, small_train, key):
    assert_refused(tmp_path, small_train.select([]), key, "empty")


def test_refuses_undecodable_image_and_names_its_row(tmp_path, small_train, key):
    raw = small_train.select(range(20)).cast_column("img", Image(decode=False))
    broken = raw.map(lambda r, i: {"img": {"bytes": b"not an image" if i == 13 else r["img"]["bytes"], "path": None}}, with_indices=True)
    assert_refused(tmp_path, broken.cast_column("img", Image()), key, "row 13 of column 'img' is not a decodable image")


def test_refuses_an_output_folder_holding_another_run(tmp_path, protected_dir, small_train, key):
    other = ProtectConfig.preset("fast", seed=1)
    before = sha256_file(protected_dir / "uge_hf.json")
    with pytest.raises(FileExistsError, match="holds another uge-hf run.*overwrite=True"):
        protect(small_train, key, other, output_dir=protected_dir, verbose=False)
    assert sha256_file(protected_dir / "uge_hf.json") == before


@pytest.mark.parametrize("value", [0.0, -1 / 255, 2.0])
def test_refuses_epsilon_outside_unit_interval(value):
    with pytest.raises(ValueError, match=r"epsilon must lie in \(0, 1\]"):
        ProtectConfig(epsilon=value)
    with pytest.raises(ValueError, match="epsilon"):
        parse_epsilon(str(value))
    if value:  # 0 turns the surrogates' adversarial training off; any other value is judged, by name
        with pytest.raises(ValueError, match=r"^surrogate_epsilon must lie in \(0, 1\]"):
            ProtectConfig(surrogate_epsilon=value)


def test_refuses_unparsable_epsilon():
    with pytest.raises(ValueError, match="write it like 8/255"):
        parse_epsilon("abc")


def test_epsilon_parsing():
    assert parse_epsilon("8/255") == 8 / 255 and parse_epsilon(0.5) == 0.5
    assert parse_epsilon("1.5/255") == 1.5 / 255 and parse_epsilon(" 4 / 255 ") == 4 / 255
    with pytest.raises(ValueError, match="below one 8-bit level"):  # a fraction, understood, then judged
        parse_epsilon("0.5/255")


def test_user_feature_backbone_joins_the_feature_space(tmp_path, small_train, key):
    """Any frozen backbone (a local CLIP tower, say) can define the common feature space."""
    import torch
    from torch import nn

    from uge_hf.models import create_model

    def backbone(seed):
        torch.manual_seed(seed)
        return nn.Sequential(create_model("vgg-tiny").features, nn.AdaptiveAvgPool2d(1), nn.Flatten())

    config = ProtectConfig.preset("fast", batch_size=125, surrogates=())
    out = tmp_path / "backbone"
    protected = protect(small_train.select(range(125)), key, config, output_dir=out, feature_backbone=backbone(0), verbose=False)
    diff = (pixels(protected["train"]) - pixels(small_train.select(range(125)))).abs()
    assert diff.max() <= 8 and diff.float().mean() > 1.0
    state_dir = out.with_name("backbone.uge-state") / "state"
    with pytest.raises(ValueError, match="pass the same feature_backbone"):
        UGETransform.from_pretrained(state_dir).perturb([], torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="weights differ"):
        UGETransform.from_pretrained(state_dir, feature_backbone=backbone(1)).perturb([], torch.zeros(0, dtype=torch.long))


def test_refuses_an_empty_feature_space(tmp_path, small_train, key):
    with pytest.raises(ValueError, match="feature space is empty"):
        protect(small_train, key, ProtectConfig.preset("fast", surrogates=()), output_dir=tmp_path / "empty", verbose=False)
    assert not (tmp_path / "empty").exists()


def test_binding_matches_only_the_first_checkpoints_of_other_seeds_and_only_on_matching_steps(small_train, key):
    from dataclasses import replace

    from uge_hf.fitting import build_shared_state
    from uge_hf.objective import Objective
    from uge_hf.utils import seeded_generator

    images, labels = load_tensors(small_train, "img", "label", 3, verbose=False)
    config = ProtectConfig.preset("fast", trajectory_epochs=3, lambda_bind=1.0, other_seeds=(5,), bind_checkpoints=2)
    state = build_shared_state(images, labels, key, config, verbose=False)
    assert len(state.other_trajectories[0]) == 3  # seed 5 trained 2 of its 3 epochs: θ0, θ1, θ2
    full = build_shared_state(images, labels, key, replace(config, bind_checkpoints=0), verbose=False)
    assert len(full.other_trajectories[0]) == 4  # θ0 … θ3
    assert all(torch.equal(state.other_trajectories[0][t]["features.1.weight"], full.other_trajectories[0][t]["features.1.weight"])
               for t in range(3))  # the same steps as the full run, on its learning-rate schedule
    objective = Objective(state)
    assert len(objective.others[0]) == 2
    assert all(torch.equal(objective.others[0][t]["features.1.weight"], state.other_trajectories[0][t]["features.1.weight"]) for t in range(2))
    assert len(Objective(full).others[0]) == 3  # all but θ3

    x = images[:16].float() / 255
    x_u = (x + 4 / 255 * torch.randn_like(x).sign()).clamp(0, 1)
    unbound = Objective(replace(state, config=replace(config, lambda_bind=0.0)))
    loss = lambda o, match: o(x, x_u, labels[:16], seeded_generator(0, "test"), match=match).item()
    assert loss(objective, match=False) == loss(unbound, match=False)  # L_bind costs a gradient match: skipped with it
    assert loss(objective, match=True) < loss(unbound, match=True)  # -λ·L_bind, and L_bind > 0 for a perturbed batch


def test_low_frequency_part_of_delta_is_smooth_within_its_share_and_the_budget(small_train, key):
    from dataclasses import replace

    from uge_hf.fitting import build_shared_state
    from uge_hf.objective import Objective, signed_gradient_search
    from uge_hf.utils import seeded_generator

    images, labels = load_tensors(small_train, "img", "label", 3, rows=range(32), verbose=False)
    state = build_shared_state(images, labels, key, ProtectConfig.preset("fast"), verbose=False)
    x, eps = images.float() / 255, 8 / 255

    def delta(share: float) -> torch.Tensor:
        objective = Objective(replace(state, config=replace(state.config, low_frequency=share)))
        x_u = signed_gradient_search(objective, x, labels, seeded_generator(0, "test"), 4)
        assert x_u.min() >= 0 and x_u.max() <= 1 and (x_u - x).abs().max() <= eps + 1e-6
        return x_u - x

    def low_band_energy(d: torch.Tensor) -> float:  # share of |FFT|² within 4 cycles per image side (an 8×8 grid's band)
        spectrum = torch.fft.fft2(d).abs().square()
        f = torch.fft.fftfreq(32) * 32
        band = (f.abs()[:, None] <= 4) & (f.abs()[None, :] <= 4)
        return float(spectrum[..., band].sum() / spectrum.sum())

    per_pixel, mixed, low = (low_band_energy(delta(share)) for share in (0.0, 0.5, 1.0))
    assert per_pixel < 0.3 < mixed < 0.9 < low  # 0.13, 0.62, 0.95: all, half and none of ε per pixel


def test_luminance_delta_is_one_channel_that_grayscale_keeps_whole(small_train, key):
    from dataclasses import replace

    import kornia

    from uge_hf.fitting import build_shared_state
    from uge_hf.objective import Objective, signed_gradient_search
    from uge_hf.utils import seeded_generator

    images, labels = load_tensors(small_train, "img", "label", 3, rows=range(32), verbose=False)
    state = build_shared_state(images, labels, key, ProtectConfig.preset("fast"), verbose=False)
    x, eps = images.float() / 255, 8 / 255
    grayscale = kornia.color.rgb_to_grayscale  # what the grayscale attack applies, before it rounds to uint8
    for share in (0.0, 0.5):
        objective = Objective(replace(state, config=replace(state.config, luminance=True, low_frequency=share)))
        x_u = signed_gradient_search(objective, x, labels, seeded_generator(0, "test"), 4)
        delta = x_u - x
        assert x_u.min() >= 0 and x_u.max() <= 1 and delta.abs().max() <= eps + 1e-6 and delta.abs().mean() > eps / 4
        assert (delta - delta.mean(1, keepdim=True)).abs().max() < 1e-6  # grey on every pixel, clipped ones too
        # what grayscale leaves of δ: all of it, where it averages a per-channel δ of the same budget down
        kept = (grayscale(x_u) - grayscale(x)).abs().mean() / delta.abs().mean()
        assert kept > 0.99
    per_channel = signed_gradient_search(Objective(state), x, labels, seeded_generator(0, "test"), 4) - x
    assert (grayscale(x + per_channel) - grayscale(x)).abs().mean() / per_channel.abs().mean() < 0.8


def test_config_checks_the_low_frequency_share():
    assert ProtectConfig(low_frequency=0.5).low_frequency_factor == 4
    with pytest.raises(ValueError, match=r"low_frequency is the share of epsilon.*in \[0, 1\]"):
        ProtectConfig(low_frequency=1.5)
    with pytest.raises(ValueError, match="low_frequency_factor must be an integer >= 2"):
        ProtectConfig(low_frequency=0.5, low_frequency_factor=1)
    with pytest.raises(ValueError, match="pass refine_steps > 0"):
        ProtectConfig(low_frequency=0.5, mode="generator")
    with pytest.raises(ValueError, match="luminance must be True or False"):
        ProtectConfig(luminance="yes")
    with pytest.raises(ValueError, match="use luminance with mode='per-sample'"):
        ProtectConfig(luminance=True, class_share=0.5)


def test_class_consistent_part_of_delta_is_one_coarse_pattern_per_class_within_its_share(tmp_path, small_train, key):
    from uge_hf.fitting import build_shared_state
    from uge_hf.objective import Objective, signed_gradient_search
    from uge_hf.utils import seeded_generator

    images, labels = load_tensors(small_train, "img", "label", 3, rows=range(64), verbose=False)
    state = build_shared_state(images, labels, key, ProtectConfig.preset("fast", class_share=1.0, class_epochs=2), verbose=False)
    assert state.class_codes["codes"].shape == (10, 3, 8, 8)  # the low-frequency grid, 4 times coarser
    state.save_pretrained(tmp_path / "state")
    assert SharedState.from_pretrained(tmp_path / "state").fingerprint == state.fingerprint

    # All of ε to the class part: δ is the class's pattern wherever the image's box does not cut it.
    delta = torch.stack(UGETransform(state).perturb(list(images), labels)).int() - images.int()
    assert delta.abs().max() <= 8
    inside = (images >= 8) & (images <= 247)
    for c in labels.unique():
        rows = (labels == c).nonzero().flatten()
        a, b = rows[0], rows[1]
        both = inside[a] & inside[b]
        assert (delta[a] - delta[b])[both].abs().max() <= 1  # the same pattern, up to rounding
    other = (labels != labels[0]).nonzero().flatten()[0]
    both = inside[0] & inside[other]
    assert (delta[0] - delta[other])[both].abs().float().mean() > 1  # classes have patterns of their own

    # A shared part: the per-sample search keeps the rest of ε on top of it.
    half = ProtectConfig.preset("fast", class_share=0.5, class_epochs=1)
    state = build_shared_state(images, labels, key, half, verbose=False)
    x = images.float() / 255
    objective = Objective(state)
    with pytest.raises(ValueError, match="pass offset"):
        signed_gradient_search(objective, x, labels, seeded_generator(0, "test"), 2)
    protected = torch.stack(UGETransform(state).perturb(list(images), labels)).int()
    assert (protected - images.int()).abs().max() == 8


def test_config_checks_the_class_share():
    with pytest.raises(ValueError, match="shares of one epsilon: their sum must not exceed 1"):
        ProtectConfig(class_share=0.6, low_frequency=0.5)
    with pytest.raises(ValueError, match="generator mode has class codes of its own"):
        ProtectConfig(class_share=0.5, mode="generator")
    with pytest.raises(ValueError, match="class_epochs must be an integer >= 1"):
        ProtectConfig(class_share=0.5, class_epochs=0)


def test_robust_surrogates_are_adversarially_trained_and_the_rest_of_the_state_is_unchanged(small_train, key):
    from dataclasses import replace

    import torch.nn.functional as F

    from uge_hf.attacks import pgd_training
    from uge_hf.fitting import build_shared_state
    from uge_hf.models import create_model

    assert ProtectConfig(surrogate_epsilon="2/255").surrogate_epsilon == 2 / 255
    with pytest.raises(ValueError, match="epsilon must lie in"):
        ProtectConfig(surrogate_epsilon=-1 / 255)
    images, labels = load_tensors(small_train, "img", "label", 3, verbose=False)
    config = ProtectConfig.preset("fast", surrogate_epochs=3)
    standard = build_shared_state(images, labels, key, config, verbose=False)
    robust = build_shared_state(images, labels, key, replace(config, surrogate_epsilon=4 / 255), verbose=False)
    again = build_shared_state(images, labels, key, replace(config, surrogate_epsilon=4 / 255), verbose=False)
    assert robust.fingerprint == again.fingerprint != standard.fingerprint
    assert all(torch.equal(a[k], b[k]) for a, b in zip(robust.trajectories[0], standard.trajectories[0]) for k in a)

    def loss_under_attack(state) -> tuple[float, float]:  # cross-entropy on the fit rows, clean and under PGD-5 at 4/255
        arch, weights = state.surrogates[0]
        model = create_model(arch)
        model.load_state_dict(weights)
        x, y = images.float() / 255, labels
        x_adv, _ = pgd_training(model, 4 / 255, steps=5)(x, y, torch.Generator().manual_seed(0))
        with torch.no_grad():
            return F.cross_entropy(model.eval()(x), y).item(), F.cross_entropy(model(x_adv), y).item()

    (clean_std, adv_std), (clean_rob, adv_rob) = loss_under_attack(standard), loss_under_attack(robust)
    assert adv_rob - clean_rob < adv_std - clean_std  # the adversary gains less against the robust surrogate


def test_surrogate_checkpoints_join_the_feature_space_and_the_last_is_the_trained_surrogate(small_train, key):
    from uge_hf.fitting import build_shared_state
    from uge_hf.objective import Objective

    with pytest.raises(ValueError, match="at most one per epoch; lower it or raise surrogate_epochs"):
        ProtectConfig.preset("fast", surrogate_checkpoints=3)
    with pytest.raises(ValueError, match="surrogates is empty: name surrogates, or leave surrogate_checkpoints at 1"):
        ProtectConfig(surrogates=(), surrogate_checkpoints=2)
    images, labels = load_tensors(small_train, "img", "label", 3, verbose=False)
    config = ProtectConfig.preset("fast")  # one surrogate, vgg-tiny, trained 2 epochs
    single = build_shared_state(images, labels, key, config, verbose=False)
    ensemble = build_shared_state(images, labels, key, replace(config, surrogate_checkpoints=2), verbose=False)
    assert [arch for arch, _ in ensemble.surrogates] == ["vgg-tiny", "vgg-tiny"]
    (_, after_first), (_, last) = ensemble.surrogates
    trained = single.surrogates[0][1]
    assert all(torch.equal(last[k], trained[k]) for k in trained)  # the same training, kept at every epoch
    assert not all(torch.equal(after_first[k], trained[k]) for k in trained)
    assert len(Objective(ensemble).heads) == 2
    assert all(torch.equal(a[k], b[k]) for a, b in zip(ensemble.trajectories[0], single.trajectories[0]) for k in a)


def test_momentum_steps_follow_the_running_sum_of_normalized_gradients(small_train, key):
    from dataclasses import replace

    from uge_hf.fitting import build_shared_state
    from uge_hf.objective import Objective, signed_gradient_search
    from uge_hf.utils import seeded_generator

    with pytest.raises(ValueError, match=r"momentum must lie in \[0, 1\)"):
        ProtectConfig(momentum=1.0)
    images, labels = load_tensors(small_train, "img", "label", 3, rows=range(32), verbose=False)
    state = build_shared_state(images, labels, key, ProtectConfig.preset("fast"), verbose=False)
    x = images.float() / 255

    def search(momentum: float, steps: int = 6) -> torch.Tensor:
        objective = Objective(replace(state, config=replace(state.config, momentum=momentum)))
        return signed_gradient_search(objective, x, labels, seeded_generator(0, "test"), steps)

    # The first velocity is the normalized gradient itself, whose sign is the gradient's: one step
    # is the plain step. Later steps follow the running sum, and stay within the budget.
    assert torch.equal(search(0.0, steps=1), search(0.9, steps=1))
    plain, heavy = search(0.0), search(0.9)
    assert not torch.equal(plain, heavy) and (heavy - x).abs().max() <= 8 / 255 + 1e-6
    assert torch.equal(heavy, search(0.9))


def test_retraining_round_trains_the_key_on_the_protected_fit_rows_and_searches_again_along_it(small_train, key, tmp_path):
    from uge_hf.fitting import resumable_training, trajectory_recipe

    rows = small_train.select(range(64))
    images, labels = load_tensors(rows, "img", "label", 3, verbose=False)
    config = ProtectConfig.preset("fast", batch_size=32, retrain_rounds=1)
    protect_rows = lambda t: torch.stack(t.perturb_rows(images, labels))

    retrained = UGETransform.fit(rows, key, config, cache_dir=tmp_path / "cache", verbose=False)
    first = UGETransform.fit(rows, key, ProtectConfig.preset("fast", batch_size=32), verbose=False)
    [[trajectory]] = retrained.state.retrained
    assert len(trajectory) == config.trajectory_epochs + 1
    # The round's key training is the key's training on exactly what the rounds before give the shards.
    expected = resumable_training("check", key.build(), protect_rows(first), labels, trajectory_recipe(config), config.seed, None,
                                  True, False)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(trajectory, expected) for k in a)
    assert not torch.equal(trajectory[-1]["features.1.weight"], retrained.state.trajectories[0][-1]["features.1.weight"])

    out, before = protect_rows(retrained), protect_rows(first)
    assert not torch.equal(out, before)  # searched again along the retrained trajectory
    assert (out.int() - images.int()).abs().max() <= config.epsilon_levels
    assert torch.equal(out, protect_rows(retrained))  # same bytes twice

    retrained.save_pretrained(tmp_path / "state")
    loaded = UGETransform.from_pretrained(tmp_path / "state")
    assert loaded.fingerprint == retrained.fingerprint and torch.equal(protect_rows(loaded), out)
    resumed = UGETransform.fit(rows, key, config, cache_dir=tmp_path / "cache", verbose=False)  # from the cache, no retraining
    assert resumed.fingerprint == retrained.fingerprint
    assert first.state.metadata()["retrained_lengths"] == [] and retrained.state.metadata()["retrained_lengths"] == [[len(trajectory)]]
    # A state missing a round its config names would protect without it, silently: refused on
    # load, and by a transform built on it by hand.
    partial = dict(first.state.metadata(), config=config.to_dict())
    with pytest.raises(ValueError, match="holds 0 retraining round\\(s\\) and its config names 1"):
        SharedState.from_parts(partial, first.state.tensors())
    with pytest.raises(ValueError, match="holds 0 retraining round\\(s\\) and its config names 1: build it with UGETransform.fit"):
        UGETransform(replace(first.state, config=config))

    with pytest.raises(ValueError, match="retrain_rounds=0 or low_frequency=0"):
        ProtectConfig(retrain_rounds=1, low_frequency=0.5)
    with pytest.raises(ValueError, match="pass refine_steps > 0, or retrain_rounds=0"):
        ProtectConfig(mode="generator", retrain_rounds=1)
    with pytest.raises(FileExistsError, match="holds the progress of a build on other rows, keys or config"):
        UGETransform.fit(rows, key, replace(config, steps=3), cache_dir=tmp_path / "cache", verbose=False)  # stale trainings refused


def test_decoded_rows_decode_only_the_rows_sliced(small_train):
    """A retraining round reads its fit rows batch by batch: a slice decodes that slice alone (a
    process of a distributed run decodes its own batches), so a broken row outside it is never
    touched, and one inside it is named."""
    raw = small_train.select(range(8)).cast_column("img", Image(decode=False))
    items = list(raw["img"])
    items[5] = {"bytes": b"not an image", "path": None}
    ds = Dataset.from_dict({"img": items, "label": raw["label"]}, features=raw.features).cast_column("img", Image())
    rows = DecodedRows(ds, "img", range(8), lambda img: torch.from_numpy(to_pixels(img, 3)))

    head = rows[0:4]
    assert len(rows) == 8 and torch.equal(torch.stack(head), load_tensors(small_train.select(range(4)), "img", "label", 3, verbose=False)[0])
    assert torch.equal(rows[2], head[2]) and torch.equal(rows[-5], head[-1])
    with pytest.raises(ValueError, match="row 5 of column 'img' is not a decodable image"):
        rows[4:8]


def test_retraining_round_trains_on_the_fit_rows_as_the_shards_publish_them(cifar, key, tmp_path):
    """Images of two sizes, and a fit sample that ends inside a batch: the round's training
    sees each fit row as the published shards hold it (its whole batch protected, at its own
    size), resized to the build's size."""
    from uge_hf.fitting import resumable_training, trajectory_recipe

    base = cifar["train"].select(range(12))
    images = [img.resize((40, 28)) if i % 3 == 1 else img for i, img in enumerate(base["img"])]
    ds = Dataset.from_dict({"img": images, "label": base["label"]}, features=base.features)
    images = ds["img"]  # as stored (the JPEG rows are encoded again)
    config = ProtectConfig.preset("fast", batch_size=6, fit_sample=9, trajectory_epochs=2, surrogate_epochs=1)
    retrained = UGETransform.fit(ds, key, replace(config, retrain_rounds=1), verbose=False)
    first = UGETransform.fit(ds, key, config, verbose=False)

    with pytest.warns(UserWarning, match="2 sizes"):
        published = protect(ds, key, config, output_dir=tmp_path / "out", verbose=False)["train"]["img"]
    rows = first.perturb_rows([first.pixels(img) for img in images], torch.tensor(base["label"]))
    assert [p.shape[1:] for p in rows] == [(img.size[1], img.size[0]) for img in images]  # each at its own size
    assert all(torch.equal(p, first.pixels(img)) for p, img in zip(rows, published))  # the shards' bytes

    seen = torch.stack([first.pixels(PIL.Image.fromarray(p.permute(1, 2, 0).numpy()).resize((32, 32), PIL.Image.BICUBIC))
                        if p.shape[1:] != (32, 32) else p for p in rows[:9]])
    expected = resumable_training("check", key.build(), seen, torch.tensor(base["label"][:9]), trajectory_recipe(config), config.seed,
                                  None, True, False)
    [[trajectory]] = retrained.state.retrained
    assert all(torch.equal(a[k], b[k]) for a, b in zip(trajectory, expected) for k in a)
