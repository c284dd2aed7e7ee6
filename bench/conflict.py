"""How hard the misalignment pulls against a key's gradient matching, per key architecture.

No training on protected rows: for each key, the shared state is built on the first ``--n``
class-balanced rows (``--epochs`` of trajectory), one batch of ``batch_size`` rows is searched
under each setting, and the two terms the search trades are read off the result:

- ``L_gm``: the key's layer-wise gradient distance between clean and protected images
  (``losses.gradient_matching_loss``), averaged over its trajectory's checkpoints; 0 means the
  key's training steps on the protected batch are the clean ones;
- ``L_fd``: the surrogates' cross-entropy towards the permuted class π(y)
  (``losses.misalignment_loss``); lower is a stronger misalignment.

A setting without matching (``lambda_gm=0``) shows how far the misalignment alone moves the key's
gradients; one without misalignment (``lambda_fd=0``) how low matching alone gets them. Where the
default lands between the two says how much the two terms conflict for that architecture.

    python bench/conflict.py   # five key architectures, about 10 min on 2 cores: bench/results/conflict.json
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
from datasets import load_dataset
from efficacy import DATA, balanced_prefix, config_override

from uge_hf import AuthorizedModel, ProtectConfig
from uge_hf.data import load_tensors
from uge_hf.fitting import build_shared_state
from uge_hf.losses import gradient_matching_loss, misalignment_loss
from uge_hf.objective import Objective, signed_gradient_search
from uge_hf.training import to_float
from uge_hf.utils import seeded_generator

SETTINGS = ["", "lambda_gm=0", "lambda_fd=0", "lambda_gm=3;gm_every=1"]


def setting(text: str) -> dict:
    """``"FIELD=VALUE;FIELD=VALUE"`` (empty: the default) as ProtectConfig overrides."""
    return dict(config_override(part) for part in text.split(";") if part)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=8, help="the key's trajectory")
    parser.add_argument("--keys", type=lambda s: s.split(","), default=["convnet", "resnet-small", "vgg-small", "densenet-small", "vit-tiny"])
    parser.add_argument("--settings", type=lambda s: s.split("|"), default=SETTINGS,
                        help="'|'-separated; each 'FIELD=VALUE;FIELD=VALUE' over the default (empty: the default)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "uge-hf-conflict")
    parser.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "conflict.json")
    args = parser.parse_args()

    train = load_dataset(str(args.data), split="train")
    rows = balanced_prefix(np.array(train["label"]), args.n)
    images, labels = load_tensors(train.select(rows), "img", "label", 3, verbose=False)
    base = ProtectConfig(trajectory_epochs=args.epochs)
    x, y = to_float(images[:base.batch_size], torch.device("cpu")), labels[:base.batch_size]
    results = []
    print(f"CIFAR-10, {args.n} rows, a {args.epochs}-epoch trajectory, one batch of {len(y)}; L_gm averaged over the "
          "key's checkpoints (0: clean training steps), L_fd towards π(y) (lower: stronger misalignment)\n")
    print("| key | setting | L_gm | L_gm, per checkpoint | L_fd | search s |\n| --- | --- | --- | --- | --- | --- |")
    for arch in args.keys:
        key = AuthorizedModel.create(arch, num_classes=10, seed=0)
        state = build_shared_state(images, labels, key, base, cache_dir=args.cache / f"{arch}-{args.n}-{args.epochs}", verbose=False)
        measure = Objective(state)
        net, names, checkpoints = measure.key_nets[0], measure.names[0], measure.trajectories[0]
        for text in args.settings:
            config = replace(base, **setting(text))
            start = time.perf_counter()
            x_u = signed_gradient_search(Objective(replace(state, config=config)), x, y, seeded_generator(0, "conflict"), config.steps)
            seconds = time.perf_counter() - start
            gm = [gradient_matching_loss(net, w, x, x_u, y, names).item() for w in checkpoints]
            with torch.no_grad():
                fd = misalignment_loss(measure.heads, x_u, y, state.num_classes).item()
            results.append({"key": arch, "setting": text or "default", "l_gm": float(np.mean(gm)), "l_gm_checkpoints": gm,
                            "l_fd": fd, "search_s": seconds})
            print(f"| {arch} | {text or 'default'} | {np.mean(gm):.3f} | {min(gm):.3f}-{max(gm):.3f} | {fd:.3f} | {seconds:.0f} |", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"n": args.n, "epochs": args.epochs, "batch": len(y), "config": base.to_dict(),
                                     "torch": torch.__version__, "results": results}, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
