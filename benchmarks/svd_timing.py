"""Seconds per key of the per-matrix SVD methods (tsv_m, iso_c, iso_cts) on one Llama-7B-sized FFN matrix.

They run one key at a time in the streamed executor, so a model's time is the sum of its matrices'; this
measures one key, computed as the engine computes it (float32, on the device given), with T task vectors.

    .venv/bin/python benchmarks/svd_timing.py                       # 4096 × 11008, 3 tasks, CPU
    .venv/bin/python benchmarks/svd_timing.py --device cuda --tasks 8
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from mergebench import operators as ops

METHODS = {"iso_c": ops.iso_c, "tsv_m": ops.tsv_m, "iso_cts": ops.iso_cts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=11008)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    key = "model.layers.0.mlp.up_proj.weight"
    deltas = [{key: (0.01 * torch.randn(args.rows, args.cols, generator=g)).to(args.device)}
              for _ in range(args.tasks)]
    for name in args.methods.split(","):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        METHODS[name](deltas=deltas)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        print(json.dumps({"method": name, "shape": [args.rows, args.cols], "tasks": args.tasks, "device": args.device,
                          "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                          "seconds_per_key": round(time.perf_counter() - start, 2)}), flush=True)


if __name__ == "__main__":
    main()
