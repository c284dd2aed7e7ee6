"""Efficacy benchmark on real CIFAR-10 (the engine issue's figures).

Protects the first ``--n`` training rows (class-balanced) with ``protect`` end to end, then
trains the key from θ0, the key's architecture from another seed and a hacker panel (none of
them a surrogate) on the clean and on the protected rows, and measures accuracy on the
full 10,000-image test split. Each ``--variants`` entry is one protection setting; all share
one clean baseline, measured in the same run. Prints a table and writes JSON.

    python bench/efficacy.py                                   # the benchmark (<= 60 min on 2 cores)
    python bench/efficacy.py --n 2000 --epochs 8 --hackers vgg-small,mobilenet-small   # a proxy
    python bench/efficacy.py --variants default,no-gm,no-fd --jobs 4                   # ablations in parallel
    python bench/efficacy.py --n 50000 --variants default --resume-dir runs/eff50k    # resumable: rerun the same line
    python bench/efficacy.py --key resnet-small --variants default                    # another key architecture
    python bench/efficacy.py --variants two-convnets-every-key --set lambda_gm=0.25     # a variant with a field changed

With ``--resume-dir`` a run can be interrupted and rerun with the same arguments: each variant's
protected folder is kept there (``protect`` resumes it), and every finished training (model,
attack, rows) is appended to ``trainings.jsonl`` there as it ends and not repeated.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import uge_hf
from uge_hf import AuthorizedModel, ProtectConfig, protect
from uge_hf.config import PRESETS
from uge_hf.data import load_tensors
from uge_hf.evaluation import KEY, Evaluation, Training, evaluate_tensors
from uge_hf.models import DEFAULT_HACKERS
from uge_hf.training import TrainConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"

# Named protection settings: the default and the ablations reported in the README.
VARIANTS = {
    "default": {},
    "generator": {"mode": "generator", "generator_sample": 1000},
    "generator+refine": {"mode": "generator", "generator_sample": 1000, "refine_steps": 4},
    "no-gm": {"lambda_gm": 0.0},
    "no-fd": {"lambda_fd": 0.0},
    "fd-x3": {"lambda_fd": 3.0},
    "steps-20": {"steps": 20},
    "ud-0.3": {"lambda_ud": 0.3},
    "bind": {"lambda_bind": 1.0, "other_seeds": (11, 12)},
    "bind-x5": {"lambda_bind": 5.0, "other_seeds": (11, 12)},
    "eps-16": {"epsilon": 16 / 255},
    "gm-every-step": {"gm_every": 1},
    "sur-15": {"surrogate_epochs": 15},
    "sur-4": {"surrogate_epochs": 4},
    "gm3": {"lambda_gm": 3.0, "gm_every": 1},
    "gm3-steps20": {"lambda_gm": 3.0, "gm_every": 1, "steps": 20},
    "gm10-steps20": {"lambda_gm": 10.0, "gm_every": 1, "steps": 20},
    "gm3-fd3-steps20": {"lambda_gm": 3.0, "lambda_fd": 3.0, "gm_every": 1, "steps": 20},
    "gm2-every2-steps20": {"lambda_gm": 2.0, "steps": 20},
    # Several authorized keys (issue 12): the default setting, protected for each key below.
    "two-convnets": {},
    "convnet+resnet-small": {},
    # The misalignment fools resnet-tiny, a surrogate of the resnet-small key's family: without it
    # (and the one-key run without it, for the hackers' comparison).
    "convnet+resnet-small-no-resnet-sur": {"surrogates": ("vgg-tiny", "mixer-tiny")},
    "no-resnet-sur": {"surrogates": ("vgg-tiny", "mixer-tiny")},
    # ... and resnet-tiny's place taken by a family no hacker of the panel belongs to.
    "resnet-sur-to-vit": {"surrogates": ("vgg-tiny", "mixer-tiny", "vit-micro")},
    # Keys in turn, each weighted by the number of keys on its turn: over a batch each key pulls
    # as hard as a lone key does, at the cost of one key per matching step.
    "convnet+resnet-small-gm2": {"lambda_gm": 2.0},
    # Per-image activation matching (losses.activation_matching_loss), beside and in place of L_gm.
    "am10": {"lambda_am": 10.0},
    "gm0-am10": {"lambda_gm": 0.0, "lambda_am": 10.0},
    # Retraining rounds: the key retrained on the protected rows, δ searched again along it.
    "retrain1": {"retrain_rounds": 1},
    "retrain2": {"retrain_rounds": 2},
    "retrain3": {"retrain_rounds": 3},
    # One round with momentum in the signed steps: the two changes that each lowered every hacker.
    "retrain1-momentum": {"retrain_rounds": 1, "momentum": 0.9},
}
# The further authorized keys of a variant, (architecture, seed) each, after the benchmark's key (--key, seed 0).
KEYS = {"two-convnets": [("convnet", 1)], "convnet+resnet-small": [("resnet-small", 0)],
        "convnet+resnet-small-no-resnet-sur": [("resnet-small", 0)], "convnet+resnet-small-gm2": [("resnet-small", 0)]}
# Each two-key variant again, matching every key on each matching step instead of one in turn.
VARIANTS.update({f"{v}-every-key": {"match_every_key": True} for v in ("two-convnets", "convnet+resnet-small")})
KEYS.update({f"{v}-every-key": KEYS[v] for v in ("two-convnets", "convnet+resnet-small")})
# A convnet key beside the benchmark's key (run with --key resnet-small: the pair above, compared
# with the resnet-small key's own one-key run in the same run).
VARIANTS["plus-convnet-every-key"], KEYS["plus-convnet-every-key"] = {"match_every_key": True}, [("convnet", 0)]
# Two convnet keys under the preset large (the setting protect advises from 10,000 rows up), in turns
# and matching every key on each step.
VARIANTS["two-convnets-large"] = dict(PRESETS["large"])
VARIANTS["two-convnets-large-every-key"] = {**VARIANTS["two-convnets-large"], "match_every_key": True}
KEYS.update({v: KEYS["two-convnets"] for v in ("two-convnets-large", "two-convnets-large-every-key")})
VARIANTS["convnet+resnet-small-large"], KEYS["convnet+resnet-small-large"] = dict(PRESETS["large"]), [("resnet-small", 0)]
# ... and matching both on each step: under large in turns resnet-small kept 0.55 against 0.73 as the
# only key, as if matched on half its steps.
VARIANTS["convnet+resnet-small-large-every-key"] = {**VARIANTS["convnet+resnet-small-large"], "match_every_key": True}
KEYS["convnet+resnet-small-large-every-key"] = KEYS["convnet+resnet-small-large"]
# Three convnet partners in turn, under the default and under large: how the keys' share holds past two.
KEYS["three-convnets"] = KEYS["three-convnets-large"] = [("convnet", 1), ("convnet", 2)]
VARIANTS["three-convnets"], VARIANTS["three-convnets-large"] = {}, dict(PRESETS["large"])


def config_override(text: str) -> tuple[str, object]:
    """``FIELD=VALUE`` of ``--set``: a tuple field's value is comma-separated, any other is JSON."""
    name, _, value = text.partition("=")
    defaults = ProtectConfig().to_dict()
    if name not in defaults or not value:
        raise argparse.ArgumentTypeError(f"{text!r} is not FIELD=VALUE with a ProtectConfig field; fields: {', '.join(defaults)}")
    if isinstance(defaults[name], tuple):
        return name, tuple(v for v in value.split(",") if v)
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def balanced_prefix(labels: np.ndarray, n: int, num_classes: int = 10) -> list[int]:
    """The first n/num_classes rows of each class, in dataset order."""
    per_class, taken, rows = n // num_classes, [0] * num_classes, []
    for i, y in enumerate(labels):
        if taken[y] < per_class:
            taken[y] += 1
            rows.append(i)
            if len(rows) == per_class * num_classes:
                break
    return rows


def protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """The protocol's options, shared by the benchmarks that follow it: the data folder, the
    class-balanced training rows, the test images and the epochs of every training."""
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--test", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=15)


def load_protocol(args: argparse.Namespace) -> tuple:
    """The protocol's data for ``args`` (:func:`protocol_arguments`): the ``DatasetDict``, the
    class-balanced prefix of ``--n`` training rows, those rows and the first ``--test`` test
    images, each as ``uint8`` images ``(N, 3, H, W)`` and ``int64`` labels."""
    from datasets import load_dataset

    ds = load_dataset(str(args.data))
    rows = balanced_prefix(np.asarray(ds["train"]["label"]), args.n)
    clean = load_tensors(ds["train"], "img", "label", 3, rows=rows, verbose=False)
    test = load_tensors(ds["test"], "img", "label", 3, rows=range(min(args.test, len(ds["test"]))), verbose=False)
    return ds, rows, clean, test


def check_budget(protected: torch.Tensor, clean: torch.Tensor, config: ProtectConfig) -> None:
    """Every protected ``uint8`` pixel within ε (in 8-bit levels) of its clean one."""
    assert (protected.int() - clean.int()).abs().max() <= config.epsilon_levels, "L-inf bound violated"


class TrainingLog:
    """The finished trainings of a resumable run: one JSON line each in ``trainings.jsonl``,
    appended as each ends. One ``write`` on an append-only file per record, each opened by a
    newline, so variants training in parallel processes share the file and a record cut by a
    kill spoils only itself. Without a folder it keeps nothing."""

    def __init__(self, folder: Optional[Path]):
        self.path = folder / "trainings.jsonl" if folder is not None else None

    def done(self, variant: str) -> list[Training]:
        """The trainings of ``variant`` (``"clean"``: the clean baseline) finished earlier."""
        if self.path is None or not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # empty, or cut by a kill
        return [Training.from_dict(r) for r in records if r["variant"] == variant]

    def add(self, variant: str, training: Training) -> None:
        if self.path is None:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, ("\n" + json.dumps({"variant": variant, **training.to_dict()})).encode())
        finally:
            os.close(fd)


def run_variant(name: str, args, rows: list[int], clean: tuple, test: tuple, baseline: list[Training]) -> dict:
    from datasets import load_dataset

    torch.set_num_threads(args.threads)
    train = load_dataset(str(args.data), split="train").select(rows)
    keys = [AuthorizedModel.create(arch, num_classes=10, seed=seed) for arch, seed in [(args.key, 0), *KEYS.get(name, [])]]
    config = ProtectConfig(trajectory_epochs=args.epochs, **{**VARIANTS[name], **dict(args.set)})
    log = TrainingLog(args.resume_dir)
    # A kept folder is resumed by protect (same arguments, same bytes); a temporary one is not.
    with tempfile.TemporaryDirectory() if args.resume_dir is None else nullcontext(str(args.resume_dir / name)) as folder:
        record = Path(folder) / "protect.json"  # the time of the call that finished protecting, kept for a resumed run
        resumed = (Path(folder) / "out").exists()
        start = time.perf_counter()
        out = protect(train, keys, config, output_dir=Path(folder) / "out", verbose=args.verbose)
        if not record.exists():
            timings = json.loads((Path(folder) / "out.uge-state" / "build.json").read_text())["phases_s"]
            record.write_text(json.dumps({"protect_s": time.perf_counter() - start, "phases_s": timings, "resumed": resumed}))
        kept = json.loads(record.read_text())
        protect_s, timings, resumed = kept["protect_s"], kept["phases_s"], kept["resumed"]
        protected = load_tensors(out["train"], "img", "label", 3, verbose=False)
    timings["perturb_and_write"] = protect_s - sum(timings.values())
    check_budget(protected[0], clean[0], config)
    report = evaluate_tensors(clean, protected, test, keys, hackers=args.hackers, train_config=TrainConfig(epochs=args.epochs),
                              attacks=["none"] + args.attacks, attacked_models=args.attacked_models,
                              baseline=baseline + log.done(name), on_training=lambda t: log.add(name, t),
                              eval_every=args.eval_every, verbose=args.verbose)
    # protect_resumed: protect_s covers only the call that finished an interrupted protect.
    return {"variant": name, "config": config.to_dict(), "protect_s": protect_s, "protect_resumed": resumed, "phases_s": timings,
            "rows": report.to_dicts(), "summary": report.summary()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    protocol_arguments(parser)
    parser.add_argument("--key", default="convnet", help="the benchmark key's architecture (seed 0); a variant's further keys follow it")
    parser.add_argument("--hackers", type=lambda s: s.split(","), default=list(DEFAULT_HACKERS))
    parser.add_argument("--variants", type=lambda s: s.split(","), default=["default", "generator"])
    parser.add_argument("--attacks", type=lambda s: [a for a in s.split(",") if a], default=[])
    parser.add_argument("--attacked-models", type=lambda s: s.split(","), default=None)
    parser.add_argument("--eval-every", type=int, default=3, help="test accuracy after every k-th epoch and the last: "
                        "best-epoch figures over those (each evaluation of the 10k test split costs about one training epoch on 2 cores)")
    parser.add_argument("--clean-json", type=Path,
                        help="reuse the clean baseline of an earlier run's JSON (same --key, --n, --test, --epochs, --eval-every, device)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", type=config_override,
                        help="override a ProtectConfig field in every variant (a tuple field comma-separated, any other JSON), "
                             "e.g. --set lambda_gm=1.5")
    parser.add_argument("--jobs", type=int, default=1, help="variants run in parallel (on a GPU machine)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, default=Path("bench/results/efficacy.json"))
    parser.add_argument("--resume-dir", type=Path, help="keep protected folders and finished trainings here; rerun to resume")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")

    if args.resume_dir is not None:
        # The key enters only when it is not the default, so runs from before --key still resume.
        setting = {"n": args.n, "test": args.test, "epochs": args.epochs, "eval_every": args.eval_every, "data": str(args.data.resolve()),
                   **({"key": args.key} if args.key != "convnet" else {}), **({"set": dict(args.set)} if args.set else {})}
        args.resume_dir.mkdir(parents=True, exist_ok=True)
        recorded = args.resume_dir / "setting.json"
        if recorded.exists() and json.loads(recorded.read_text()) != json.loads(json.dumps(setting)):  # a --set tuple reads back a list
            parser.error(f"{args.resume_dir} holds a run with {recorded.read_text().strip()}, not {json.dumps(setting)}; "
                         "rerun with those arguments or choose another --resume-dir")
        recorded.write_text(json.dumps(setting) + "\n")
    log = TrainingLog(args.resume_dir)

    torch.set_num_threads(args.threads)
    _, rows, clean, test = load_protocol(args)
    key = AuthorizedModel.create(args.key, num_classes=10, seed=0)
    # What a clean baseline depends on (besides the key): another run's is reused only if it matches.
    protocol = {"n": len(rows), "test": len(test[1]), "epochs": args.epochs, "eval_every": args.eval_every,
                "device": "cuda" if torch.cuda.is_available() else "cpu"}

    # One clean baseline for every variant: train each model once on the clean rows.
    start = time.perf_counter()
    if args.clean_json:
        earlier = json.loads(args.clean_json.read_text())
        if (earlier_key := earlier.get("key", "convnet")) != args.key:  # runs from before --key had convnet
            parser.error(f"{args.clean_json} holds the clean baseline of key {earlier_key}, not {args.key}; "
                         f"pass --key {earlier_key} or drop --clean-json")
        # Older runs lack some of these; what they record must match.
        if differ := [f"{k} {earlier[k]} there, {v} here" for k, v in protocol.items() if k in earlier and earlier[k] != v]:
            parser.error(f"{args.clean_json} holds the clean baseline of another protocol ({'; '.join(differ)}); "
                         "pass the same options or drop --clean-json")
        key_train_s = earlier["key_training_s"]
        # Runs before best epochs were recorded kept the last epoch's accuracy only.
        baseline = [Training.from_dict(t) for t in earlier["clean_trainings"]] if "clean_trainings" in earlier else \
            [Training(m, "none", "clean", [args.epochs], [acc], 0.0) for m, acc in earlier["clean_acc"].items()]
        if missing := [m for m in [KEY, "key arch, seed 7", *args.hackers] if m not in {t.model for t in baseline}]:
            parser.error(f"{args.clean_json} has no clean training of {', '.join(missing)}; drop those from --hackers or --clean-json")
    else:
        ev = Evaluation(clean, None, test, key, hackers=args.hackers, train_config=TrainConfig(epochs=args.epochs),
                        eval_every=args.eval_every, done=log.done("clean"), on_training=lambda t: log.add("clean", t), verbose=args.verbose)
        baseline = [ev.run(name, "none", "clean") for name in ev.models]
        key_train_s = ev.trainings[KEY, "none", "clean"].seconds
    clean_acc = {t.model: t.last_acc for t in baseline}
    clean_s = time.perf_counter() - start

    print(f"\nCIFAR-10, {len(rows)} train rows, {len(test[1])} test images, {args.epochs} epochs, key {args.key} seed 0, "
          f"hackers: {', '.join(args.hackers)}; one clean training of the key: {key_train_s:.0f} s; cells: best-epoch / last-epoch accuracy "
          f"(tested every {args.eval_every} epochs and at the last) and the last-epoch ratio to clean\n")
    header = "| variant | key θ0 | key arch, seed 7 | " + " | ".join(args.hackers) + " | mean hacker | protect / key training |"
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    by_name = {t.model: t for t in baseline}  # an earlier run's baseline may hold more models than this run's columns
    print("| clean acc, best/last epoch | " + " | ".join(f"{by_name[m].best_acc:.1f}/{by_name[m].last_acc:.1f}"
                                                        for m in [KEY, "key arch, seed 7", *args.hackers]) + " | | |", flush=True)
    payload = {**protocol, "key": args.key, "hackers": args.hackers,
               "clean_acc": clean_acc, "clean_best_acc": {t.model: t.best_acc for t in baseline},
               "clean_trainings": [t.to_dict() for t in baseline],
               "key_training_s": key_train_s, "clean_baseline_s": clean_s, "threads": args.threads, "uge_hf": uge_hf.__version__, "variants": []}
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def report(res: dict) -> None:  # print and save each variant as soon as it is done
        by_model = {r["model"]: r for r in res["rows"] if r["attack"] == "none"}
        cells = [f"{by_model[m]['protected_best_acc']:.1f}/{by_model[m]['protected_acc']:.1f} ({by_model[m]['ratio']:.2f})"
                 for m in ["key θ0", "key arch, seed 7", *args.hackers]]

        res["protect_over_key_training"] = res["protect_s"] / key_train_s
        print(f"| {res['variant']} | " + " | ".join(cells) + f" | {res['summary']['mean_hacker_ratio']:.2f} | {res['protect_over_key_training']:.2f} |")
        for r in res["rows"]:  # the variant's further keys, and the attacks, one line each
            if r["attack"] == "none" and r["model"].startswith("key θ0 #"):
                print(f"|   {res['variant']}, {r['model']} (clean {r['clean_acc']:.1f}) | {r['protected_best_acc']:.1f}/{r['protected_acc']:.1f} "
                      f"({r['ratio']:.2f}) |")
            if r["attack"] != "none":
                print(f"|   {res['variant']}, {r['model']} after {r['attack']} | {r['protected_best_acc']:.1f}/{r['protected_acc']:.1f} "
                      f"({r['ratio']:.2f}) |")
        sys.stdout.flush()
        payload["variants"].append(res)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")

    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for future in as_completed([pool.submit(run_variant, v, args, rows, clean, test, baseline) for v in args.variants]):
                report(future.result())
    else:
        for v in args.variants:
            report(run_variant(v, args, rows, clean, test, baseline))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
