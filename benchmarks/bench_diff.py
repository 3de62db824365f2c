"""`harness diff` on two multi-GB HF checkpoints: throughput and peak RSS vs plain reads.

Generates two sharded safetensors checkpoints (default 2 x 2 GiB, 64 MiB tensors; B differs from
A in one element of its last tensor), then, in the same run:
  * baseline: `cat A/* B/* > /dev/null` (read bandwidth of the same files, same cache state);
  * `harness diff A B` as a subprocess: wall time, throughput (A+B bytes / wall) and peak RSS
    (ru_maxrss of the child).
Targets: throughput >= 50% of the cat bandwidth; peak RSS <= 3 x largest tensor + 500 MB.
Files are generated with numpy (no torch) under --dir (default .cache/bench-diff) and kept for
reruns; the page cache is warmed by one untimed cat so both measurements see the same state.

    .venv/bin/python benchmarks/bench_diff.py [--gib 2] [--tensor-mib 64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from harness import workspace
from harness.execution.run_dir import RunDir


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, offset = {}, 0
    for name, arr in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for arr in tensors.values():
            fh.write(arr.tobytes())


def generate(root: Path, gib: float, tensor_mib: int) -> tuple[Path, Path]:
    a, b = root / "a", root / "b"
    if (a / "model.safetensors.index.json").exists() and (b / "model.safetensors.index.json").exists():
        return a, b
    n = int(gib * 1024 / tensor_mib)
    per_file = max(1, n // 4)
    rng = np.random.default_rng(0)
    elems = tensor_mib * 1024 * 1024 // 4
    for side in (a, b):
        side.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for f in range(0, n, per_file):
        names = [f"layers.{i}.weight" for i in range(f, min(n, f + per_file))]
        shard = f"model-{f // per_file:05d}.safetensors"
        tensors = {name: rng.standard_normal(elems, dtype=np.float32).reshape(-1, 1024) for name in names}
        write_safetensors(a / shard, tensors)
        if f + per_file >= n:  # last shard of B: one element changed
            tensors[names[-1]] = tensors[names[-1]].copy()
            tensors[names[-1]][7, 7] += 1e-3
        write_safetensors(b / shard, tensors)
        weight_map.update({name: shard for name in names})
    for side in (a, b):
        (side / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return a, b


def files(*dirs: Path) -> list[str]:
    return [str(p) for d in dirs for p in sorted(d.glob("*.safetensors"))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=2.0, help="size of each checkpoint")
    parser.add_argument("--tensor-mib", type=int, default=64)
    parser.add_argument("--dir", type=Path, default=workspace.cache_root() / "bench-diff")
    args = parser.parse_args()
    a, b = generate(args.dir, args.gib, args.tensor_mib)
    total = sum(os.path.getsize(f) for f in files(a, b))

    subprocess.run(f"cat {' '.join(files(a, b))} > /dev/null", shell=True, check=True)  # warm
    start = time.monotonic()
    subprocess.run(f"cat {' '.join(files(a, b))} > /dev/null", shell=True, check=True)
    cat_s = time.monotonic() - start

    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "harness", "diff", str(a), str(b)], capture_output=True, text=True)
    diff_s = time.monotonic() - start
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # max over children: diff dominates
    assert proc.returncode == 1, proc.stdout + proc.stderr  # B differs in one element
    largest_mb = args.tensor_mib * 1024 * 1024 / 1e6

    doc = {
        "bytes_compared": total, "cat_s": round(cat_s, 2), "cat_gbps": round(total / cat_s / 1e9, 2),
        "diff_s": round(diff_s, 2), "diff_gbps": round(total / diff_s / 1e9, 2),
        "throughput_vs_cat": round(cat_s / diff_s, 2), "peak_rss_mb": round(rss_mb),
        "rss_budget_mb": round(3 * largest_mb + 500), "diff_verdict": proc.stdout.strip().splitlines()[-1],
    }
    run_dir = RunDir.create("bench-diff")
    workspace.atomic_write_json(run_dir / "bench.json", doc)
    print(json.dumps(doc, indent=2))
    ok = doc["throughput_vs_cat"] >= 0.5 and doc["peak_rss_mb"] <= doc["rss_budget_mb"]
    print(f"targets {'met' if ok else 'NOT met'}: throughput {doc['throughput_vs_cat']:.0%} of cat (>= 50%), "
          f"peak RSS {doc['peak_rss_mb']} MB (<= {doc['rss_budget_mb']} MB)  -> {run_dir / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
