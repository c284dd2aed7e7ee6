"""How the cost of ``protect`` grows on a CPU (issue 11, section 3).

Wall time and peak RSS of ``protect`` (key ``convnet``, seed 0) for each preset, against rows
(CIFAR-10 at its native 32 px) and against image size (``--size-rows`` rows resized to each
of ``--sizes`` px with ``ProtectConfig(resize=...)``), each as a ratio to the smallest point of
its axis. Per-sample cost should grow linearly in rows and in pixels; memory should not grow
with rows.

Against the number of authorized keys (issue 12), ``--keys 1,2,3,4``: ``convnet`` keys of seeds
0 to k-1 on ``--key-rows`` rows, the keys matched in turn and (``--key-modes turns,every``) every
key on each matching step (``match_every_key``). The build grows by one trajectory per key; the
table splits each run into the keys' trajectories and the search (with the write), each as a
ratio to one key.

Each point runs in a fresh subprocess, so its peak RSS is its own. The JSON is rewritten after
every point and read back at start: a rerun with the same ``--json`` skips finished points.

    python bench/cost.py                                                  # the bench, ~60 min on 2 cores
    python bench/cost.py --rows 100,200 --sizes 32,48 --size-rows 100 --presets fast --json /tmp/cost.json   # a check
    python bench/cost.py --presets default --rows "" --sizes "" --keys 1,2,3,4 --json bench/results/cost_keys_cpu.json   # ~30 min

Writes the JSON (``bench/results/cost_cpu.json``), a log-log plot beside it (``.png``) and
prints a table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def run_point(data: Path, preset: str, rows: int, size: int | None, threads: int, num_keys: int = 1, every_key: bool = False) -> dict:
    """One ``protect`` in this process (the child's side): seconds, peak RSS, build phases."""
    import torch
    from datasets import load_dataset

    from uge_hf import AuthorizedModel, ProtectConfig, protect

    torch.set_num_threads(threads)
    train = load_dataset(str(data), split="train").select(range(rows))
    keys = [AuthorizedModel.create("convnet", num_classes=10, seed=seed) for seed in range(num_keys)]
    config = ProtectConfig.preset(preset, **({"resize": (size, size)} if size else {}), **({"match_every_key": True} if every_key else {}))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    with tempfile.TemporaryDirectory(prefix="uge-cost-") as tmp:
        tic = time.perf_counter()
        protect(train, keys, config, output_dir=Path(tmp) / "out", verbose=False)
        seconds = time.perf_counter() - tic
        build = Path(tmp) / "out.uge-state" / "build.json"
        phases = json.loads(build.read_text())["phases_s"] if build.exists() else {}
    return {"seconds": seconds, "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "rss_before_gib": rss_before, "phases_s": phases, "threads": threads}


def points(args) -> list[dict]:
    """Every point of the bench, fast presets first and cheap points first within a preset."""
    out = []
    for preset in args.presets:
        out += [{"preset": preset, "axis": "rows", "rows": r, "size": None} for r in args.rows]
        out += [{"preset": preset, "axis": "size", "rows": args.size_rows, "size": s} for s in args.sizes]
        out += [{"preset": preset, "axis": "keys", "rows": args.key_rows, "size": None, "keys": k, "every_key": mode == "every"}
                for k in args.keys for mode in args.key_modes if k > 1 or mode == "turns"]  # one key has no turns to take
    return out


def point_id(p: dict) -> str:
    keys = f"/{p['keys']}-keys{'-every' if p['every_key'] else ''}" if p["axis"] == "keys" else ""
    return f"{p['preset']}/{p['axis']}/{p['rows']}/{p['size'] or 'native'}{keys}"


def work(p: dict) -> int:
    """What a point's cost should grow with: rows × pixels, or the number of keys."""
    return p["keys"] if p["axis"] == "keys" else p["rows"] * (p["size"] or 32) ** 2


def with_ratios(results: list[dict]) -> list[dict]:
    """Each point's ratios to the smallest finished point of its preset and axis."""
    for r in results:
        peers = [q for q in results if q["preset"] == r["preset"] and q["axis"] == r["axis"] and "seconds" in q]
        if "seconds" not in r or not peers:
            continue
        base = min(peers, key=work)
        r["work_ratio"] = work(r) / work(base)
        r["time_ratio"] = r["seconds"] / base["seconds"]
        r["rss_ratio"] = r["rss_gib"] / base["rss_gib"]
        if r["axis"] == "keys":  # the keys' trajectories, and the rest: the per-sample search and the write
            for part, seconds in (("trajectory", trajectory_s), ("search", search_s)):
                r[f"{part}_s"], r[f"{part}_ratio"] = seconds(r), seconds(r) / seconds(base)
    return results


def trajectory_s(r: dict) -> float:
    return r["phases_s"]["trajectory"]


def search_s(r: dict) -> float:
    return r["seconds"] - sum(r["phases_s"].values())


def print_table(results: list[dict]) -> None:
    by_keys = [r for r in results if r["axis"] == "keys"]
    results = [r for r in results if r["axis"] != "keys"]
    if by_keys:
        print("\n| preset | rows | keys | matching | protect s | keys' trajectories s | search and write s | protect ratio | trajectories ratio | search ratio |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in by_keys:
            mode = "every key" if r["every_key"] else "in turn" if r["keys"] > 1 else "-"
            if "seconds" not in r:
                print(f"| {r['preset']} | {r['rows']} | {r['keys']} | {mode} | failed: {r.get('error', '?')[-80:]} |")
                continue
            print(f"| {r['preset']} | {r['rows']} | {r['keys']} | {mode} | {r['seconds']:.1f} | {r['trajectory_s']:.1f} | {r['search_s']:.1f} "
                  f"| {r['time_ratio']:.2f} | {r['trajectory_ratio']:.2f} | {r['search_ratio']:.2f} |")
    if not results:
        return
    print("\n| preset | axis | rows | px | protect s | ms / row | peak RSS GiB | rows x pixels ratio | time ratio | RSS ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        if "seconds" not in r:
            print(f"| {r['preset']} | {r['axis']} | {r['rows']} | {r['size'] or 32} | failed: {r.get('error', '?')[-80:]} |")
            continue
        print(f"| {r['preset']} | {r['axis']} | {r['rows']} | {r['size'] or 32} | {r['seconds']:.1f} | {1000 * r['seconds'] / r['rows']:.1f} "
              f"| {r['rss_gib']:.2f} | {r['work_ratio']:.0f} | {r['time_ratio']:.2f} | {r['rss_ratio']:.2f} |")


def plot(results: list[dict], path: Path) -> bool:
    """Log-log: protect seconds (top) and peak RSS (bottom) against rows (left) and pixels per
    image (right), one colour per preset; dotted: linear growth from each first point. False
    (nothing drawn) when no point lies on those axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One y scale per row: flat memory against rows reads as flat beside its growth with pixels.
    results = [r for r in results if r["axis"] != "keys"]  # the keys' table says what they cost
    if not results:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharey="row", constrained_layout=True)
    for col, (axis, xlabel) in enumerate((("rows", "rows (32 px)"), ("size", f"pixels per image ({results[-1]['rows']} rows)"))):
        for preset in dict.fromkeys(r["preset"] for r in results):
            done = sorted((r for r in results if r["preset"] == preset and r["axis"] == axis and "seconds" in r),
                          key=lambda r: r["rows"] * (r["size"] or 32) ** 2)
            if not done:
                continue
            x = [r["rows"] if axis == "rows" else (r["size"] or 32) ** 2 for r in done]
            line, = axes[0][col].loglog(x, [r["seconds"] for r in done], "o-", label=preset)
            axes[0][col].loglog(x, [done[0]["seconds"] * v / x[0] for v in x], ":", color=line.get_color(), label=f"{preset}: linear")
            axes[1][col].loglog(x, [r["rss_gib"] for r in done], "s-", color=line.get_color(), label=preset)
        axes[0][col].set_ylabel("protect wall time (s)")
        axes[1][col].set_ylabel("peak RSS (GiB)")
        for ax in axes[:, col]:
            ax.set_xlabel(xlabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("uge-hf protect on a CPU: cost against rows and image size")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(v) for v in s.split(",") if v]
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--presets", type=lambda s: s.split(","), default=["fast", "default"])
    parser.add_argument("--rows", type=ints, default=[1000, 5000, 20000])
    parser.add_argument("--sizes", type=ints, default=[32, 64, 128])
    parser.add_argument("--size-rows", type=int, default=500, help="rows of the image-size axis")
    parser.add_argument("--keys", type=ints, default=[], help="numbers of authorized keys to time (convnet seeds 0 to k-1)")
    parser.add_argument("--key-rows", type=int, default=1000, help="rows of the keys axis")
    parser.add_argument("--key-modes", type=lambda s: s.split(","), default=["turns", "every"],
                        help="turns: the keys matched in turn (the default); every: match_every_key")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each protect")
    parser.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "cost_cpu.json")
    parser.add_argument("--point", help=argparse.SUPPRESS)  # internal: the child's side, 'preset,rows,size,keys,turns|every'
    args = parser.parse_args()
    if unknown := [m for m in args.key_modes if m not in ("turns", "every")]:
        parser.error(f"unknown --key-modes {unknown}; choose from: turns, every")

    if args.point:
        preset, rows, size, keys, every_key = args.point.split(",")
        print(json.dumps(run_point(args.data, preset, int(rows), int(size) or None, args.threads, int(keys), every_key == "every")))
        return

    args.json.parent.mkdir(parents=True, exist_ok=True)
    earlier = json.loads(args.json.read_text())["points"] if args.json.exists() else []
    done = {point_id(r): r for r in earlier if "seconds" in r}
    results = []
    for p in points(args):
        pid = point_id(p)
        if pid in done:
            results.append(done[pid])
            print(f"{pid}: done earlier, {done[pid]['seconds']:.1f} s", flush=True)
            continue
        tic = time.perf_counter()
        spec = f"{p['preset']},{p['rows']},{p['size'] or 0},{p.get('keys', 1)},{'every' if p.get('every_key') else 'turns'}"
        child = subprocess.run([sys.executable, __file__, "--data", str(args.data), "--threads", str(args.threads), "--point", spec],
                               capture_output=True, text=True)
        if child.returncode == 0:
            results.append({**p, **json.loads(child.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - tic})
            print(f"{pid}: {results[-1]['seconds']:.1f} s, peak RSS {results[-1]['rss_gib']:.2f} GiB", flush=True)
        else:
            results.append({**p, "error": child.stderr.strip()[-2000:]})
            print(f"{pid}: FAILED\n{child.stderr.strip()[-2000:]}", flush=True)
        args.json.write_text(json.dumps({"machine": f"{args.threads} threads", "points": with_ratios(results)}, indent=2) + "\n")
    results = with_ratios(results)
    args.json.write_text(json.dumps({"machine": f"{args.threads} threads", "points": results}, indent=2) + "\n")
    print_table(results)
    drawn = plot(results, args.json.with_suffix(".png"))
    print(f"\nwrote {args.json}" + (f" and {args.json.with_suffix('.png')}" if drawn else ""))


if __name__ == "__main__":
    main()
