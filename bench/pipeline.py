"""Pipeline benchmark on CIFAR-10 (the sharded-protect issue's figures), ratios from one run.

1. Throughput against its floor, per mode: protecting shards (decode, perturb, PNG-encode,
   write parquet) vs (a) an identity ``map`` that decodes and PNG-encodes the same images into
   parquet plus (b) the perturbation alone on the same images as ready tensors.
2. Memory: peak RSS of ``protect`` on all 50,000 training images vs on 5,000 (generator
   mode, same fit sample), each in a fresh process.
3. Scaling: 2 processes of 1 thread vs 1 process of 2 threads, for building the shared
   state (data-parallel) and for applying (shards dealt to processes), in both modes.

    python bench/pipeline.py            # prints a table, writes bench/results/pipeline.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def throughput(args, mode: str, work: Path) -> dict:
    """Shards vs identity map + perturbation alone, on the same ``args.n`` images."""
    from datasets import load_dataset

    from uge_hf import AuthorizedModel, ProtectConfig, UGETransform
    from uge_hf.data import load_tensors
    from uge_hf.protection import protect_shard, shard_plan
    from uge_hf.transform import encode_png, to_pixels

    train = load_dataset(str(args.data), split="train").select(range(args.n))
    key = AuthorizedModel.create("convnet", 10, seed=0)
    config = ProtectConfig.preset("fast", mode=mode, fit_sample=1000)
    transform = UGETransform.fit(train, key, config, cache_dir=work / f"state-{mode}", verbose=False)

    # (a) identity: decode and PNG-encode into parquet, through datasets.map.
    tic = time.perf_counter()
    identity = train.map(lambda b: {"img": [{"bytes": encode_png(to_pixels(im, 3)), "path": None} for im in b["img"]]},
                         batched=True, batch_size=config.batch_size, load_from_cache_file=False)
    identity.to_parquet(str(work / f"identity-{mode}.parquet"))
    identity_s = time.perf_counter() - tic

    # (b) the perturbation alone, images already tensors.
    images, labels = load_tensors(train, "img", "label", 3, verbose=False)
    tic = time.perf_counter()
    for start in range(0, args.n, config.batch_size):
        transform.perturb(list(images[start:start + config.batch_size]), labels[start:start + config.batch_size])
    perturb_s = time.perf_counter() - tic

    # Protecting the shards, as protect() does.
    tic = time.perf_counter()
    for i, rows in enumerate(shard_plan(args.n, config.batch_size, args.n // 4)):
        protect_shard(transform, train, rows, work / f"shards-{mode}" / f"train-{i:05d}.parquet", verbose=False)
    shards_s = time.perf_counter() - tic
    return {"mode": mode, "images": args.n, "identity_map_s": identity_s, "perturbation_s": perturb_s, "shards_s": shards_s,
            "ratio_to_floor": shards_s / (identity_s + perturb_s)}


def peak_rss(args, rows: int, work: Path) -> dict:
    """``protect`` in a fresh process; its peak RSS in MB from getrusage."""
    script = f"""
import resource, time, torch
from datasets import load_dataset
from uge_hf import AuthorizedModel, ProtectConfig, protect
train = load_dataset({str(args.data)!r}, split="train").select(range({rows}))
key = AuthorizedModel.create("convnet", 10, seed=0)
tic = time.perf_counter()
protect(train, key, ProtectConfig.preset("fast", mode="generator", fit_sample=1000), output_dir={str(work / f"rss-{rows}")!r},
        shard_size=2500, verbose=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter() - tic)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    return {"rows": rows, "peak_rss_mb": float(out[-2]), "seconds": float(out[-1])}


LAUNCHES = {  # name: (launcher, OMP threads per process)
    "1 process x 2 threads": ([sys.executable], "2"),
    "2 processes x 1 thread": ([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"], "1"),
    "1 process x 1 thread": ([sys.executable], "1"),  # the reference for how well processes scale
}


def timed_protect(launch: str, cli: list[str], out: Path) -> dict:
    """Run ``uge-hf protect`` under ``launch``; the shared-state build's seconds (if this run
    built it) and the shard phase's wall time (first shard started to last finished)."""
    launcher, threads = LAUNCHES[launch]
    subprocess.run([*launcher, "-m", "uge_hf", *cli, "--out", str(out)], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": threads})
    state = out.with_name(out.name + ".uge-state")
    records = [json.loads(p.read_text()) for p in (state / "progress").iterdir()]
    build = json.loads((state / "build.json").read_text())
    return {"build_s": sum(build["phases_s"].values()), "build_processes": build["processes"],
            "shards_s": max(r["finished"] for r in records) - min(r["started"] for r in records)}


def machine_ceiling() -> dict:
    """What 2 processes can gain over 1 on this machine at best: the same CPU-bound,
    independent job (zlib and a Python loop) run once alone, then twice at once."""
    job = "import os, zlib\ndata = os.urandom(1 << 16) * 8\nfor _ in range(400): zlib.compress(data, 6)\nfor i in range(8_000_000): pass"

    def wall(copies: int) -> float:
        tic = time.perf_counter()
        for proc in [subprocess.Popen([sys.executable, "-c", job]) for _ in range(copies)]:
            proc.wait()
        return time.perf_counter() - tic

    one, two = wall(1), wall(2)
    return {"one_job_s": one, "two_jobs_at_once_s": two, "throughput_ratio": 2 * one / two}


def scaling(args, work: Path) -> list[dict]:
    """Both ways to use the 2 cores (and one core, for reference), per phase: the shared-state
    build and the generator's apply from fresh runs (default preset), the per-sample apply
    from a shared copy of one state (so only its shards are timed)."""
    from uge_hf import AuthorizedModel

    key_dir = work / "key"
    AuthorizedModel.create("convnet", 10, seed=0).save_pretrained(key_dir)
    common = ["protect", str(args.data), "--split", "train", "--key", str(key_dir), "--quiet"]
    generator = [*common, "--mode", "generator", "--limit", str(args.generator_n), "--fit-sample", str(args.fit_n), "--shard-size", "1000"]
    per_sample = [*common, "--limit", str(args.scaling_n), "--preset", "fast", "--steps", "10", "--shard-size", "250"]
    subprocess.run([sys.executable, "-m", "uge_hf", *per_sample, "--out", str(work / "scale-base")], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "2"})
    runs = {}
    for launch in LAUNCHES:
        tag = launch.replace(" ", "")
        runs[launch, "generator"] = timed_protect(launch, generator, work / f"scale-gen-{tag}")
        out = work / f"scale-ps-{tag}"
        shutil.copytree(work / "scale-base.uge-state", out.with_name(out.name + ".uge-state"))
        shutil.rmtree(out.with_name(out.name + ".uge-state") / "progress")
        runs[launch, "per-sample"] = timed_protect(launch, per_sample, out)
    threads, processes, single = LAUNCHES
    rows = [(f"build the shared state ({args.fit_n} rows, generator mode, default preset)", "generator", "build_s"),
            (f"apply, generator ({args.generator_n} images)", "generator", "shards_s"),
            (f"apply, per-sample, 10 steps ({args.scaling_n} images)", "per-sample", "shards_s")]
    return [{"phase": phase, **{launch: runs[launch, mode][field] for launch in LAUNCHES},
             "speedup": runs[threads, mode][field] / runs[processes, mode][field],
             "process_scaling": runs[single, mode][field] / runs[processes, mode][field]} for phase, mode, field in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--n", type=int, default=1000, help="images for the throughput figures")
    parser.add_argument("--scaling-n", type=int, default=2000, help="images for the per-sample scaling figure")
    parser.add_argument("--generator-n", type=int, default=50000, help="images for the generator scaling figure")
    parser.add_argument("--fit-n", type=int, default=2000, help="rows the timed shared-state builds fit on")
    parser.add_argument("--small", type=int, default=5000)
    parser.add_argument("--large", type=int, default=50000)
    parser.add_argument("--json", type=Path, default=Path("bench/results/pipeline.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    datasets.disable_progress_bars()  # the log keeps the tables
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ceiling = machine_ceiling()
        scale = scaling(args, work)  # first, while no other work has warmed or fragmented anything
        rows = [throughput(args, mode, work) for mode in ("per-sample", "generator")]
        memory = [peak_rss(args, n, work) for n in (args.small, args.large)]
    print("\n| mode | images | identity map (s) | perturbation alone (s) | protect shards (s) | shards / (identity + perturbation) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['mode']} | {r['images']} | {r['identity_map_s']:.1f} | {r['perturbation_s']:.1f} | {r['shards_s']:.1f} | {r['ratio_to_floor']:.2f} |")
    print("\n| protect (generator) | peak RSS (MB) |\n| --- | --- |")
    for m in memory:
        print(f"| {m['rows']} rows | {m['peak_rss_mb']:.0f} |")
    print(f"| ratio {args.large} / {args.small} | {memory[1]['peak_rss_mb'] / memory[0]['peak_rss_mb']:.2f} |")
    threads, processes, single = LAUNCHES
    print(f"\n| phase (2 cores) | {threads} (s) | {processes} (s) | {single} (s) | speed-up: 2 processes vs 2 threads "
          f"| 2 processes vs 1 |\n| --- | --- | --- | --- | --- | --- |")
    for r in scale:
        print(f"| {r['phase']} | {r[threads]:.1f} | {r[processes]:.1f} | {r[single]:.1f} | {r['speedup']:.2f} | {r['process_scaling']:.2f} |")
    print(f"| the machine's ceiling: an independent CPU-bound job, twice at once vs once | | | | | {ceiling['throughput_ratio']:.2f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"throughput": rows, "memory": memory, "memory_ratio": memory[1]["peak_rss_mb"] / memory[0]["peak_rss_mb"],
                                     "scaling": scale, "machine_ceiling": ceiling}, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
