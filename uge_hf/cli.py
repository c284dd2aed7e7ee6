"""``uge-hf``: one command per step (keygen, protect, evaluate, push, verify).

Runs the same under ``accelerate launch -m uge_hf protect ...`` on many processes.

Exit codes mean one thing each: 0 done; 1 the key does not match the dataset (verify,
evaluate); 2 bad input or usage (the message says what to change); 3 the data failed its
integrity check (a file modified or not listed); 4 another uge-hf run holds the folder;
130 interrupted (rerun the same command to resume). Expected failures print one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence


EXIT_MISMATCH, EXIT_USAGE, EXIT_TAMPERED, EXIT_BUSY, EXIT_INTERRUPTED = 1, 2, 3, 4, 130


def _keygen(args) -> int:
    from .key import AuthorizedModel

    if args.seed is not None:
        print(f"warning: --seed {args.seed} makes the key insecure: anyone who guesses the seed rebuilds it; use it for tests only",
              file=sys.stderr)
    key = AuthorizedModel.create(args.arch, num_classes=args.num_classes, seed=args.seed, in_channels=args.in_channels)
    key.save_pretrained(args.out)
    print(f"wrote key {key.architecture} (fingerprint {key.fingerprint}) to {args.out} (owner-only); keep it private")
    return 0


# uge_hf.models.DEFAULT_HACKERS, spelled out so that --help need not import torch (a test keeps them equal).
HACKERS_HELP = "resnet-small,vgg-small,mobilenet-small,densenet-small,mixer-small"
# uge_hf.config.PRESETS' names, likewise.
PRESET_NAMES = ["default", "key-first", "fast", "large"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default only where there is one to show (not None, empty or off)."""

    def _get_help_string(self, action):
        if action.default in (None, "", False) or action.required or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_resize(value: str) -> tuple[int, int]:
    """``"64"`` or ``"64x48"`` (width x height, pixels)."""
    width, _, height = value.lower().partition("x")
    try:
        return int(width), int(height or width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a size; write WxH in pixels, e.g. 64x48, or one number for a square") from None


def _protect(args) -> int:
    from .config import ProtectConfig, parse_epsilon
    from .key import AuthorizedModel
    from .protection import protect

    overrides = {"epsilon": parse_epsilon(args.epsilon)} if args.epsilon is not None else {}  # "" is judged, not ignored
    for name in ("mode", "steps", "seed", "batch_size", "micro_batches", "fit_sample", "retrain_rounds"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.resize:
        overrides["resize"] = args.resize
    if args.match_every_key:
        overrides["match_every_key"] = True
    config = ProtectConfig.preset(args.preset, **overrides)
    keys = [AuthorizedModel.from_pretrained(k) for k in args.key]  # before the data: a wrong key path fails in a second
    dataset = args.dataset
    if args.limit is not None or args.split:
        from datasets import load_dataset

        dataset = load_dataset(args.dataset, split=args.split or "train")
        if args.limit is not None:
            dataset = dataset.select(range(min(args.limit, len(dataset))))
    source = {"dataset": Path(args.dataset).name, "split": args.split,
              "rows": len(dataset) if args.limit is not None else None, "license": args.license}
    out = protect(dataset, keys, config, output_dir=args.out, splits=args.splits, image_column=args.image_column,
                  label_column=args.label_column, overwrite=args.overwrite, output_format=args.format,
                  shard_size=args.shard_size, source=source, disclose_key_architecture=args.disclose_key_architecture,
                  card_template=args.card_template,
                  verbose=not args.quiet)
    print(f"protected {', '.join(f'{s}: {len(d)} rows' for s, d in out.items())} into {args.out}")
    return 0


def _evaluate(args) -> int:
    import importlib.util

    from datasets import load_dataset

    from .attacks import get_attack
    from .evaluation import evaluate
    from .folder import check_card, load_output, read_metadata, record_figure
    from .hub import verify
    from .key import AuthorizedModel
    from .models import DEFAULT_HACKERS

    for key_path in args.key:
        verify(args.protected, key_path)  # a "key θ0" row means nothing with another key, nor on modified data
    keys = [AuthorizedModel.from_pretrained(k) for k in args.key]
    if args.figure and importlib.util.find_spec("matplotlib") is None:  # say so before hours of training
        raise ValueError("--figure needs matplotlib: pip install 'uge-hf[plot]'")
    for flag, path in (("--json", args.json), ("--figure", args.figure)):  # checked before training, so no run is lost
        folder = Path(path).resolve().parent if path else None
        if folder and not folder.is_dir():
            raise FileNotFoundError(f"{flag} {path}: folder {folder} does not exist; create it, or pick a path in "
                                    "an existing folder (checked before training, so no run is lost)")
        if path and (Path(path).exists() or Path(path).is_symlink()):  # it may be a key, a shard, the card, or yours
            raise FileExistsError(f"{flag} {path} exists, and uge-hf never overwrites a file it cannot tell it wrote: "
                                  "pass a new path, or move that one away")
        if path and Path(args.protected).is_dir() and Path(args.protected).resolve() in Path(path).resolve().parents:
            raise ValueError(f"{flag} {path} lies inside the protected folder, which is what gets published, and it holds what "
                             "the card withholds (the keys' accuracies, training times): write it elsewhere")
    if args.json and args.figure and Path(args.json).resolve() == Path(args.figure).resolve():
        raise ValueError(f"--json and --figure both name {args.json}: the figure would replace the table; give each its own path")
    if args.update_card:
        check_card(Path(args.protected))  # an edited card is refused before training, not after
    figure = record_figure(Path(args.protected)) if args.update_card else None  # a figure not uge-hf's is refused before training
    attacks = ["none"] + names(args.attacks)
    for name in attacks:  # a misspelt attack fails now, before any warning or training
        get_attack(name)
    metadata = read_metadata(args.protected)
    trajectory_epochs = metadata["config"].get("trajectory_epochs")
    if trajectory_epochs and trajectory_epochs != args.epochs:
        print(f"warning: the key's trajectory was {trajectory_epochs} epochs long and --epochs is {args.epochs}: the protection "
              f"was fitted to a key training of {trajectory_epochs} epochs; pass --epochs {trajectory_epochs} to measure what the "
              "authorized user gets", file=sys.stderr)
    split = metadata["protected_splits"][0]
    protected = load_output(Path(args.protected))[split]
    clean = load_dataset(args.clean)
    for name in (split, args.test_split):
        if name not in clean:
            raise ValueError(f"{args.clean} has no split {name!r}; its splits are: {', '.join(clean)}"
                             + ("; pass --test-split <one of them>" if name == args.test_split else ""))
    rows = range(min(len(protected), args.limit or len(protected)))
    protected, clean_train = protected.select(rows), clean[split].select(rows)  # protect --limit keeps the first rows
    check_correspondence(clean_train, protected, metadata, keys[0].in_channels)
    test = clean[args.test_split]
    test = test.select(range(min(len(test), args.test_size))) if args.test_size else test
    report = evaluate(protected, test, keys, clean_train=clean_train, hackers=names(args.hackers) or DEFAULT_HACKERS,
                      epochs=args.epochs, attacks=attacks, attack_clean=args.attack_clean,
                      attacked_models=names(args.attacked_models) or None,
                      eval_every=args.eval_every, verbose=not args.quiet)
    print(report.to_markdown())
    print(json.dumps(report.summary(), indent=2))
    results = {"rows": report.to_dicts(), "summary": report.summary(), "epochs": args.epochs, "eval_every": args.eval_every,
               "train_rows": len(rows), "test_rows": len(test)}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.figure:
        print(f"wrote the figure to {report.plot(args.figure)}")
    if args.update_card:
        from .card import record_efficacy

        try:  # the figure sits next to the table in the card when matplotlib is installed
            report.plot(figure)
            results["figure"] = figure.name
        except ImportError as error:
            print(f"the card gets the table only: {error}", file=sys.stderr)
        record_efficacy(args.protected, results)
        print(f"recorded the table in {Path(args.protected) / 'README.md'}")
    return 0


def check_correspondence(clean, protected, metadata: dict, channels: int, rows: int = 8) -> None:
    """The evaluation compares each protected row with the clean row it came from; refuse clean
    rows that are not those (each protected pixel lies within ε of its clean pixel)."""
    from .config import ProtectConfig
    from .data import load_tensors

    n = min(rows, len(protected))
    config = ProtectConfig.from_dict(metadata["config"])
    size = config.resize
    x, _ = load_tensors(clean, metadata["image_column"], metadata["label_column"], channels, rows=range(n), size=size, verbose=False)
    x_u, _ = load_tensors(protected, metadata["image_column"], metadata["label_column"], channels, rows=range(n), size=size, verbose=False)
    if x.shape != x_u.shape or (x.int() - x_u.int()).abs().max() > config.epsilon_levels:
        raise ValueError(f"the clean rows do not match the protected ones (first {n} rows differ by more than ε): evaluate compares "
                         "each protected row with the same row of --clean's split, so pass the dataset that was protected, "
                         "unshuffled, and protect a prefix of it (protect --limit does)")


def _push(args) -> int:
    from .hub import push_to_hub

    url = push_to_hub(args.folder, args.repo_id, private=not args.public, revision=args.revision)
    print(f"pushed {args.folder} to {url}")
    return 0


def _verify(args) -> int:
    from .hub import verify

    report = verify(args.dataset, args.key, revision=args.revision, key_revision=args.key_revision)
    which = f" (key {report['key_index'] + 1} of {report['num_keys']})" if report["num_keys"] > 1 else ""
    print(f"OK: key {report['key_fingerprint']} matches the card{which}; {report['shards_checked']} data files verified, none unlisted")
    return 0


def names(text: Optional[str]) -> list[str]:
    """A comma-separated list of names (``"vgg-small, mobilenet-small"``), blanks dropped."""
    return [name.strip() for name in (text or "").split(",") if name.strip()]


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="uge-hf", description="Ungeneralizable Examples for Hugging Face datasets: protect an image "
                                     "dataset so that only the authorized model (the key) learns from it.",
                                     epilog="Exit codes: 0 done, 1 key mismatch, 2 bad input, 3 data integrity, 4 folder busy, 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"uge-hf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = {"formatter_class": HelpFormatter}

    p = sub.add_parser("keygen", help="create an authorized model (the key): architecture + initial weights", **defaults)
    p.add_argument("--arch", default="convnet", help="architecture of the key (a name of uge_hf.models.list_models())")
    p.add_argument("--num-classes", type=int, default=10, help="classes of the dataset to protect (at least 2)")
    p.add_argument("--in-channels", type=int, default=3, help="3 for RGB data, 1 for grayscale data")
    p.add_argument("--seed", type=int, default=None, help="INSECURE, for tests: initialize from this seed instead of the OS's random source")
    p.add_argument("--out", required=True, help="new folder for model.safetensors + config.json (written owner-only; never overwritten)")
    p.set_defaults(func=_keygen)

    p = sub.add_parser("protect", help="protect a dataset (folder, Hub id) for a key", **defaults)
    p.add_argument("dataset", help="a local dataset folder or a Hub dataset id")
    p.add_argument("--key", required=True, action="append", help="key folder (from `uge-hf keygen`) or Hub model repo; repeat "
                   "it to authorize several partners, each with a key of its own")
    p.add_argument("--out", required=True, help="new or empty output folder (a Hub dataset repo layout); its private state goes "
                   "beside it, in OUT.uge-state")
    p.add_argument("--split", help="load only this split, and protect it (with --limit: its first rows)")
    p.add_argument("--splits", nargs="+", help="of a dataset with several splits, protect these (default: all); the others are "
                   "copied unprotected")
    p.add_argument("--limit", type=positive_int, help="protect only the first N rows of --split (default split: train)")
    p.add_argument("--epsilon", help="L-inf budget on the 0-1 pixel scale, e.g. 8/255 or 0.0314 (default of the preset: 8/255)")
    p.add_argument("--preset", default="default", choices=PRESET_NAMES,
                   help="default: the benchmarked setting; fast: a quick, weaker setting for tries (4 steps, one surrogate, a 2-epoch key "
                   "trajectory, so the key trains 2 epochs); key-first: favors the key; large: for 10,000 rows and more, where the "
                   "default's key falls (3x the matching weight, on every step)")
    p.add_argument("--mode", choices=["per-sample", "generator"], help="override the preset's perturbation mode")
    p.add_argument("--steps", type=int, help="override the preset's search steps per batch")
    p.add_argument("--seed", type=int, help="override the protection's seed (not the key's)")
    p.add_argument("--match-every-key", action="store_true", help="with several keys, match every key's trajectory on each "
                   "matching step rather than one in turn, their terms summed over the square root of their number: advised for keys of "
                   "different architectures (each then keeps about what it keeps alone, and the hackers what the leakiest key's own "
                   "release leaves them); the search costs more (measured: 1.7x with 2 keys, 2.3x with 3 under the default preset; "
                   "2.0x with 2 under large). The public "
                   "card leaves this setting out (it would hint that the keys differ in architecture) unless --disclose-key-architecture")
    p.add_argument("--retrain-rounds", type=int, help="rounds of retraining (default 0): train the key on the protected rows "
                   "and search each batch again along that training; each round adds a key training and a search per batch")
    p.add_argument("--batch-size", type=int, help="rows perturbed together (memory grows with it)")
    p.add_argument("--fit-sample", type=int, help="build the shared state on the first N rows of the fit split (default: all)")
    p.add_argument("--micro-batches", type=int, help="split of each state-building step (default 4): the most processes "
                   "that give the same bytes; raise it to launch more")
    p.add_argument("--resize", type=parse_resize, help="resize every image to WxH pixels, e.g. 64x48 (default: native sizes)")
    p.add_argument("--shard-size", type=int, default=5000, help="rows per output shard, rounded down to whole --batch-size batches (at least one)")
    p.add_argument("--format", default="parquet", choices=["parquet", "arrow"], help="parquet (load_dataset(OUT)) or arrow: "
                   "save_to_disk's layout in OUT/arrow (load_from_disk('OUT/arrow')); load_protected reads either")
    p.add_argument("--image-column", help="the Image column (default: found by type)")
    p.add_argument("--label-column", help="the label column (default: the ClassLabel column)")
    p.add_argument("--license", help="the source dataset's license id (a Hub license id: mit, cc-by-4.0, ...), recorded in the card; without it the card records none")
    p.add_argument("--card-template", help="your own Jinja template for the card (default: uge-hf's card_templates/dataset_card.md; "
                   "uge_hf.card.render_card lists what it receives)")
    p.add_argument("--disclose-key-architecture", action="store_true", help="record each key's architecture, and "
                   "--match-every-key, in the public card (narrows a hacker's search: off by default)")
    p.add_argument("--overwrite", action="store_true", help="replace another uge-hf run in --out (only files uge-hf wrote are deleted)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_protect)

    p = sub.add_parser("evaluate", help="train the key and hacker models on clean vs protected data", **defaults)
    p.add_argument("protected", help="a folder written by `uge-hf protect`")
    p.add_argument("--clean", required=True, help="the clean dataset it came from (its first rows are the ones protected)")
    p.add_argument("--key", required=True, action="append", help="key folder or Hub model repo; repeat it for a dataset "
                   "protected for several keys (each gets a row)")
    p.add_argument("--limit", type=positive_int, help="train on the first N protected rows only (and their clean rows): a quick look")
    p.add_argument("--test-size", type=positive_int, help="test on the first N rows of the test split only (default: all)")
    p.add_argument("--hackers", help=f"comma-separated architectures trained as hackers (default: {HACKERS_HELP})")
    p.add_argument("--attacks", default="", help="comma-separated names of uge_hf.attacks.list_attacks(): the field's defenses "
                   "(jpeg10, jpeg30, jpeg50, grayscale, grayscale+jpeg10, bitdepth2, bitdepth4, gaussian, median, cutout, cutmix, "
                   "mixup, ueraser, ueraser-max, adversarial = PGD-10 or adversarial-<steps>, distill) run on the hackers, and the key's other "
                   "recipes (recipe-adam, recipe-2x-epochs, recipe-batch-256)")
    p.add_argument("--attacked-models", help="comma-separated hackers the defenses of --attacks run on (default: every hacker; "
                   "each costs one training per defense)")
    p.add_argument("--attack-clean", action="store_true", help="also train each attacked model with the attack on the clean rows "
                   "(what the defense costs by itself)")
    p.add_argument("--epochs", type=positive_int, default=15, help="epochs per training")
    p.add_argument("--eval-every", type=positive_int, default=1, help="test after every k-th epoch and the last (best-epoch accuracy among those)")
    p.add_argument("--figure", help="draw the table as a PNG heatmap here (needs matplotlib: pip install 'uge-hf[plot]')")
    p.add_argument("--test-split", default="test", help="the clean split accuracy is measured on")
    p.add_argument("--json", help="write rows and summary here")
    p.add_argument("--update-card", action="store_true", help="record the table in the folder's card and uge_hf.json, "
                   "with the figure as efficacy.png beside it")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("push", help="push a protected folder (shards + card + metadata) to the Hub in one commit", **defaults)
    p.add_argument("folder", help="a folder written by `uge-hf protect`")
    p.add_argument("repo_id", help="the dataset repo, e.g. you/cifar10-uge")
    p.add_argument("--public", action="store_true", help="publish: create the repo public, or push into a public one "
                   "(default: private, and an existing public repo is refused)")
    p.add_argument("--revision", help="branch to push to")
    p.set_defaults(func=_push)

    p = sub.add_parser("verify", help="check a key against a protected dataset's card and every data file; exit 1 on a key mismatch, "
                       "3 on modified or unlisted data", **defaults)
    p.add_argument("dataset", help="protected folder or Hub dataset id")
    p.add_argument("--key", required=True, help="key folder or Hub model repo")
    p.add_argument("--revision", help="revision of the dataset repo")
    p.add_argument("--key-revision", help="revision of the key's repo")
    p.set_defaults(func=_verify)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; returns its exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        import os

        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"  # datasets' own bars (map, load) too
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    from .folder import RunInProgressError
    from .hub import KeyMismatchError, TamperedShardError

    from huggingface_hub.errors import HfHubHTTPError

    failures = ((KeyMismatchError, EXIT_MISMATCH, "key mismatch"), (TamperedShardError, EXIT_TAMPERED, "data integrity"),
                (RunInProgressError, EXIT_BUSY, "busy"), (HfHubHTTPError, EXIT_USAGE, "Hub error"),
                ((ValueError, FileNotFoundError, FileExistsError, PermissionError, KeyError), EXIT_USAGE, "error"))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        # Only protect keeps its progress (shards, the state's epochs); the other commands start over.
        again = "rerun the same command to resume where it stopped" if args.command == "protect" else "rerun it to start again"
        print(f"\nuge-hf {args.command}: interrupted; {again}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        for kinds, code, label in failures:
            if isinstance(error, kinds):
                message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                if isinstance(error, HfHubHTTPError) and error.response is not None and error.response.status_code in (401, 403):
                    message += " (log in with `hf auth login`, or set HF_TOKEN to a token that may write there)"
                print(f"uge-hf {args.command}: {label}: {message}", file=sys.stderr)
                return code
        raise


if __name__ == "__main__":
    sys.exit(main())
