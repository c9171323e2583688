"""Wall time and peak memory of mergebench merges against the disk bound (and mergekit, when given).

Generates three Llama-shaped bfloat16 checkpoints (a base and two "fine-tunes" of it), sharded like
the Hub does, then for each merge runs a fresh process (median of ``--repeat`` runs, mergekit and
mergebench alternating) and prints wall time, peak RSS of the process, input GB/s, the ratio to the
disk bound measured in the same run (read every input file + write the output with fsync) and, with
``--mergekit VENV``, the ratio to mergekit (``--mergekit-command`` names its command instead). With
``--device cuda`` both tools compute on the GPU (mergekit with ``--cuda``). The ``mk_*`` merges run the
same mergekit config through both tools (``mergebench run CONFIG --out DIR`` translates it).

    .venv/bin/python benchmarks/bench.py --size small
    .venv/bin/python benchmarks/bench.py --size medium --mergekit /path/to/mergekit-venv --repeat 3
    python3 benchmarks/bench.py --size medium --device cuda --mergekit-command mergekit-yaml
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from mergebench.synthetic import llama_config, llama_state_dict, save_checkpoint

SIZES = {  # hidden, intermediate, layers, heads, vocab, shard size
    "small": (1024, 2816, 12, 16, 16000, 200 * 10**6),
    "medium": (2048, 5632, 16, 16, 32000, 1 * 10**9),
    "large": (2048, 5632, 32, 16, 32000, 2 * 10**9),
}
MERGES = {
    "linear": ({"op": "linear", "inputs": {"models": ["model_0", "model_1", "model_2"]}},
               {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in
                                                     ("model_0", "model_1", "model_2")],
                "parameters": {"normalize": True}}),
    "task_arithmetic": ({"op": "task_arithmetic", "inputs": {"base": "model_0", "models": ["model_1", "model_2"]},
                         "params": {"lambda": 1.0, "weights": [0.5, 0.5]}},
                        {"merge_method": "task_arithmetic", "base_model": "model_0",
                         "models": [{"model": m, "parameters": {"weight": 0.5}} for m in ("model_1", "model_2")]}),
    "ties": ({"op": "ties", "inputs": {"base": "model_0", "models": ["model_1", "model_2"]},
              "params": {"density": 0.5, "scope": "per_tensor"}},
             {"merge_method": "ties", "base_model": "model_0", "parameters": {"normalize": True},
              "models": [{"model": m, "parameters": {"density": 0.5, "weight": 0.5}} for m in ("model_1", "model_2")]}),
    "ties_global": ({"op": "ties", "inputs": {"base": "model_0", "models": ["model_1", "model_2"]},
                     "params": {"density": 0.5, "scope": "global"}}, None),
    "dare_ties": ({"op": "dare_ties", "inputs": {"base": "model_0", "models": ["model_1", "model_2"]},
                   "params": {"p": 0.5, "scope": "per_tensor"}},
                  {"merge_method": "dare_ties", "base_model": "model_0", "parameters": {"normalize": True},
                   "models": [{"model": m, "parameters": {"density": 0.5, "weight": 0.5}}
                              for m in ("model_1", "model_2")]}),
    "lines": ({"op": "lines", "inputs": {"base": "model_0", "fine_tuned": "model_1"}, "params": {"alpha": 0.1}},
              None),
    "model_stock": ({"op": "model_stock", "inputs": {"base": "model_0", "models": ["model_1", "model_2"]}},
                    {"merge_method": "model_stock", "base_model": "model_0",
                     "models": [{"model": m} for m in ("model_1", "model_2")]}),
    "della": ({"op": "della", "inputs": {"base": "model_0", "models": ["model_1", "model_2"]},
               "params": {"density": 0.5, "epsilon": 0.1, "weights": [0.5, 0.5]}},
              {"merge_method": "della", "base_model": "model_0", "parameters": {"epsilon": 0.1},
               "models": [{"model": m, "parameters": {"density": 0.5, "weight": 0.5}}
                          for m in ("model_1", "model_2")]}),
    "sce": ({"op": "sce", "inputs": {"base": "model_0", "models": ["model_1", "model_2"]},
             "params": {"select_topk": 0.5}},
            {"merge_method": "sce", "base_model": "model_0", "parameters": {"select_topk": 0.5},
             "models": [{"model": m} for m in ("model_1", "model_2")]}),
    "karcher": ({"op": "karcher", "inputs": {"models": ["model_0", "model_1", "model_2"]}},
                {"merge_method": "karcher", "models": [{"model": m} for m in ("model_0", "model_1", "model_2")]}),
    # the same mergekit config run by both tools (mergebench translates it: `mergebench run CONFIG --out DIR`)
    "mk_ties_gradient": (None, {"merge_method": "ties", "base_model": "model_0", "parameters": {"normalize": True},
                                "models": [{"model": "model_1", "parameters": {"density": [0.3, 0.7], "weight": 0.6}},
                                           {"model": "model_2", "parameters": {
                                               "density": 0.5, "weight": [{"filter": "mlp", "value": 0.5},
                                                                          {"value": [0.2, 0.8]}]}}]}),
    "mk_passthrough": (None, {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "model_1", "layer_range": [0, 8]}]},
        {"sources": [{"model": "model_2", "layer_range": [4, 12]}]}]}),
}

RSS_WRAPPER = ("import resource, subprocess, sys, time; start = time.perf_counter(); "
               "code = subprocess.run(sys.argv[1:]).returncode; "
               "print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)")


def make_models(work: Path, size: str) -> list[Path]:
    hidden, intermediate, layers, heads, vocab, shard = SIZES[size]
    config = llama_config(hidden=hidden, intermediate=intermediate, layers=layers, heads=heads, kv_heads=heads,
                          vocab=vocab, dtype="bfloat16")
    folders = [work / size / f"model_{i}" for i in range(3)]
    if all(f.exists() for f in folders):
        return folders
    base = llama_state_dict(config, seed=0, dtype=torch.bfloat16)
    save_checkpoint(base, folders[0], shard, config)
    for i in (1, 2):
        save_checkpoint(llama_state_dict(config, seed=i, base=base, noise=0.02, dtype=torch.bfloat16), folders[i],
                        shard, config)
    return folders


def timed(command: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of a command run in a fresh process."""
    out = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *command], capture_output=True, text=True, env=env)
    seconds, rss_kib, code = out.stdout.split()[-3:]
    if code != "0":
        raise RuntimeError(f"{command[0]} failed: {out.stderr[-2000:]}")
    return float(seconds), int(rss_kib) * 1024 / 1e9


def disk_bound(folders: list[Path], out_bytes: int, scratch: Path) -> float:
    """Seconds to read every input file and write (and fsync) a file of the output's size."""
    start = time.perf_counter()
    buffer = bytearray(64 * 2**20)
    for folder in folders:
        for file in sorted(folder.glob("*.safetensors")):
            with open(file, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass
    with open(scratch, "wb") as f:
        remaining = out_bytes
        while remaining > 0:
            remaining -= f.write(memoryview(buffer)[: min(len(buffer), remaining)])
        f.flush()
        os.fsync(f.fileno())
    scratch.unlink()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--merges", default="linear,task_arithmetic,ties,dare_ties,ties_global,lines")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--mergekit", type=Path, help="a virtualenv with mergekit installed (its bin/mergekit-yaml)")
    parser.add_argument("--mergekit-command", help="mergekit's command, where it is installed outside a virtualenv")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "_work")
    args = parser.parse_args()
    folders = make_models(args.work, args.size)
    input_bytes = sum(f.stat().st_size for folder in folders for f in folder.glob("*.safetensors"))
    out_bytes = sum(f.stat().st_size for f in folders[0].glob("*.safetensors"))
    mergekit = ([str(args.mergekit / "bin" / "mergekit-yaml")] if args.mergekit
                else args.mergekit_command.split() if args.mergekit_command else None)
    on_gpu = ["--cuda"] if args.device.startswith("cuda") else []
    rows = []
    for merge in args.merges.split(","):
        node, mergekit_config = MERGES[merge]
        mergekit_yaml = args.work / f"{merge}-mergekit.yaml"
        if mergekit_config:
            config = {**mergekit_config, "dtype": "bfloat16"}
            config = json.loads(re.sub(r'"(model_\d)"', rf'"{folders[0].parent}/\1"', json.dumps(config)))
            mergekit_yaml.write_text(yaml.safe_dump(config))
        out_mb = str(args.work / "out-mb")
        ours_command = [sys.executable, "-m", "mergebench", "run", str(mergekit_yaml), "--out", out_mb]
        if node is not None:
            recipe = args.work / f"{merge}.yaml"
            recipe.write_text(yaml.safe_dump({"models": {f.name: str(f) for f in folders}, "nodes": {"merge": node},
                                              "outputs": [{"from": "merge", "path": str(args.work / "out-mb"),
                                                           "shard_size": "1GB"}]}))
            ours_command = [sys.executable, "-m", "mergebench", "run", str(recipe)]
        ours, theirs, bounds = [], [], []
        for _ in range(args.repeat):
            bounds.append(disk_bound(folders, out_bytes, args.work / "scratch.bin"))
            shutil.rmtree(args.work / "out-mb", ignore_errors=True)  # both tools start without an output folder
            ours.append(timed([*ours_command, "--quiet", "--force", "--device", args.device]))
            if mergekit and mergekit_config:
                theirs.append(timed([*mergekit, str(mergekit_yaml), str(args.work / "out-mk"),
                                     "--allow-crimes", *on_gpu]))
                shutil.rmtree(args.work / "out-mk", ignore_errors=True)
        wall, bound = statistics.median(s for s, _ in ours), statistics.median(bounds)
        row = {"merge": merge, "wall_s": round(wall, 2), "peak_rss_GB": round(max(r for _, r in ours), 2),
               "input_GB_per_s": round(input_bytes / wall / 1e9, 2), "disk_bound_s": round(bound, 2),
               "x_disk_bound": round(wall / bound, 2)}
        if theirs:
            their_wall = statistics.median(s for s, _ in theirs)
            row.update({"mergekit_wall_s": round(their_wall, 2), "mergekit_rss_GB": round(max(r for _, r in theirs), 2),
                        "x_mergekit": round(wall / their_wall, 2)})
        rows.append(row)
        print(json.dumps(row), flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {os.cpu_count()} cores"
    print(f"{args.size}: {input_bytes / 1e9:.2f} GB of inputs, {out_bytes / 1e9:.2f} GB out, device {device}")


if __name__ == "__main__":
    main()
