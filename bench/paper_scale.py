"""Paper scale in one command: all 50,000 CIFAR-10 training rows protected for a ResNet-18 key,
then the key from θ0, its architecture from another seed and full-size hackers trained on the
clean and on the protected rows (hackers also after JPEG-10 and grayscale), each measured on
the full test split after every epoch (issue 11, section 1).

    python bench/paper_scale.py                      # one H200: the whole run within --budget-s
    python bench/paper_scale.py --n 200 --epochs 1 --test 500 --preset fast --set steps=1 --budget-s 3600   # CPU check, every row
    python bench/paper_scale.py --n 1000 --epochs 1 --test 500 --preset fast --set steps=1 --budget-s 480   # CPU check, cuts

It must finish inside one 10-minute device command, so it budgets itself. Phases, each timed
and printed: ``load`` (decode the rows), ``calibrate`` (time a few training steps of every
network and one perturbation batch of a small trial protection, on this machine), ``plan``
(the epochs and cuts that fit the budget), ``protect`` (``uge_hf.protect`` on every row),
``train`` (one training at a time, most important first).

Cuts, in order, until at least ``--min-epochs`` fit: grayscale rows, JPEG rows, hackers from the
end; the epochs are then the most that fit, at most ``--epochs``. If the search alone leaves no
room for the smallest panel, its steps are cut in proportion. At run time a training that would
end past the deadline is skipped, and one running late stops after an epoch (keeping its
accuracies so far). Every cut is named in the JSON.

Assumptions behind the defaults (estimates, not measurements: the script measures its own).
An H200 trains a CIFAR ResNet-18 epoch over 50k rows in 3-4 s with bf16 autocast, channels-last
and batch 512 (~15k images/s); VGG-16 ~2 s, MobileNetV2 and DenseNet-40 ~3 s. The per-sample
search on a ResNet-18 key (default preset: 10 signed steps, gradient matching on 5, each a double
backward through ResNet-18 in fp32/TF32) costs ~28 GFLOP per image, ~1.4 PFLOP for 50k rows:
30-120 s. Decoding and PNG-encoding cost ~1-2 ms per image over the run's passes (protect decodes
each image three times). Training recipe: ``uge_hf.training.RECIPES["fast"]`` (SGD + Nesterov,
batch 512, one-cycle, channels-last, bf16 autocast on CUDA), also the recipe of the key's
trajectory inside ``protect`` (``ProtectConfig(recipe=...)``, one micro-batch), so training the
key from θ0 on clean rows retraces it. With 16 trainings that leaves ~6 epochs each in 9 minutes.
"""

from __future__ import annotations

import time

START = time.perf_counter()  # the budget counts imports too

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from efficacy import DATA, balanced_prefix, check_budget, config_override  # noqa: E402  (bench/ is the script's folder)
from uge_hf import AuthorizedModel, ProtectConfig, UGETransform, protect  # noqa: E402
from uge_hf.attacks import get_attack  # noqa: E402
from uge_hf.data import load_tensors  # noqa: E402
from uge_hf.evaluation import Evaluation, Training, model_panel  # noqa: E402
from uge_hf.models import create_model  # noqa: E402
from uge_hf.training import RECIPES, accuracy, train_model  # noqa: E402

PAPER = {"clean": 95.05, "authorized": 93.89, "hackers": 26.12}  # Ye & Wang 2024, CIFAR-10, ResNet-18 key
GOALS = {"authorized_gap_pt": 1.0, "mean_hacker_acc": 20.0, "protect_s": 300.0}


class OutOfTime(Exception):
    """Raised after an epoch when the next one would end past the deadline."""


def elapsed() -> float:
    return time.perf_counter() - START


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device, reset: bool = False) -> dict:
    """Peak GPU memory (GiB) since the last reset, and the process's peak RSS (GiB)."""
    out = {"rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        out["gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
    return out


def time_training(arch: str, x: torch.Tensor, y: torch.Tensor, recipe, test, device: torch.device, steps: int) -> dict:
    """Seconds per training step and per test-set evaluation of ``arch``, on this machine.

    On a GPU a first short run warms up (CUDA context, cuDNN autotuning for these shapes)."""
    cfg = replace(recipe, epochs=1)
    rows = min(len(y), recipe.batch_size * steps)
    if device.type == "cuda":
        train_model(create_model(arch), x[:recipe.batch_size], y[:recipe.batch_size], cfg, verbose=False)
    sync(device)
    tic = time.perf_counter()
    model = train_model(create_model(arch), x[:rows], y[:rows], cfg, verbose=False)
    sync(device)
    step_s = (time.perf_counter() - tic) / math.ceil(rows / recipe.batch_size)
    probe = min(len(test[1]), 2000)
    accuracy(model, test[0][:probe], test[1][:probe])  # warm-up
    tic = time.perf_counter()
    accuracy(model, test[0][:probe], test[1][:probe])
    return {"step_s": step_s, "eval_s": (time.perf_counter() - tic) * len(test[1]) / probe}


def time_perturbation(train_ds, key: AuthorizedModel, config: ProtectConfig, images: torch.Tensor, labels: torch.Tensor,
                      device: torch.device) -> float:
    """Seconds per image of the per-sample search, from a trial protection: the shared state
    fitted on a few rows for one epoch (its cost per image does not depend on how well it is
    trained), then one batch perturbed: a full batch after a warm-up on a GPU; on a CPU 16
    rows, which overestimates (fixed costs of a batch weigh more: 2.7x on 2 cores)."""
    trial = replace(config, trajectory_epochs=1, surrogate_epochs=1)
    transform = UGETransform.fit(train_ds.select(range(min(len(train_ds), 512))), key, trial, verbose=False)
    rows = config.batch_size if device.type == "cuda" else min(config.batch_size, 16)
    batch = [images[i] for i in range(rows)]
    if device.type == "cuda":
        transform.perturb(batch, labels[:rows])
    sync(device)
    tic = time.perf_counter()
    transform.perturb(batch, labels[:rows])
    sync(device)
    return (time.perf_counter() - tic) / rows


def plan_run(args, timings: dict, perturb_s: float, decode_s: float, n: int, config: ProtectConfig, panel: list[str]) -> dict:
    """The most epochs (at most --epochs) and the fewest cuts that fit the budget.

    Predicted seconds = now + protect (surrogates, the trajectory per epoch, the search,
    decoding and encoding; with ``retrain_rounds``, each round's search over the fit rows and
    its key training per epoch) + every training (epochs x (steps + one test evaluation)) + a
    reserve, with a 10 % margin on what scales with the epochs. Rows are cut until at least
    --min-epochs fit; if even the smallest panel does not fit beside the search, the search's
    steps are cut in proportion (at least 1: protect itself cannot stop half-way)."""
    steps = math.ceil(n / RECIPES[args.recipe].batch_size)
    epoch_s = {a: t["step_s"] * steps + t["eval_s"] for a, t in timings.items()}
    # Each retraining round protects the fit rows once more and trains the key on them for as many
    # epochs as its trajectory. Round r searches r + 1 times per row, the final protection (what
    # perturb_s timed) rounds + 1 times: the rounds' searches cost fit_n * rounds / 2 rows of it.
    fit_n = min(n, config.fit_sample or n)
    rounds, fit_steps = config.retrain_rounds, math.ceil(fit_n / RECIPES[args.recipe].batch_size)
    io_s = (n + rounds * fit_n) * 5 * decode_s + args.reserve_s  # protect decodes each row 3 times and encodes it once; reading back once more
    surrogates_s = sum(config.surrogate_epochs * timings[s]["step_s"] * steps for s in config.surrogates)
    jobs = [(m, "none", d) for m in panel for d in ("clean", "protected")]
    hackers = panel[2:]
    levels = [("nothing", jobs + [(h, a, "protected") for a in args.attacks for h in hackers])]
    for k in range(len(args.attacks) - 1, -1, -1):  # attack rows, last attack first
        levels.append((f"{' and '.join(args.attacks[k:])} rows", jobs + [(h, a, "protected") for a in args.attacks[:k] for h in hackers]))
    for k in range(len(hackers) - 1, 0, -1):  # then hackers, from the end
        levels.append((f"attack rows and hackers {', '.join(hackers[k:])}", [j for j in jobs if j[0] in panel[:2] + hackers[:k]]))
    key_epoch_s = timings[args.key_arch]["step_s"] * (steps + rounds * fit_steps)  # the trajectory and each round's training
    per_epoch = lambda todo: 1.1 * (key_epoch_s + sum(epoch_s[arch_of(m, args)] for m, _, _ in todo))
    least = min(args.min_epochs, args.epochs)
    left = args.budget_s - elapsed() - io_s - surrogates_s
    search_steps, search_s = config.steps, (n + fit_n * rounds / 2) * perturb_s
    room = left - least * per_epoch(levels[-1][1])
    if search_s > room:
        search_steps = max(1, int(config.steps * max(0.0, room) / search_s))
        search_s *= search_steps / config.steps
    for cut, todo in levels:
        epochs = min(args.epochs, int((left - search_s) / per_epoch(todo)))
        if epochs >= least:
            break
    epochs = max(1, epochs)
    fixed = io_s + surrogates_s + search_s
    return {"epochs": epochs, "cut": cut, "jobs": todo, "search_steps": search_steps, "fits": epochs >= least,
            "predicted_total_s": elapsed() + fixed + epochs * per_epoch(todo), "predicted_search_s": search_s,
            "predicted_io_s": io_s, "predicted_surrogates_s": surrogates_s, "predicted_per_epoch_s": per_epoch(todo)}


def arch_of(model_name: str, args) -> str:
    return args.key_arch if model_name.startswith("key") else model_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--n", type=int, default=50000, help="training rows (class-balanced prefix)")
    parser.add_argument("--test", type=int, default=10000)
    parser.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget of the whole script, imports included")
    parser.add_argument("--epochs", type=int, default=15, help="most epochs per training")
    parser.add_argument("--min-epochs", type=int, default=5, help="cut rows until at least this many epochs fit")
    parser.add_argument("--key-arch", default="resnet18")
    parser.add_argument("--hackers", type=lambda s: s.split(","), default=["vgg16", "mobilenetv2", "densenet40"])
    parser.add_argument("--attacks", type=lambda s: [a for a in s.split(",") if a], default=["jpeg10", "grayscale"],
                        help="hacker attacks of uge_hf.attacks, trained for every hacker on the protected rows")
    parser.add_argument("--preset", default="default", help="ProtectConfig preset")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", type=config_override,
                        help="override a ProtectConfig field of the preset (a tuple field comma-separated, any other JSON), "
                             "e.g. --set batch_size=500 --set surrogates=vgg-tiny,mixer-tiny,vit-micro")
    parser.add_argument("--recipe", default="fast", choices=sorted(RECIPES))
    parser.add_argument("--calibration-steps", type=int, default=None, help="timed steps per network (default 8 on a GPU, 1 on a CPU)")
    parser.add_argument("--reserve-s", type=float, default=20.0, help="kept back for writing and reading the protected rows")
    parser.add_argument("--json", type=Path, help="default: bench/results/paper_scale_h200.json on CUDA, paper_scale_cpu_check.json on a CPU")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    try:
        refused = [a for a in args.attacks if get_attack(a).authorized or get_attack(a).needs_teacher or get_attack(a).recipe]
    except ValueError as error:
        parser.error(str(error))
    if refused:
        parser.error(f"{refused}: only hacker attacks without a teacher or another recipe fit this script's budget")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotuned convolutions pay off at once
        torch.backends.cuda.matmul.allow_tf32 = True
    results = Path(__file__).resolve().parent / "results"
    args.json = args.json or results / ("paper_scale_h200.json" if device.type == "cuda" else "paper_scale_cpu_check.json")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
               "threads": torch.get_num_threads(), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "paper": PAPER, "goals": GOALS, "phases_s": {}, "memory": {}, "trainings": [], "cuts": []}
    trainings: list[Training] = []

    def save() -> None:
        payload["elapsed_s"] = elapsed()
        args.json.write_text(json.dumps(payload, indent=2) + "\n")

    clock = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        payload["phases_s"][name] = now - clock
        payload["memory"][name] = peak_memory(device, reset=True)
        clock = now
        print(f"[{elapsed():6.1f} s] {name}: {payload['phases_s'][name]:.1f} s, peak {payload['memory'][name]}", flush=True)
        save()

    payload["phases_s"]["imports"] = clock - START

    # -- load ------------------------------------------------------------------------------
    from datasets import load_dataset

    ds = load_dataset(str(args.data))
    rows = balanced_prefix(np.asarray(ds["train"]["label"]), args.n)
    train_ds = ds["train"].select(rows)
    tic = time.perf_counter()
    clean = load_tensors(train_ds, "img", "label", 3, verbose=args.verbose)
    decode_s = (time.perf_counter() - tic) / len(rows)
    test = load_tensors(ds["test"], "img", "label", 3, rows=range(min(args.test, len(ds["test"]))), verbose=False)
    n = len(rows)
    clean_dev = tuple(t.to(device) for t in clean)  # 150 MB at full size: batches are indexed on the GPU
    test_dev = tuple(t.to(device) for t in test)
    payload.update(n=n, test=len(test[1]), decode_ms_per_image=1000 * decode_s)
    phase("load")

    # -- calibrate -------------------------------------------------------------------------
    key = AuthorizedModel.create(args.key_arch, num_classes=10, seed=0)
    overrides = {"recipe": args.recipe, "micro_batches": 1}  # one process: one micro-batch, as the key's own training
    overrides.update(args.set)
    config = ProtectConfig.preset(args.preset, **overrides)
    recipe = RECIPES[args.recipe]
    calib_steps = args.calibration_steps or (8 if device.type == "cuda" else 1)
    timings = {}
    for arch in dict.fromkeys([args.key_arch, *args.hackers, *config.surrogates]):
        timings[arch] = time_training(arch, *clean_dev, recipe, test_dev, device, calib_steps)
        print(f"  {arch}: {1000 * timings[arch]['step_s']:.1f} ms/step, test evaluation {timings[arch]['eval_s']:.2f} s", flush=True)
    perturb_s = time_perturbation(train_ds, key, config, clean[0], clean[1], device)
    print(f"  per-sample search: {1000 * perturb_s:.2f} ms/image ({args.preset} preset, {args.key_arch} key)", flush=True)
    payload["calibration"] = {"training": timings, "perturb_ms_per_image": 1000 * perturb_s, "steps_timed": calib_steps}
    phase("calibrate")

    # -- plan ------------------------------------------------------------------------------
    panel = [name for name, _ in model_panel(key, args.hackers)]
    plan = plan_run(args, timings, perturb_s, decode_s, n, config, panel)
    epochs = plan["epochs"]
    if plan["cut"] != "nothing":
        payload["cuts"].append(f"planned: dropped {plan['cut']}")
    if plan["search_steps"] != config.steps:
        payload["cuts"].append(f"planned: search steps {config.steps} -> {plan['search_steps']}")
    if not plan["fits"]:
        payload["cuts"].append(f"planned: even with every cut only {epochs} epoch(s) fit (< --min-epochs {args.min_epochs})")
    # The trajectory is the key's clean training, of the same length.
    config = replace(config, trajectory_epochs=epochs, steps=plan["search_steps"])
    recipe = replace(recipe, epochs=epochs)
    payload.update(plan={k: v for k, v in plan.items() if k != "jobs"}, epochs=epochs, protect_config=config.to_dict(),
                   recipe=recipe.to_dict(), jobs=[list(job) for job in plan["jobs"]])
    print(f"  plan: {epochs} epochs, {len(plan['jobs'])} trainings, cut: {plan['cut']}; predicted end at "
          f"{plan['predicted_total_s']:.0f} s of {args.budget_s:.0f}", flush=True)
    phase("plan")

    # -- protect ---------------------------------------------------------------------------
    with tempfile.TemporaryDirectory(prefix="paper-scale-") as tmp:
        tic = time.perf_counter()
        out = protect(train_ds, key, config, output_dir=Path(tmp) / "out", verbose=args.verbose)
        protect_s = time.perf_counter() - tic
        build = Path(tmp) / "out.uge-state" / "build.json"
        build_phases = json.loads(build.read_text())["phases_s"] if build.exists() else {}
        protected = load_tensors(out["train"], "img", "label", 3, verbose=False)
    assert torch.equal(protected[1], clean[1]), "labels changed"
    check_budget(protected[0], clean[0], config)
    payload["protect"] = {"seconds": protect_s, "images_per_s": n / protect_s, "build_phases_s": build_phases,
                          "perturb_and_write_s": protect_s - sum(build_phases.values()),
                          "images_per_s_perturb_and_write": n / max(1e-9, protect_s - sum(build_phases.values()))}
    print(f"  protect: {protect_s:.1f} s, {n / protect_s:.1f} images/s; build phases {build_phases}", flush=True)
    phase("protect")

    # -- train ---------------------------------------------------------------------------
    inputs = {}  # (attack, rows) -> training images on the device, each made once
    factories = dict(model_panel(key, args.hackers))
    steps = math.ceil(n / recipe.batch_size)
    deadline = args.budget_s - 5.0
    for name, attack, which in plan["jobs"]:
        arch = arch_of(name, args)
        epoch_s = timings[arch]["step_s"] * steps + timings[arch]["eval_s"]
        if elapsed() + epochs * epoch_s > deadline:
            payload["cuts"].append(f"skipped {name}, {attack}, on {which}: {epochs * epoch_s:.0f} s predicted, {deadline - elapsed():.0f} s left")
            print(f"  {payload['cuts'][-1]}", flush=True)
            continue
        tic = time.perf_counter()
        spec, model = get_attack(attack), factories[name]()
        if (attack, which) not in inputs:
            images = clean[0] if which == "clean" else protected[0]
            inputs[attack, which] = (spec.data(images) if spec.data is not None else images).to(device)
        transform = spec.batch(model, None, key.num_classes) if spec.batch is not None else None
        accuracies, eval_s = [], 0.0

        def on_epoch_end(epoch, m, optimizer):
            nonlocal eval_s
            t = time.perf_counter()
            accuracies.append(accuracy(m, *test_dev))
            eval_s += time.perf_counter() - t
            if epoch + 1 < epochs and elapsed() + epoch_s > deadline:
                raise OutOfTime

        try:
            train_model(model, inputs[attack, which], clean_dev[1], recipe, 0, on_epoch_end=on_epoch_end, batch_transform=transform,
                        desc=f"{name}, {attack}, on {which}", verbose=args.verbose)
        except OutOfTime:
            payload["cuts"].append(f"stopped {name}, {attack}, on {which} after {len(accuracies)} of {epochs} epochs (deadline)")
        trainings.append(Training(name, attack, which, list(range(1, len(accuracies) + 1)), accuracies,
                                  time.perf_counter() - tic - eval_s, eval_s))
        payload["trainings"].append(dict(trainings[-1].to_dict(), images_per_s=n * len(accuracies) / trainings[-1].seconds))
        print(f"  {name}, {attack}, on {which}: best {max(accuracies):.2f}, last {accuracies[-1]:.2f} "
              f"({len(accuracies)} epochs, {trainings[-1].seconds:.0f} s)", flush=True)
        save()
    phase("train")

    report = Evaluation(clean, protected, test, key, hackers=args.hackers, done=trainings).report()
    summary = report.summary()
    payload.update(rows=report.to_dicts(), summary=dict(summary, **headline(summary, trainings, panel, protect_s)))
    save()
    print(f"\nCIFAR-10, {n} train rows, {payload['test']} test images, {epochs} epochs, {payload['device']}; key {args.key_arch}\n")
    print(report.to_markdown())
    s = payload["summary"]
    fmt = lambda v, spec: format(v, spec) if v is not None else "–"
    print(f"\nauthorized gap {fmt(s['authorized_gap_pt'], '.2f')} pt last epoch, {fmt(s['authorized_gap_pt_best'], '.2f')} best "
          f"(paper 1.16, goal ≤ 1); mean hacker acc {fmt(s['mean_hacker_acc'], '.1f')} % last, {fmt(s['mean_hacker_acc_best'], '.1f')} best "
          f"(paper 26.12, goal ≤ 20); protect {protect_s:.0f} s, {n / protect_s:.1f} images/s (goal ≤ 300 s)")
    print("phases: " + ", ".join(f"{k} {v:.0f} s" for k, v in payload["phases_s"].items()))
    for cut in payload["cuts"]:
        print(f"cut: {cut}")
    print(f"\nwrote {args.json} ({elapsed():.0f} s of {args.budget_s:.0f})")


def headline(summary: dict, trainings: list[Training], panel: list[str], protect_s: float) -> dict:
    """What the report's summary (last epoch) lacks: the best-epoch gap and mean hacker
    accuracy, and the issue's goals."""
    best = {(t.model, t.attack, t.data): t.best_acc for t in trainings}
    key = [best.get((panel[0], "none", d)) for d in ("clean", "protected")]
    hackers = [best[h, "none", "protected"] for h in panel[2:] if (h, "none", "protected") in best]
    gap, mean = summary["authorized_gap_pt"], summary["mean_hacker_acc"]
    return {"authorized_gap_pt_best": key[0] - key[1] if None not in key else None,
            "mean_hacker_acc_best": float(np.mean(hackers)) if hackers else None, "protect_s": protect_s,
            "goals_met": {"authorized_gap_pt": gap is not None and gap <= GOALS["authorized_gap_pt"],
                          "mean_hacker_acc": mean is not None and mean <= GOALS["mean_hacker_acc"],
                          "protect_s": protect_s <= GOALS["protect_s"]}}


if __name__ == "__main__":
    main()
