"""Pipeline benchmark on CIFAR-10 (the sharded-protect issue's figures), ratios from one run.

1. Throughput against its floor, per mode: protecting shards (decode, perturb, PNG-encode,
   write parquet) vs (a) an identity ``map`` that decodes and PNG-encodes the same images into
   parquet plus (b) the perturbation alone on the same images as ready tensors.
2. Memory: peak RSS of ``protect`` on all 50,000 training images vs on 5,000 (generator
   mode, same fit sample), each in a fresh process.
3. Scaling: applying with 2 processes of 1 thread vs 1 process of 2 threads.

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

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def throughput(args, mode: str, work: Path) -> dict:
    """Shards vs identity map + perturbation alone, on the same ``args.n`` images."""
    from datasets import load_dataset

    from uge_hf import AuthorizedModel, ProtectConfig, UGETransform
    from uge_hf.data import load_tensors
    from uge_hf.protect import protect_shard, shard_plan
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


def scaling(args, work: Path) -> dict:
    """Wall time of the shard phase (first shard started to last shard finished, from the
    progress records) with 1 process x 2 threads and with 2 processes x 1 thread."""
    from uge_hf import AuthorizedModel

    key_dir = work / "key"
    AuthorizedModel.create("convnet", 10, seed=0).save_pretrained(key_dir)
    base = ["-m", "uge_hf", "protect", str(args.data), "--split", "train", "--limit", str(args.scaling_n), "--key", str(key_dir),
            "--preset", "fast", "--steps", "10", "--shard-size", "250", "--quiet"]
    # Build the shared state once; each timed run starts from a copy of it, so only shards are timed.
    subprocess.run([sys.executable, *base, "--out", str(work / "scale-base")], check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    timings = {}
    for name, launcher, threads in (("1 process x 2 threads", [sys.executable], "2"),
                                    ("2 processes x 1 thread", [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                                                                "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                                                                "no", "--dynamo_backend", "no"], "1")):
        out = work / f"scale-{threads}"
        shutil.copytree(work / "scale-base.uge-state", out.with_name(out.name + ".uge-state"))
        shutil.rmtree(out.with_name(out.name + ".uge-state") / "progress")
        subprocess.run([*launcher, *base, "--out", str(out)], check=True, env={**os.environ, "OMP_NUM_THREADS": threads},
                       capture_output=True)
        records = [json.loads(p.read_text()) for p in (out.with_name(out.name + ".uge-state") / "progress").iterdir()]
        timings[name] = max(r["finished"] for r in records) - min(r["started"] for r in records)
    return {"images": args.scaling_n, **timings, "speedup": timings["1 process x 2 threads"] / timings["2 processes x 1 thread"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--n", type=int, default=1000, help="images for the throughput figures")
    parser.add_argument("--scaling-n", type=int, default=2000)
    parser.add_argument("--small", type=int, default=5000)
    parser.add_argument("--large", type=int, default=50000)
    parser.add_argument("--json", type=Path, default=Path("bench/results/pipeline.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
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
    print(f"\n| protecting the shards of {scale['images']} images (10 steps) | wall (s) |\n| --- | --- |")
    for k in ("1 process x 2 threads", "2 processes x 1 thread"):
        print(f"| {k} | {scale[k]:.1f} |")
    print(f"| speed-up | {scale['speedup']:.2f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"throughput": rows, "memory": memory, "memory_ratio": memory[1]["peak_rss_mb"] / memory[0]["peak_rss_mb"],
                                     "scaling": scale}, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
