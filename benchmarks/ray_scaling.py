"""Wall time of a merge with the Ray executor on 1..N local workers, against the local executor.

Uses the checkpoints ``bench.py`` generates (run it first for the size). Each configuration starts a
fresh local Ray instance with ``num_cpus`` workers; the Ray start-up is not timed, the run is.

    .venv/bin/python benchmarks/ray_scaling.py --size medium --workers 1,2 --merges linear,ties
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import ray

import mergebench as mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="medium")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--merges", default="linear,ties")
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "_work")
    args = parser.parse_args()
    for merge in args.merges.split(","):
        recipe = args.work / f"{merge}.yaml"
        if args.size not in recipe.read_text():
            raise SystemExit(f"{recipe} is not for size {args.size}: run bench.py --size {args.size} --merges {merge}")
        start = time.perf_counter()
        mb.run(recipe, force=True, device="cpu")
        print(f"{merge}: local executor {time.perf_counter() - start:.2f} s", flush=True)
        for workers in map(int, args.workers.split(",")):
            ray.init(num_cpus=workers, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            start = time.perf_counter()
            mb.run(recipe, force=True, device="cpu", executor="ray")
            print(f"{merge}: ray, {workers} worker(s) {time.perf_counter() - start:.2f} s", flush=True)
            ray.shutdown()


if __name__ == "__main__":
    main()
