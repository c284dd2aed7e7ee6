"""Does the spacing of the key's trajectory checkpoints set how much of its accuracy the key keeps?

The key's share falls with the rows (README, "Paper scale": 5,000 rows 0.88, 10,000 0.78,
20,000 0.46, 50,000 on a GPU 0.16), and so does the number of training steps between the
checkpoints the search matches the key's gradients at (one per epoch: 40 steps at 5,000 rows,
79 at 10,000). This separates the two: one shared state is built on the efficacy protocol's
rows, and the rows are protected once along every checkpoint of the key's trajectory (the
default, the same bytes as ``protect``) and once along every ``--stride``-th one (the steps
between them multiplied by ``stride``, as at ``stride`` times the rows, with the rows unchanged).
The key, its architecture from another seed and the hackers are trained on the clean rows and on
each protection.

    python bench/spacing.py   # about 25 min on 2 cores: bench/results/spacing.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from efficacy import load_protocol, protocol_arguments

from uge_hf import AuthorizedModel, ProtectConfig, UGETransform
from uge_hf.evaluation import Evaluation, evaluate_tensors
from uge_hf.training import TrainConfig


def thinned(trajectory: list, stride: int) -> list:
    """Every ``stride``-th checkpoint from θ0, and the final weights (the search draws from all
    but the last, and the last is where training ends)."""
    return trajectory[:-1][::stride] + trajectory[-1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    protocol_arguments(parser)
    parser.add_argument("--eval-every", type=int, default=3)
    parser.add_argument("--stride", type=int, default=2)
    parser.add_argument("--hackers", type=lambda s: s.split(","), default=["vgg-small"])
    parser.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "spacing.json")
    args = parser.parse_args()

    ds, rows, clean, test = load_protocol(args)
    train = ds["train"].select(rows)
    key = AuthorizedModel.create("convnet", num_classes=10, seed=0)
    recipe = TrainConfig(epochs=args.epochs)

    tic = time.perf_counter()
    transform = UGETransform.fit(train, key, ProtectConfig(trajectory_epochs=args.epochs), verbose=False)
    fit_s = time.perf_counter() - tic
    ev = Evaluation(clean, None, test, key, hackers=args.hackers, train_config=recipe, eval_every=args.eval_every, verbose=False)
    baseline = [ev.run(name, "none", "clean") for name in ev.models]

    payload = {"n": len(rows), "test": len(test[1]), "epochs": args.epochs, "hackers": args.hackers, "fit_s": fit_s,
               "steps_per_epoch": -(-len(rows) // recipe.batch_size), "clean_trainings": [t.to_dict() for t in baseline], "strides": []}
    print(f"CIFAR-10, {len(rows)} rows, {len(test[1])} test images, {args.epochs} epochs ({payload['steps_per_epoch']} steps each), "
          f"key convnet seed 0\n\n| checkpoints | steps apart | key θ0 | key arch, seed 7 | {' | '.join(args.hackers)} |\n"
          f"| --- | --- | --- | --- |{' --- |' * len(args.hackers)}", flush=True)
    for stride in (1, args.stride):
        state = replace(transform.state, trajectories=[thinned(t, stride) for t in transform.state.trajectories])
        tic = time.perf_counter()
        protected = torch.stack(UGETransform(state).perturb_rows(list(clean[0]), clean[1]))
        perturb_s = time.perf_counter() - tic
        report = evaluate_tensors(clean, (protected, clean[1]), test, key, hackers=args.hackers, train_config=recipe,
                                  eval_every=args.eval_every, baseline=baseline, verbose=False)
        rows_out = {r["model"]: r for r in report.to_dicts() if r["attack"] == "none"}
        checkpoints = len(thinned(transform.state.trajectories[0], stride)) - 1
        payload["strides"].append({"stride": stride, "checkpoints_matched": checkpoints, "steps_apart": stride * payload["steps_per_epoch"],
                                   "perturb_s": perturb_s, "rows": report.to_dicts(), "summary": report.summary()})
        cells = [f"{rows_out[m]['protected_best_acc']:.1f}/{rows_out[m]['protected_acc']:.1f} ({rows_out[m]['ratio']:.2f})"
                 for m in ["key θ0", "key arch, seed 7", *args.hackers]]
        print(f"| {checkpoints} | {stride * payload['steps_per_epoch']} | " + " | ".join(cells) + " |", flush=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
