"""The key/hacker trade-off of every measured variant (issue 9): one point per protection
setting, the key θ0's ratio to its clean accuracy against the mean hacker's, read from the
benchmarks' JSON (no training here).

Two panels, each a single protocol so that its points compare:
- the efficacy protocol (5,000 rows, 15 epochs, one H200 run of parallel ablations:
  ``results/ablation_h200.json``, ``results/ablation_gm_h200.json``), hackers vgg-small,
  densenet-small and mixer-small, the three every variant there was trained on; beside them,
  marked apart, the CPU runs of that protocol on the same three hackers (``CPU_EFFICACY``);
- the 2,000-row robustness screens (``results/robustness_screen_*.json``), hackers vgg-small,
  densenet-small and vit-tiny, last epoch; the worst of those after JPEG-10 where it was run.

    python bench/frontier.py    # prints the table, writes results/frontier.{json,png}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ABLATION_HACKERS = ("vgg-small", "densenet-small", "mixer-small")
SCREEN_HACKERS = ("vgg-small", "densenet-small", "vit-tiny")
# CPU runs of the efficacy protocol: (file, the one-key variants read from it).
CPU_EFFICACY = (("efficacy_cpu_two_keys_n5000.json", ("default",)), ("efficacy_cpu_retrain1_n5000.json", ("retrain1",)),
                ("efficacy_cpu_retrain2_n5000.json", ("retrain2",)), ("efficacy_cpu_retrain3_n5000.json", ("retrain3",)),
                ("efficacy_cpu_retrain1_momentum_n5000.json", ("retrain1-momentum",)))
GOAL_KEY, GOAL_MEAN = 0.95, 0.40  # issue 9: the key keeps >= 0.95, the mean hacker <= 0.40


def ablation_points(path: Path, only: tuple[str, ...] | None = None) -> list[dict]:
    """One point per variant of an efficacy run (``only`` those named) trained on every ablation hacker."""
    points = []
    for variant in json.loads(path.read_text())["variants"]:
        hackers = variant["summary"]["hacker_ratios"]
        if all(h in hackers for h in ABLATION_HACKERS) and (only is None or variant["variant"] in only):
            points.append({"variant": variant["variant"], "source": path.name, "key": variant["summary"]["key_ratio"],
                           "mean_hacker": sum(hackers[h] for h in ABLATION_HACKERS) / len(ABLATION_HACKERS)})
    return points


def screen_point(path: Path) -> dict | None:
    runs = json.loads(path.read_text())["trainings"]
    last = {(r["model"], r["attack"], r["data"]): r["last_acc"] for r in runs}

    def ratio(model: str, attack: str = "none") -> float | None:
        clean, protected = last.get((model, "none", "clean")), last.get((model, attack, "protected"))
        return None if clean is None or protected is None else protected / clean

    hackers = [ratio(h) for h in SCREEN_HACKERS]
    if ratio("key θ0") is None or None in hackers:
        return None  # screened before the panel had all three hackers
    jpeg = [ratio(h, "jpeg10") for h in SCREEN_HACKERS]
    return {"variant": path.stem.removeprefix("robustness_screen_"), "source": path.name, "key": ratio("key θ0"),
            "mean_hacker": sum(hackers) / len(hackers), "worst_jpeg10": max(jpeg) if None not in jpeg else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS / "frontier")
    args = parser.parse_args()
    ablations = ablation_points(RESULTS / "ablation_h200.json") + ablation_points(RESULTS / "ablation_gm_h200.json")
    cpu = [p for name, only in CPU_EFFICACY if (RESULTS / name).exists() for p in ablation_points(RESULTS / name, only)]
    screens = [p for p in map(screen_point, sorted(RESULTS.glob("robustness_screen_*.json"))) if p is not None]

    for title, points in (("efficacy protocol, 5,000 rows (H200 ablations)", ablations), ("efficacy protocol, 5,000 rows, CPU runs", cpu),
                          ("robustness screens, 2,000 rows", screens)):
        print(f"\n{title}\n| variant | key θ0 | mean hacker | worst hacker after JPEG-10 |\n| --- | --- | --- | --- |")
        for p in sorted(points, key=lambda p: p["key"]):
            worst = p.get("worst_jpeg10")
            print(f"| {p['variant']} | {p['key']:.2f} | {p['mean_hacker']:.2f} | {'–' if worst is None else f'{worst:.2f}'} |")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, points, extra, title in ((axes[0], ablations, cpu, "5,000 rows, H200 ablations (blue), CPU runs (orange)\nhackers: "
                                      + ", ".join(ABLATION_HACKERS)),
                                     (axes[1], screens, [], "2,000-row robustness screens\nhackers: " + ", ".join(SCREEN_HACKERS))):
        ax.fill_between([GOAL_KEY, 1.02], 0, GOAL_MEAN, color="tab:green", alpha=0.15, label="issue 9's goal")
        ax.scatter([p["key"] for p in points], [p["mean_hacker"] for p in points], color="tab:blue", zorder=3)
        ax.scatter([p["key"] for p in extra], [p["mean_hacker"] for p in extra], color="tab:orange", zorder=3)
        for p in points + extra:
            ax.annotate(p["variant"], (p["key"], p["mean_hacker"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_title(title, fontsize=10)
        ax.set( xlabel="key θ0: protected / clean accuracy", xlim=(0.5, 1.02), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean hacker: protected / clean accuracy")
    axes[0].legend(loc="upper left")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    args.out.with_suffix(".json").write_text(json.dumps({"ablations": ablations, "cpu_efficacy": cpu, "screens": screens}, indent=1))
    print(f"\nwrote {args.out.with_suffix('.png')} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
