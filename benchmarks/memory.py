"""Peak memory of a streamed merge against the largest tensor, not the model.

Makes three float32 checkpoints of uniform 8 MiB tensors (a "model" of N tensors, sharded), runs a
linear merge of the three and a global-scope TIES merge (base + 2) in a fresh process each, and
reports the growth of resident memory during the merge (sampled every millisecond from /proc) over
the resident memory just before it (interpreter, torch and mergebench imported). The promise is
growth set by the largest tensor, times a small number per operator, and the same growth for a
model twice as large.

    .venv/bin/python benchmarks/memory.py [--tensors 32] [--ops linear,ties] [--work benchmarks/_work]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROWS, COLS = 1024, 2048  # 8 MiB in float32

CHILD = r"""
import json, os, sys, threading, time
import torch
import mergebench as mb
from mergebench import operators as ops
folders, out, op = sys.argv[1:4], sys.argv[4], sys.argv[5]
models = [mb.load(f) for f in folders]
if op == "linear":
    node = ops.linear(models=models)
else:  # global-scope TIES: three statistics passes, then the merge
    node = ops.ties(base=models[0], models=models[1:], density=0.5)
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
peak, done = [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.001)
before = rss()
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
start = time.perf_counter()
result = node.save(out, device="cpu", shard_size="256MB", force=True)
seconds = time.perf_counter() - start
done.set(); sampler.join()
print(json.dumps({"before": before, "peak": max(peak[0], rss()), "seconds": seconds,
                  "bytes_read": result.summary.bytes_read}))
"""


def make_models(work: Path, tensors: int) -> list[Path]:
    import torch

    from mergebench.synthetic import save_checkpoint

    folders = []
    for seed in range(3):
        folder = work / f"n{tensors}-m{seed}"
        if not folder.exists():
            g = torch.Generator().manual_seed(seed)
            state = {f"model.layers.{i}.w": torch.randn(ROWS, COLS, generator=g) for i in range(tensors)}
            save_checkpoint(state, folder, shard_size=200 * 2**20)
        folders.append(folder)
    return folders


def measure(work: Path, tensors: int, op: str) -> dict:
    folders = make_models(work, tensors)
    out = work / "out"
    child = subprocess.run([sys.executable, "-c", CHILD, *map(str, folders), str(out), op], capture_output=True,
                           text=True, check=True)
    shutil.rmtree(out, ignore_errors=True)
    doc = json.loads(child.stdout.strip().splitlines()[-1])
    largest = ROWS * COLS * 4
    growth = doc["peak"] - doc["before"]
    return {"op": op, "tensors_per_model": tensors, "model_MB": round(tensors * largest / 1e6),
            "largest_tensor_MB": round(largest / 1e6, 1), "peak_rss_growth_MB": round(growth / 1e6, 1),
            "growth_in_largest_tensors": round(growth / largest, 2),
            "seconds": round(doc["seconds"], 2),
            "read_GB_per_s": round(doc["bytes_read"] / doc["seconds"] / 1e9, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=32, help="tensors per model (32 -> 268 MB)")
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "_work")
    parser.add_argument("--ops", default="linear,ties", help="comma-separated: linear, ties")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    for op in args.ops.split(","):
        rows = [measure(args.work, args.tensors, op), measure(args.work, 2 * args.tensors, op)]
        for row in rows:
            print(json.dumps(row))
        print(f"{op}: peak RSS growth {rows[0]['peak_rss_growth_MB']} MB for a {rows[0]['model_MB']} MB model, "
              f"{rows[1]['peak_rss_growth_MB']} MB for {rows[1]['model_MB']} MB "
              f"({rows[0]['growth_in_largest_tensors']}x / {rows[1]['growth_in_largest_tensors']}x the largest "
              f"tensor)")


if __name__ == "__main__":
    main()
