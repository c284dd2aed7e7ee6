"""Protection outside the fit sample (the sharded-protect issue, item 2), on real CIFAR-10.

Protects ``--n`` class-balanced training rows with the shared state *and* the generator
fitted on the first half only (``fit_sample = generator_sample = n/2``), then evaluates the
two halves apart: the *seen* half (the fit rows) and the *unseen* half. Each half trains the
key from θ0 and each hacker on its clean and on its protected rows with one recipe, tested
on the full test split. Prints a table and writes JSON.

    python bench/seen_unseen.py                           # generator mode, ~25 min on 2 cores
    python bench/seen_unseen.py --mode per-sample         # the shared state alone fitted on half
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from efficacy import DATA, balanced_prefix

from uge_hf import AuthorizedModel, ProtectConfig, protect
from uge_hf.data import load_tensors
from uge_hf.evaluation import evaluate_tensors
from uge_hf.training import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--mode", default="generator", choices=["generator", "per-sample"])
    parser.add_argument("--hackers", type=lambda s: s.split(","), default=["resnet-small", "vgg-small", "mobilenet-small"])
    parser.add_argument("--json", type=Path, default=Path("bench/results/seen_unseen.json"))
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()

    from datasets import load_dataset

    ds = load_dataset(str(args.data))
    rows = balanced_prefix(np.asarray(ds["train"]["label"]), args.n)
    half = len(rows) // 2
    train = ds["train"].select(rows)
    test = load_tensors(ds["test"], "img", "label", 3, verbose=False)
    key = AuthorizedModel.create("convnet", num_classes=10, seed=0)
    config = ProtectConfig(mode=args.mode, fit_sample=half, generator_sample=half, trajectory_epochs=args.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        out = protect(train, key, config, output_dir=Path(tmp) / "out", verbose=args.verbose)
        protect_s = time.perf_counter() - tic
        protected = load_tensors(out["train"], "img", "label", 3, verbose=False)
    clean = load_tensors(train, "img", "label", 3, verbose=False)

    models = ["key θ0", *args.hackers]
    print(f"\nCIFAR-10, {len(rows)} rows, {args.mode} mode fitted on the first {half}; {args.epochs} epochs, "
          f"{len(test[1])} test images; cells: protected-trained acc (protected / clean)\n")
    print("| part | rows | " + " | ".join(models) + " | mean hacker |")
    print("|" + " --- |" * (len(models) + 3))
    parts = []
    for name, part in (("seen", slice(0, half)), ("unseen", slice(half, len(rows)))):
        report = evaluate_tensors((clean[0][part], clean[1][part]), (protected[0][part], protected[1][part]), test, key,
                                  hackers=args.hackers, sibling_seeds=(), train_config=TrainConfig(epochs=args.epochs),
                                  eval_every=3, verbose=args.verbose)  # a 10k-image test costs about a training epoch
        summary = report.summary()
        by_model = {r.model: r for r in report}
        print(f"| {name} | {part.stop - part.start} | " + " | ".join(
            f"{by_model[m].protected_acc:.1f} ({by_model[m].ratio:.2f})" for m in models) + f" | {summary['mean_hacker_ratio']:.2f} |",
            flush=True)
        parts.append({"part": name, "rows": part.stop - part.start, "results": report.to_dicts(), "summary": summary})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"n": len(rows), "epochs": args.epochs, "config": config.to_dict(), "protect_s": protect_s,
                                     "threads": torch.get_num_threads(), "parts": parts}, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
