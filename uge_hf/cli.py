"""``uge-hf``: one command per step (keygen, protect, evaluate, push, verify).

Runs the same under ``accelerate launch -m uge_hf protect ...`` on many processes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence


def _keygen(args) -> int:
    from .key import AuthorizedModel

    key = AuthorizedModel.create(args.arch, num_classes=args.num_classes, seed=args.seed, in_channels=args.in_channels)
    key.save_pretrained(args.out)
    print(f"wrote key {key.architecture} (fingerprint {key.fingerprint}) to {args.out}; keep it private")
    return 0


def _protect(args) -> int:
    from .config import ProtectConfig, parse_epsilon
    from .key import AuthorizedModel
    from .protect import protect

    overrides = {"epsilon": parse_epsilon(args.epsilon)} if args.epsilon else {}
    for name in ("mode", "steps", "seed", "batch_size", "micro_batches", "fit_sample"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.resize:
        width, _, height = args.resize.partition("x")
        overrides["resize"] = (int(width), int(height or width))
    config = ProtectConfig.preset(args.preset, **overrides)
    dataset = args.dataset
    if args.limit is not None or args.split:
        from datasets import load_dataset

        dataset = load_dataset(args.dataset, split=args.split or "train")
        if args.limit is not None:
            dataset = dataset.select(range(min(args.limit, len(dataset))))
    key = AuthorizedModel.from_pretrained(args.key)
    source = {"dataset": Path(args.dataset).name, "split": args.split, "rows": args.limit}
    out = protect(dataset, key, config, output_dir=args.out, splits=args.splits, image_column=args.image_column,
                  label_column=args.label_column, overwrite=args.overwrite, output_format=args.format,
                  shard_size=args.shard_size, source=source, verbose=not args.quiet)
    print(f"protected {', '.join(f'{s}: {len(d)} rows' for s, d in out.items())} into {args.out}")
    return 0


def _evaluate(args) -> int:
    from datasets import load_dataset

    from .evaluation import evaluate
    from .key import AuthorizedModel
    from .protect import METADATA_NAME, load_output

    metadata = json.loads((Path(args.protected) / METADATA_NAME).read_text())
    split = metadata["protected_splits"][0]
    protected = load_output(Path(args.protected))[split]
    clean = load_dataset(args.clean)
    clean_train = clean[split].select(range(len(protected)))  # protect --limit keeps the first rows
    key = AuthorizedModel.from_pretrained(args.key)
    report = evaluate(protected, clean[args.test_split], key, clean_train=clean_train, hackers=args.hackers.split(","),
                      epochs=args.epochs, attacks=["none"] + (args.attacks.split(",") if args.attacks else []), verbose=not args.quiet)
    print(report.to_markdown())
    print(json.dumps(report.summary(), indent=2))
    results = {"rows": report.to_dicts(), "summary": report.summary(), "epochs": args.epochs}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.update_card:
        from .card import record_efficacy

        record_efficacy(args.protected, results)
        print(f"recorded the table in {Path(args.protected) / 'README.md'}")
    return 0


def _push(args) -> int:
    from .hub import push_to_hub

    url = push_to_hub(args.folder, args.repo_id, private=args.private, revision=args.revision)
    print(f"pushed {args.folder} to {url}")
    return 0


def _verify(args) -> int:
    from .hub import KeyMismatchError, verify

    try:
        report = verify(args.dataset, args.key, revision=args.revision, key_revision=args.key_revision)
    except KeyMismatchError as error:
        print(f"MISMATCH: {error}", file=sys.stderr)
        return 1
    print(f"OK: key {report['key_fingerprint']} matches the card; {report['shards_checked']} shard hashes verified")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .models import DEFAULT_HACKERS, list_models

    parser = argparse.ArgumentParser(prog="uge-hf", description="Ungeneralizable Examples for Hugging Face datasets.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("keygen", help="create an authorized model (the key): architecture + initial weights")
    p.add_argument("--arch", default="convnet", choices=list_models())
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for model.safetensors + config.json")
    p.set_defaults(func=_keygen)

    p = sub.add_parser("protect", help="protect a dataset (folder, Hub id) for a key")
    p.add_argument("dataset", help="a local dataset folder or a Hub dataset id")
    p.add_argument("--key", required=True, help="key folder or Hub model repo")
    p.add_argument("--out", required=True, help="output folder (a Hub dataset repo layout)")
    p.add_argument("--split", help="protect only this split (with --limit: its first rows)")
    p.add_argument("--splits", nargs="+", help="splits to protect (default: all); others are copied")
    p.add_argument("--limit", type=int, help="protect only the first N rows of --split (default train)")
    p.add_argument("--epsilon", help="L-inf budget, e.g. 8/255 (default) or 0.0314")
    p.add_argument("--preset", default="default", choices=["default", "fast", "key-first"])
    p.add_argument("--mode", choices=["per-sample", "generator"])
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--fit-sample", type=int, help="build the shared state on the first N rows of the fit split (default: all)")
    p.add_argument("--micro-batches", type=int, help="split of each state-building step (default 4): the most processes "
                   "that give the same bytes; raise it to launch more")
    p.add_argument("--resize", help="resize every image to WxH before protecting (default: keep native sizes)")
    p.add_argument("--shard-size", type=int, default=5000)
    p.add_argument("--format", default="parquet", choices=["parquet", "arrow"])
    p.add_argument("--image-column")
    p.add_argument("--label-column")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_protect)

    p = sub.add_parser("evaluate", help="train the key and hacker models on clean vs protected data")
    p.add_argument("protected", help="a folder written by `uge-hf protect`")
    p.add_argument("--clean", required=True, help="the clean dataset it came from")
    p.add_argument("--key", required=True)
    p.add_argument("--hackers", default=",".join(DEFAULT_HACKERS))
    p.add_argument("--attacks", default="", help="comma-separated: jpeg,grayscale,bitdepth,adversarial,distill")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--test-split", default="test")
    p.add_argument("--json", help="write rows and summary here")
    p.add_argument("--update-card", action="store_true", help="record the table in the folder's card and uge_hf.json")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("push", help="push a protected folder (shards + card + metadata) to the Hub in one commit")
    p.add_argument("folder")
    p.add_argument("repo_id")
    p.add_argument("--public", dest="private", action="store_false", help="create the dataset repo public (default private)")
    p.add_argument("--revision", help="branch to push to")
    p.set_defaults(func=_push)

    p = sub.add_parser("verify", help="check a key against a protected dataset's card; exit 1 on mismatch")
    p.add_argument("dataset", help="protected folder or Hub dataset id")
    p.add_argument("--key", required=True, help="key folder or Hub model repo")
    p.add_argument("--revision")
    p.add_argument("--key-revision")
    p.set_defaults(func=_verify)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as error:
        print(f"uge-hf {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
