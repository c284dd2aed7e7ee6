"""Binding benchmark (issue 13): does learnability belong to θ0, or to the key's architecture?

For each variant of the protection, on real CIFAR-10 (the efficacy benchmark's protocol:
``--n`` class-balanced rows, the test split, ε = 8/255, key seed 0): the key θ0 and three
sibling seeds the protector never used (7, 8, 9), each trained from its own initial weights
with two data-order seeds, so every cell is a mean ± spread over runs; plus two hackers of
other architectures (one order). A model's ratio is its last-epoch accuracy trained on the
protected rows over the same model, same order, trained on the clean rows. The verdict: the
gap between the key's mean ratio and the siblings' exceeds three times the run-to-run spread
(the pooled standard deviation of one model's ratio over data orders).

Variants:

- ``default``: the default preset (what ships today).
- ``bind-8x{λ}-early``: the default plus ``L_bind`` on 8 other seeds' trajectories, matched only
  at their first 3 checkpoints, where initializations differ most.
- ``colour-secret``: a key with a secret frozen stage. Its first layer projects every pixel's
  colour onto the plane normal to a secret unit direction v (drawn with θ0, a buffer saved in
  the key, never trained), and δ = v·s(x) lies in that layer's null space. The key sees exactly
  the clean images (crop and flip commute with a per-pixel projection), so the whole budget goes
  to misalignment (the surrogates' ``L_fd``; ``L_gm`` would have nothing to match). A sibling's
  own v' is another direction and sees most of δ. Judged against the **adaptive hacker** who
  knows the scheme: it estimates v as the direction of excess high-pass variance of the
  protected rows over clean reference rows (other CIFAR-10 training rows), then trains its
  architecture behind a projection that drops v, at training and test time.
- ``colour-secret+siblings``: the same, with two of the surrogates the key's architecture from
  other seeds, so δ is fitted to fool the models a guesser of the architecture would train.

Results are written after every training and protected rows are cached, so a rerun resumes.

    python bench/binding.py            # 5,000 rows, 15 epochs: bench/results/binding_cpu.json
    python bench/binding.py --quick    # screening proxy, 2,000 rows, 8 epochs: bench/results/binding_quick.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from efficacy import load_protocol, protocol_arguments
from robustness import cached_rows, protected_rows, setting

from uge_hf import AuthorizedModel, ProtectConfig
from uge_hf.data import load_tensors
from uge_hf.evaluation import KEY, Evaluation, Training
from uge_hf.fitting import build_shared_state
from uge_hf.models import DEFAULT_SURROGATES, create_model, register_model
from uge_hf.objective import Objective, decayed_step
from uge_hf.training import TrainConfig, to_float
from uge_hf.transform import quantize
from uge_hf.utils import seeded_generator

RESULTS = Path(__file__).resolve().parent / "results"
SIBLINGS = (7, 8, 9)
ORDERS = (0, 1)
HACKERS = ("vgg-small", "densenet-small")
OTHER_SEEDS = tuple(range(100, 108))  # L_bind's seeds: none of them is a sibling the benchmark trains
VARIANTS = {
    "default": dict(arch="convnet"),
    "bind-8x5-early": dict(arch="convnet", lambda_bind=5.0, other_seeds=OTHER_SEEDS, bind_checkpoints=3),
    "bind-8x10-early": dict(arch="convnet", lambda_bind=10.0, other_seeds=OTHER_SEEDS, bind_checkpoints=3),
    "colour-secret": dict(arch="convnet-colour-secret", lambda_gm=0.0),
    # The key is blind to δ, so the whole budget may go to fooling its siblings: two surrogates
    # are the key's architecture from other seeds (other secret directions).
    "colour-secret+siblings": dict(arch="convnet-colour-secret", lambda_gm=0.0,
                                   surrogates=DEFAULT_SURROGATES + ("convnet-colour-secret",) * 2),
}


class ColourProjection(nn.Module):
    """Drops one colour direction: ``x - v (vᵀx)`` at every pixel, ``v`` a unit vector over
    channels (a buffer: part of the weights, never trained)."""

    def __init__(self, direction: torch.Tensor):
        super().__init__()
        self.register_buffer("direction", F.normalize(direction.float(), dim=0))

    def forward(self, x):
        v = self.direction.view(1, -1, 1, 1)
        return x - v * (x * v).sum(1, keepdim=True)


@register_model("convnet-colour-secret")
def convnet_colour_secret(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """The ConvNet behind a secret frozen colour projection (drawn from the RNG, like θ0)."""
    return nn.Sequential(ColourProjection(torch.randn(in_channels)), create_model("convnet", num_classes, in_channels))


def colour_secret_rows(args, clean: tuple, key: AuthorizedModel, config: ProtectConfig) -> tuple[tuple, float]:
    """Protect the rows with δ = v·s in the key's null space: signed-gradient descent on the
    scalar field s against the surrogates' misalignment, each channel of v·s within ε and
    x + v·s within [0, 1]. Cached like :func:`robustness.protected_rows`."""
    def make() -> tuple:
        images, labels = clean
        objective = Objective(build_shared_state(images, labels, key, config, verbose=args.verbose))
        v = key.state_dict["0.direction"].view(1, -1, 1, 1)
        out = []
        for b in range(0, len(labels), config.batch_size):
            x, y = to_float(images[b:b + config.batch_size], torch.device("cpu")), labels[b:b + config.batch_size]
            gen = seeded_generator(config.seed, "colour-secret", b)
            lo, hi = (-x).clamp(min=-config.epsilon), (1 - x).clamp(max=config.epsilon)
            ends = torch.stack([lo / v, hi / v])  # v_c·s within [lo_c, hi_c] for every channel c
            s_lo, s_hi = ends.amin(0).amax(1, keepdim=True), ends.amax(0).amin(1, keepdim=True)
            s = torch.zeros_like(x[:, :1])
            first = config.epsilon / 2 / v.abs().max()
            for k in range(config.steps):
                s.requires_grad_(True)
                grad, = torch.autograd.grad(objective(x, x + v * s, y, gen, match=False), s)
                s = torch.max(torch.min(s.detach() - decayed_step(first, k, config.steps) * grad.sign(), s_hi), s_lo)
            out.append(quantize(x + v * s, images[b:b + config.batch_size], config.epsilon_levels))
        return torch.cat(out), labels

    return cached_rows(args, "colour-secret", setting(config) + key.fingerprint, clean, config, make)


def excess_colour_direction(protected: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The adaptive hacker's estimate of the secret direction: the top generalized eigenvector
    of the high-pass residual colour covariance of the protected rows against clean reference
    rows (δ adds variance along v only), mapped back to a colour direction."""
    def covariance(images: torch.Tensor) -> torch.Tensor:
        x = images.double() / 255
        r = (x - F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)).permute(1, 0, 2, 3).flatten(1)
        return r @ r.T / r.shape[1]

    c_p, c_c = covariance(protected), covariance(reference)
    chol = torch.linalg.cholesky(c_c)
    w = torch.linalg.eigh(torch.linalg.solve_triangular(chol, torch.linalg.solve_triangular(chol, c_p, upper=False).T, upper=False))[1][:, -1]
    u = torch.linalg.solve_triangular(chol.T, w.unsqueeze(1), upper=True).squeeze(1)
    return F.normalize(c_c @ u, dim=0).float()


def clean_group(model: str, arch: str) -> str:
    """Where a model's clean trainings are kept: the key's and its siblings' per key architecture,
    a hacker's once for all variants."""
    return f"clean:{arch}" if model.startswith("key") else "clean"


def summarize(trainings: dict, variant: str, arch: str, models: list[str]) -> dict:
    """Ratios per model and order (last epoch; the key's and siblings' best epoch too), and the verdict."""
    def ratios(model: str, orders, base: str | None = None) -> list[tuple[float, float]]:
        base = base or model
        pairs = [(trainings.get((variant, model, "protected", o)), trainings.get((clean_group(base, arch), base, "clean", o))) for o in orders]
        return [(p.last_acc / c.last_acc, p.best_acc / c.best_acc) for p, c in pairs if p and c]

    key = ratios(KEY, ORDERS)
    sib = {m: ratios(m, ORDERS) for m in models if m.startswith("key arch")}
    per_model = [[r[0] for r in rs] for rs in [key, *sib.values()] if len(rs) > 1]
    spread = float(np.sqrt(np.mean([np.var(rs, ddof=1) for rs in per_model]))) if per_model else float("nan")
    sib_all = [r for rs in sib.values() for r in rs]
    first = lambda rs: rs[0][0] if rs else None
    out = {"key": [r[0] for r in key], "key_best": [r[1] for r in key], "siblings": {m: [r[0] for r in rs] for m, rs in sib.items()},
           "key_ratio": float(np.mean([r[0] for r in key])) if key else None,
           "sibling_ratio": float(np.mean([r[0] for r in sib_all])) if sib_all else None,
           "sibling_best_ratio": float(np.mean([r[1] for r in sib_all])) if sib_all else None, "run_spread": spread,
           "hackers": {m: first(ratios(m, (0,))) for m in HACKERS},
           "adaptive": {m: first(ratios(f"adaptive {m}", (0,), base=m)) for m in HACKERS if f"adaptive {m}" in models}}
    if out["key_ratio"] is not None and out["sibling_ratio"] is not None:
        out["gap"] = out["key_ratio"] - out["sibling_ratio"]
        out["separates"] = bool(out["gap"] > 3 * spread)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="screening proxy: 2,000 rows, 5,000 test images, 8 epochs")
    protocol_arguments(parser)
    parser.add_argument("--eval-every", type=int, default=3)
    parser.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "uge-hf-bench")
    parser.add_argument("--fresh", action="store_true", help="protect again instead of reusing the rows in --cache")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.n, args.test, args.epochs, args.eval_every = 2000, 5000, 8, 2
    args.json = args.json or RESULTS / ("binding_quick.json" if args.quick else "binding_cpu.json")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; available: {', '.join(VARIANTS)}")

    session = time.perf_counter()
    ds, rows, clean, test = load_protocol(args)
    total = len(ds["train"])
    reference = load_tensors(ds["train"], "img", "label", 3, rows=range(total - args.n, total), verbose=False)[0]
    protocol = {"n": len(rows), "test": len(test[1]), "epochs": args.epochs, "eval_every": args.eval_every, "siblings": SIBLINGS,
                "orders": ORDERS, "hackers": HACKERS, "key_seed": 0, "epsilon": 8 / 255}
    payload = {"protocol": protocol, "variants": {}, "trainings": [], "elapsed_s": 0.0}
    if args.json.exists():
        earlier = json.loads(args.json.read_text())
        if earlier.get("protocol") != json.loads(json.dumps(protocol)):
            parser.error(f"{args.json} holds a run of another setting; move it away or pass --json")
        payload.update(earlier)
        print(f"resuming {args.json}: {len(payload['trainings'])} trainings done", flush=True)
    spent = payload["elapsed_s"]
    # (variant, model, data, order) -> Training; clean trainings are shared by variants with the same key architecture.
    trainings: dict = {}
    for d in payload["trainings"]:
        trainings[d["group"], d["model"], d["data"], d["order"]] = Training.from_dict(d)

    def save() -> None:
        payload.update(elapsed_s=spent + time.perf_counter() - session, torch=torch.__version__, threads=torch.get_num_threads())
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")

    for variant in args.variants:
        fields = dict(VARIANTS[variant])
        arch = fields.pop("arch")
        key = AuthorizedModel.create(arch, num_classes=10, seed=0)
        config = ProtectConfig(trajectory_epochs=args.epochs, **fields)
        if arch == "convnet-colour-secret":
            protected, protect_s = colour_secret_rows(args, clean, key, replace(config, trajectory_epochs=1))  # nothing to match: no trajectory needed
        else:
            protected, protect_s = protected_rows(args, ds["train"].select(rows), clean, key, config)
        info = payload["variants"].setdefault(variant, {})
        info.update(config=config.to_dict(), key=arch, protect_s=protect_s,
                    perturbed_fraction=float((protected[0] != clean[0]).float().mean()))
        if arch == "convnet-colour-secret":
            v_hat = excess_colour_direction(protected[0], reference)
            info["secret_cosine"] = float((v_hat @ key.state_dict["0.direction"]).abs())
        save()
        print(f"[{(spent + time.perf_counter() - session) / 60:5.1f} min] {variant}: protected in {protect_s:.0f} s", flush=True)
        for order in ORDERS:
            def on_training(t: Training) -> None:
                g = variant if t.data == "protected" else clean_group(t.model, arch)
                trainings[g, t.model, t.data, order] = t
                payload["trainings"].append(dict(t.to_dict(), group=g, order=order))
                save()
                print(f"[{(spent + time.perf_counter() - session) / 60:5.1f} min] {variant}, order {order}: {t.model} on {t.data}: "
                      f"{t.best_acc:.1f}/{t.last_acc:.1f} ({t.seconds:.0f} s)", flush=True)

            done = [t for (g, m, d, o), t in trainings.items() if o == order and g in (variant, clean_group(m, arch))]
            ev = Evaluation(clean, protected, test, key, hackers=HACKERS if order == 0 else (), sibling_seeds=SIBLINGS,
                            train_config=TrainConfig(epochs=args.epochs), seed=order, eval_every=args.eval_every, done=done,
                            on_training=on_training, verbose=args.verbose)
            if arch == "convnet-colour-secret" and order == 0:
                for m in HACKERS:  # the adaptive hacker: the plain hacker behind a projection that drops the estimated v
                    ev.models[f"adaptive {m}"] = (lambda build: lambda: nn.Sequential(ColourProjection(v_hat), build()))(ev.models[m])
            for model in ev.models:  # the adaptive hacker's clean baseline is the plain hacker's
                for data in ("clean", "protected") if not model.startswith("adaptive") else ("protected",):
                    ev.run(model, "none", data)
            if order == 0:  # the full panel: order 1 trains the key and its siblings again, not the hackers
                models = list(ev.models)
        info["summary"] = summarize(trainings, variant, arch, models)
        save()

    print(f"\nCIFAR-10, {len(rows)} rows, {len(test[1])} test images, {args.epochs} epochs; ratios: protected / clean accuracy of the same "
          f"model and data order, last epoch; siblings: seeds {', '.join(map(str, SIBLINGS))}; mean ± spread over {len(ORDERS)} orders\n")
    print("| variant | key θ0 | siblings (mean) | gap | 3 × spread | separates | " + " | ".join(HACKERS)
          + " | adaptive hacker | protect s |")
    print("| --- " * (8 + len(HACKERS)) + "|")
    for variant, info in payload["variants"].items():
        s = info.get("summary")
        if not s or s.get("key_ratio") is None:
            continue
        adaptive = ", ".join(f"{r:.2f}" for r in s["adaptive"].values()) or "–"
        print(f"| {variant} | {s['key_ratio']:.2f} ± {np.std(s['key']):.2f} | {s['sibling_ratio']:.2f} | {s.get('gap', float('nan')):+.2f} | "
              f"{3 * s['run_spread']:.2f} | {'yes' if s.get('separates') else 'no'} | "
              + " | ".join(f"{s['hackers'].get(m, float('nan')):.2f}" for m in HACKERS) + f" | {adaptive} | {info['protect_s']:.0f} |")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
