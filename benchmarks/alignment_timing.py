"""Time of the alignment planning step for one Llama-shaped FFN block: exact EMD, Sinkhorn, Hungarian.

One block's FFN neurons of two random models (gate and up rows, down columns: the rows compared have
3 × hidden entries) are matched by OT fusion's exact network simplex (``ot.emd``), its log-domain
Sinkhorn, and weight matching's Hungarian assignment (``linear_sum_assignment``). Multiply by the
number of blocks for a whole model.

    .venv/bin/python benchmarks/alignment_timing.py --width 5632 --hidden 2048
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mergebench.surgery.permutations import PermutationSpec, weight_matching
from mergebench.surgery.transport import ground_cost, transport_map


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=5632, help="FFN width (neurons to match)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--methods", default="hungarian,sinkhorn,emd")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    a = {k: torch.randn(args.width, args.hidden, generator=g) / args.hidden**0.5 for k in ("gate", "up", "down")}
    b = {k: torch.randn(args.width, args.hidden, generator=g) / args.hidden**0.5 for k in ("gate", "up", "down")}
    rows_a = torch.cat([a["gate"], a["up"], a["down"]], 1)  # down stored transposed here: its columns as rows
    rows_b = torch.cat([b["gate"], b["up"], b["down"]], 1)
    results = {"width": args.width, "hidden": args.hidden}
    for method in args.methods.split(","):
        start = time.perf_counter()
        if method == "hungarian":
            spec = PermutationSpec({"ffn": (("gate", 0), ("up", 0), ("down", 0))})
            weight_matching(spec, a, b, max_iter=1)
        else:
            cost = ground_cost(rows_a, rows_b, squared=False)
            transport_map(cost / cost.max(), method, 0.01)
        results[f"{method}_s"] = round(time.perf_counter() - start, 2)
        print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
