"""Robustness benchmark (issue 9): the protection under the field's standard defenses, on real
CIFAR-10, reported the way the field reports it (best and last epoch).

The efficacy benchmark's protocol (bench/efficacy.py): the first ``--n`` class-balanced
training rows protected with the default preset, the full 10,000-image test split,
ε = 8/255, key ``convnet`` seed 0, 15 epochs. Rows: the key θ0, the key's architecture from
seed 7, and hackers none of which is a surrogate (default: vgg-small, densenet-small,
mixer-small, vit-tiny). Columns: the defenses of ``uge_hf.attacks``. Each cell: the model
trained on the protected rows under the defense, accuracy at its best / last epoch, and the
last-epoch ratio to the same model trained on the clean rows *without* defense; on the line
below, the defense applied to the clean rows (what the defense costs by itself).

Not every cell fits in 90 minutes on 2 cores. Trainings run in priority order (:func:`plan`:
the no-defense baseline, JPEG-10 on every row, the key's other recipes, UEraser on every row,
adversarial training, grayscale+JPEG-10 on every row, then the other defenses on the cheapest
hacker, then everything else); one whose predicted time (the same model's measured training
times the attack's cost) would end past ``--budget-min`` is skipped and listed under "cuts".
Results are written after every training and the protected rows are cached, so a rerun with
the same arguments resumes where it stopped. Prints a table, writes JSON and a PNG heatmap.

    python bench/robustness.py            # <= 90 min on 2 cores: bench/results/robustness_cpu.{json,png}
    python bench/robustness.py --quick    # a proxy of a few minutes: bench/results/robustness_quick.{json,png}
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import tempfile
import time
from pathlib import Path

import torch
from efficacy import check_budget, config_override, load_protocol, protocol_arguments

from uge_hf import AuthorizedModel, ProtectConfig, protect
from uge_hf.attacks import get_attack
from uge_hf.data import load_tensors
from uge_hf.evaluation import KEY, Evaluation, EvaluationReport, Training
from uge_hf.training import TrainConfig

RESULTS = Path(__file__).resolve().parent / "results"
SIBLING = "key arch, seed 7"

# The field's strongest defenses (JPEG-10 restores every published method to 68-85 %, UEraser
# and grayscale+JPEG most), run on every row; the others on the cheapest hacker first.
STRONG = ["jpeg10", "ueraser", "grayscale+jpeg10"]
OTHERS = ["ueraser-max", "grayscale", "bitdepth2", "distill", "cutmix", "mixup", "cutout", "gaussian", "median", "jpeg30", "jpeg50", "bitdepth4"]
RECIPES = ["recipe-adam", "recipe-2x-epochs", "recipe-batch-256"]


def plan(models: list[str], focus: str, strong: list[str], adversarial: str, others: list[str], recipes: list[str]) -> list[tuple[str, str, str]]:
    """Every (model, attack, rows) training of the benchmark, most important first: the
    baseline; the first strong defense on every attacked row (the key's architecture from
    another seed and the hackers) and on the clean rows of ``focus``; the key's other recipes;
    adversarial training of ``focus``; the other strong defenses like the first; the other
    defenses on ``focus``; then what 2 cores rarely reach: the rest on every row."""
    attacked = [m for m in models if m != KEY]

    def everywhere(attack: str) -> list[tuple[str, str, str]]:
        return [(m, attack, "protected") for m in attacked] + [(focus, attack, "clean")]

    def both(model: str, attack: str) -> list[tuple[str, str, str]]:
        return [(model, attack, "protected"), (model, attack, "clean")]

    jobs = [(m, "none", d) for m in models for d in ("clean", "protected")]
    jobs += everywhere(strong[0])
    jobs += [job for r in recipes for job in both(KEY, r)]
    jobs += both(focus, adversarial)
    jobs += [job for a in strong[1:] for job in everywhere(a)]
    jobs += [job for a in others for job in both(focus, a)]
    jobs += [(m, a, "protected") for a in others + [adversarial] for m in attacked]
    jobs += [(m, a, "clean") for a in strong + others + [adversarial] for m in attacked]
    return list(dict.fromkeys(jobs))


def predicted_seconds(ev: Evaluation, model: str, attack: str) -> float | None:
    """Training plus test time of ``model`` under ``attack``, from its own no-defense trainings
    in this run (None before any)."""
    base = [t for t in ev.trainings.values() if t.model == model and t.attack == "none"]
    if not base:
        return None
    train_s, eval_s = max(t.seconds for t in base), max(t.eval_seconds for t in base)
    steps = re.fullmatch(r"adversarial(?:-(\d+))?", attack)
    if steps:  # each PGD step is one more forward and backward pass per batch
        return train_s * (1 + int(steps.group(1) or 10)) + eval_s
    if attack == "recipe-2x-epochs":
        return 2 * (train_s + eval_s)
    if attack == "ueraser-max":  # five forward passes (a third of a step each) and five augmentations per batch
        return train_s * 3.5 + eval_s
    return train_s * (1.3 if attack == "distill" else 1.1) + eval_s  # distillation adds the teacher's forward pass


def setting(config: ProtectConfig) -> str:
    """The fields of ``config`` that differ from ``ProtectConfig()``'s, as JSON: what names a cache
    and a run, so that a field added to the config later leaves earlier ones valid."""
    default = ProtectConfig().to_dict()
    return json.dumps({k: v for k, v in config.to_dict().items() if v != default[k]}, sort_keys=True)


def cached_rows(args, name: str, setting: str, clean: tuple, config: ProtectConfig, make) -> tuple[tuple, float]:
    """``make()``'s protected rows and seconds, from ``args.cache`` when an earlier run of the same
    ``setting`` made them (unless ``--fresh``: after a change to the code, say); checked against
    the L∞ bound before they are kept."""
    cache = args.cache / f"{name}-{args.n}-{hashlib.sha256((setting + str(args.n)).encode()).hexdigest()[:16]}.pt"
    if cache.exists() and not args.fresh:
        cached = torch.load(cache)
        return cached["rows"], cached["seconds"]
    start = time.perf_counter()
    protected = make()
    seconds = time.perf_counter() - start
    check_budget(protected[0], clean[0], config)
    args.cache.mkdir(parents=True, exist_ok=True)
    torch.save({"rows": protected, "seconds": seconds}, cache)
    return protected, seconds


def protected_rows(args, train, clean: tuple, key: AuthorizedModel, config: ProtectConfig) -> tuple[tuple, float]:
    """The protected rows, from the cache when an earlier run of the same setting made them."""
    def make() -> tuple:
        with tempfile.TemporaryDirectory() as tmp:
            out = protect(train, key, config, output_dir=Path(tmp) / "out", verbose=args.verbose)
            return load_tensors(out["train"], "img", "label", 3, verbose=False)

    return cached_rows(args, "protected", setting(config), clean, config, make)


def table(report: EvaluationReport, models: list[str], attacks: list[str]) -> str:
    """Rows: models; columns: defenses. A model's first line is trained on the protected rows
    (best/last epoch accuracy, last-epoch ratio to clean training without defense); its second
    the defense on the clean rows, with the same ratio."""
    cells = {(r.model, r.attack): r for r in report}
    lines = ["| model | " + " | ".join(attacks) + " |", "| --- " * (len(attacks) + 1) + "|"]
    for m in models:
        protected, clean = [], []
        for a in attacks:
            r = cells.get((m, a))
            protected.append(f"{r.protected_best_acc:.1f}/{r.protected_acc:.1f} ({r.ratio:.2f})" if r else "–")
            if a == "none":
                clean.append(f"{r.clean_best_acc:.1f}/{r.clean_acc:.1f} (1.00)" if r else "–")
            else:
                clean.append(f"{r.attack_clean_best_acc:.1f}/{r.attack_clean_acc:.1f} ({r.attack_clean_acc / r.clean_acc:.2f})"
                             if r and r.attack_clean_acc is not None else "–")
        lines.append(f"| {m} | " + " | ".join(protected) + " |")
        lines.append("| &nbsp;&nbsp;on clean rows | " + " | ".join(clean) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a proxy of a few minutes: 1,000 rows, 1,000 test images, 4 epochs, "
                        "the fast preset, two hackers, fewer defenses")
    protocol_arguments(parser)
    parser.add_argument("--eval-every", type=int, default=3, help="test after every k-th epoch and the last; best epoch among those "
                        "(a 10k-image test costs about one training epoch on 2 cores)")
    parser.add_argument("--hackers", type=lambda s: s.split(","), default=["vgg-small", "densenet-small", "mixer-small", "vit-tiny"],
                        help="the first is the focus: every defense runs on it first")
    parser.add_argument("--pgd-steps", type=int, default=3, help="adversarial training's PGD steps (each costs about one more training)")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", type=config_override,
                        help="override a ProtectConfig field of the preset, for an ablation (repeatable): eot=jpeg,grayscale, "
                        "low_frequency=0.5")
    parser.add_argument("--budget-min", type=float, help="skip trainings predicted to end past this many minutes, protection "
                        "included (default 90, 10 with --quick; 0: no limit)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "uge-hf-bench", help="protected rows, kept for a rerun")
    parser.add_argument("--fresh", action="store_true", help="ignore the results of an earlier run, its protected "
                        "rows included, instead of resuming it")
    parser.add_argument("--clean-json", type=Path, help="reuse the clean-row trainings of an earlier run of the same protocol "
                        "(another setting's: they do not depend on the protection, and the trainings are seeded)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    strong, others, recipes = STRONG, OTHERS, RECIPES
    if args.quick:
        args.n, args.test, args.epochs, args.eval_every, args.preset, args.pgd_steps = 1000, 1000, 4, 1, "fast", 1
        args.hackers, strong, others, recipes = ["vgg-small", "vit-tiny"], ["jpeg10", "ueraser"], ["grayscale", "cutmix", "distill"], ["recipe-adam"]
    args.budget_min = args.budget_min if args.budget_min is not None else 10.0 if args.quick else 90.0
    args.json = args.json or RESULTS / ("robustness_quick.json" if args.quick else "robustness_cpu.json")
    adversarial = get_attack(f"adversarial-{args.pgd_steps}").name
    for name in strong + others + recipes:
        get_attack(name)

    torch.set_num_threads(args.threads)
    session = time.perf_counter()
    ds, rows, clean, test = load_protocol(args)
    key = AuthorizedModel.create("convnet", num_classes=10, seed=0)
    config = ProtectConfig.preset(args.preset, **{"trajectory_epochs": args.epochs, **dict(args.set)})
    protocol = {"n": len(rows), "test": len(test[1]), "epochs": args.epochs, "eval_every": args.eval_every, "hackers": args.hackers,
                "pgd_steps": args.pgd_steps, "key": "convnet seed 0", "epsilon": config.epsilon, "config": config.to_dict()}

    def same_protocol(earlier: dict) -> bool:  # the hackers choose which trainings run, not how: a run resumes with more
        rest = lambda p: {k: v for k, v in p.items() if k not in ("hackers", "config")}
        return rest(earlier) == rest(json.loads(json.dumps(protocol)))

    def same_setting(earlier: dict) -> bool:
        return same_protocol(earlier) and "config" in earlier and setting(ProtectConfig.from_dict(earlier["config"])) == setting(config)

    payload = {"protocol": protocol, "trainings": [], "cuts": [], "elapsed_s": 0.0}
    if args.json.exists() and not args.fresh:
        earlier = json.loads(args.json.read_text())
        if not same_setting(earlier.get("protocol", {})):
            parser.error(f"{args.json} holds a run of another setting; pass --fresh to replace it or --json to write elsewhere")
        payload.update(earlier, protocol=protocol, cuts=[])
        print(f"resuming {args.json}: {len(payload['trainings'])} trainings done", flush=True)
    if args.clean_json:
        earlier = json.loads(args.clean_json.read_text())
        if not same_protocol(earlier.get("protocol", {})):
            parser.error(f"{args.clean_json} holds a run of another protocol (--n, --test, --epochs, --eval-every, --pgd-steps); "
                         "pass the same ones or drop --clean-json")
        have = {(t["model"], t["attack"], t["data"]) for t in payload["trainings"]}
        payload["trainings"] += [t for t in earlier["trainings"] if t["data"] == "clean" and (t["model"], t["attack"], t["data"]) not in have]
        payload["clean_from"] = str(args.clean_json)
    spent = payload["elapsed_s"]

    def elapsed() -> float:
        return spent + time.perf_counter() - session

    def save() -> None:
        payload.update(elapsed_s=elapsed(), threads=args.threads, torch=torch.__version__,
                       device="cuda" if torch.cuda.is_available() else "cpu")
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")

    protected, protect_s = protected_rows(args, ds["train"].select(rows), clean, key, config)
    payload.setdefault("protect_s", protect_s)
    save()
    print(f"CIFAR-10, {len(rows)} rows, {len(test[1])} test images, {args.epochs} epochs, tested every {args.eval_every}; "
          f"protected in {payload['protect_s']:.0f} s; {elapsed() / 60:.1f} min spent", flush=True)

    def on_training(t: Training) -> None:
        payload["trainings"].append(t.to_dict())
        save()
        what = f"{t.model} on {t.data}" + ("" if t.attack == "none" else f", {t.attack}")
        print(f"[{elapsed() / 60:5.1f} min] {what}: {t.best_acc:.1f}/{t.last_acc:.1f} ({t.seconds:.0f} s + {t.eval_seconds:.0f} s test)",
              flush=True)

    ev = Evaluation(clean, protected, test, key, hackers=args.hackers, sibling_seeds=(7,), train_config=TrainConfig(epochs=args.epochs),
                    eval_every=args.eval_every, done=[Training.from_dict(t) for t in payload["trainings"]], on_training=on_training,
                    verbose=args.verbose)
    models = list(ev.models)
    for job in plan(models, args.hackers[0], strong, adversarial, others, recipes):
        if job in ev.trainings:
            continue
        predicted = predicted_seconds(ev, job[0], job[1])
        if args.budget_min and predicted is not None and elapsed() + predicted > 60 * args.budget_min:
            payload["cuts"].append(f"{job[0]} on {job[2]}, {job[1]}: {predicted:.0f} s predicted, "
                                   f"{60 * args.budget_min - elapsed():.0f} s left")
            continue
        ev.run(*job)
    report = ev.report()
    payload.update(rows=report.to_dicts(), summary=report.summary())
    save()

    attacks = list(dict.fromkeys(r.attack for r in report))
    print(f"\ncells: protected-trained accuracy best/last epoch (last-epoch ratio to the same model trained on clean rows without "
          f"defense); the line below: the defense on the clean rows. {args.epochs} epochs, adversarial = PGD-{args.pgd_steps}, "
          f"{elapsed() / 60:.1f} min in all\n")
    print(table(report, models, attacks))
    s = payload["summary"]
    print(f"\nkey θ0 keeps {s['key_ratio']:.2f}; {SIBLING} {s['sibling_ratio']:.2f}; hackers, no defense: "
          + ", ".join(f"{m} {r:.2f}" for m, r in s["hacker_ratios"].items()) + f" (mean {s['mean_hacker_ratio']:.2f})")
    if "robust_hacker_ratio" in s:
        print(f"worst hacker under a defense: {s['robust_hacker']} keeps {s['robust_hacker_ratio']:.2f}")
    if "key_recipe_ratios" in s:
        print("key θ0 with another recipe keeps " + ", ".join(f"{a} {r:.2f}" for a, r in s["key_recipe_ratios"].items()))
    if payload["cuts"]:
        print(f"\ncut to fit {args.budget_min:.0f} min: {len(payload['cuts'])} trainings (all listed in the JSON), from "
              + "; ".join(payload["cuts"][:3]) + ("; …" if len(payload["cuts"]) > 3 else ""))
    try:
        figure = report.plot(args.json.with_suffix(".png"), title=f"CIFAR-10, {len(rows)} rows, {args.epochs} epochs: protected / clean "
                             "accuracy, last epoch\n[the defense on clean rows / clean]")
        print(f"\nwrote {args.json} and {figure}")
    except ImportError as error:
        print(f"\nwrote {args.json}; no figure: {error}")


if __name__ == "__main__":
    main()
