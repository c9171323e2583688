"""Wall time and peak memory of mergebench merges against the disk bound (and mergekit, when given).

Generates three Llama-shaped bfloat16 checkpoints (a base and two "fine-tunes" of it), sharded like
the Hub does and written key by key (never a whole model in memory), then for each merge runs a fresh
process (median of ``--repeat`` runs, mergekit and mergebench alternating) and prints wall time, peak
RSS of the process, input GB/s, the ratio to the disk bound measured in the same run (read every input
file + write the output with fsync) and, with ``--mergekit VENV``, the ratio to mergekit
(``--mergekit-command`` names its command instead). With ``--cold`` (the default for ``xl``, whose inputs
do not fit in the page cache of a 24 GiB machine) the page cache is dropped before every timed run and
before the disk bound, which needs root; the script says when it cannot. With ``--device cuda`` both tools
compute on the GPU (mergekit with ``--cuda``). The ``mk_*`` merges run the same mergekit config through
both tools (``mergebench run CONFIG --out DIR`` translates it).

    .venv/bin/python benchmarks/bench.py --size small
    .venv/bin/python benchmarks/bench.py --size medium --mergekit /path/to/mergekit-venv --repeat 3
    .venv/bin/python benchmarks/bench.py --size xl --mergekit /path/to/mergekit-venv --work /big/disk
    python3 benchmarks/bench.py --size medium --device cuda --mergekit-command mergekit-yaml
"""

from __future__ import annotations

import argparse
import json
import math
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

from mergebench.io.writer import CheckpointWriter, PlannedTensor
from mergebench.synthetic import llama_config, llama_shapes

SIZES = {  # hidden, intermediate, layers, heads, vocab, shard size
    "small": (1024, 2816, 12, 16, 16000, 200 * 10**6),
    "medium": (2048, 5632, 16, 16, 32000, 1 * 10**9),
    "large": (2048, 5632, 32, 16, 32000, 2 * 10**9),
    "xl": (4096, 11008, 24, 32, 32000, 5 * 10**9),  # Llama-7B's shapes, 24 of its 32 blocks: 10.2 GB per model
}
COLD_BY_DEFAULT = {"xl"}
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
    "slerp": ({"op": "slerp", "inputs": {"a": "model_1", "b": "model_2"}, "params": {"t": 0.3}},
              {"merge_method": "slerp", "base_model": "model_1", "parameters": {"t": 0.3},
               "models": [{"model": "model_1"}, {"model": "model_2"}]}),
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
    """model_0 (random weights, norms near 1) and model_1, model_2 (model_0 plus 2 % noise), written key by key:
    each key's three tensors are made from seeds of (model, key) and written before the next key's."""
    hidden, intermediate, layers, heads, vocab, shard = SIZES[size]
    config = llama_config(hidden=hidden, intermediate=intermediate, layers=layers, heads=heads, kv_heads=heads,
                          vocab=vocab, dtype="bfloat16")
    folders = [work / size / f"model_{i}" for i in range(3)]
    if all((f / "config.json").exists() for f in folders):
        return folders
    shapes = llama_shapes(config)
    planned = [PlannedTensor(key, torch.bfloat16, shape) for key, shape in shapes.items()]
    writers = [CheckpointWriter(folder, planned, shard, {"format": "pt"}) for folder in folders]
    for index, (key, shape) in enumerate(shapes.items()):
        generator = torch.Generator().manual_seed(index)
        if key.endswith("norm.weight"):
            base = 1 + 0.1 * torch.randn(shape, generator=generator)
        else:
            base = torch.randn(shape, generator=generator).div_(shape[-1] ** 0.5)
        scale = 0.02 * float(base.abs().mean())
        writers[0].write(key, base.to(torch.bfloat16))
        for writer in writers[1:]:
            writer.write(key, (base + scale * torch.randn(shape, generator=generator)).to(torch.bfloat16))
        del base
    for writer in writers:
        writer.finish_weights()
        (writer.partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        writer.commit(replace=True)
    return folders


def drop_page_cache() -> bool:
    """Write dirty pages and empty the page cache (root only); whether it was emptied."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def timed(command: list[str], cold: bool = False, timeout: float | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of a command run in a fresh process (from a cold page cache with
    ``cold``); (inf, nan) when it runs past ``timeout`` seconds."""
    if cold:
        drop_page_cache()
    try:
        out = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *command], capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return float("inf"), float("nan")
    seconds, rss_kib, code = out.stdout.split()[-3:]
    if code != "0":
        raise RuntimeError(f"{command[0]} failed: {out.stderr[-2000:]}")
    return float(seconds), int(rss_kib) * 1024 / 1e9


def disk_bound(folders: list[Path], out_bytes: int, scratch: Path, cold: bool) -> float:
    """Seconds to read every input file and write (and fsync) a file of the output's size (from a cold page
    cache with ``cold``)."""
    if cold:
        drop_page_cache()
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
    parser.add_argument("--cold", action=argparse.BooleanOptionalAction, default=None,
                        help="drop the page cache before every timed run (default: only for xl)")
    parser.add_argument("--mergekit-timeout", type=float, help="seconds after which a mergekit run is stopped")
    args = parser.parse_args()
    cold = args.cold if args.cold is not None else args.size in COLD_BY_DEFAULT
    folders = make_models(args.work, args.size)
    if cold and not drop_page_cache():
        print("note: the page cache cannot be dropped (not root): runs after the first start warm", flush=True)
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
            bounds.append(disk_bound(folders, out_bytes, args.work / "scratch.bin", cold))
            shutil.rmtree(args.work / "out-mb", ignore_errors=True)  # both tools start without an output folder
            ours.append(timed([*ours_command, "--quiet", "--force", "--device", args.device], cold))
            shutil.rmtree(args.work / "out-mb", ignore_errors=True)  # disk space for the largest sizes
            if mergekit and mergekit_config:
                theirs.append(timed([*mergekit, str(mergekit_yaml), str(args.work / "out-mk"),
                                     "--allow-crimes", *on_gpu], cold, args.mergekit_timeout))
                shutil.rmtree(args.work / "out-mk", ignore_errors=True)
        wall, bound = statistics.median(s for s, _ in ours), statistics.median(bounds)
        row = {"merge": merge, "wall_s": round(wall, 2), "peak_rss_GB": round(max(r for _, r in ours), 2),
               "input_GB_per_s": round(input_bytes / wall / 1e9, 2), "disk_bound_s": round(bound, 2),
               "x_disk_bound": round(wall / bound, 2)}
        if theirs and math.isinf(statistics.median(s for s, _ in theirs)):  # stopped at --mergekit-timeout
            row.update({"mergekit_wall_s": f"> {args.mergekit_timeout:g}",
                        "x_mergekit": f"< {wall / args.mergekit_timeout:.2f}"})
        elif theirs:
            their_wall = statistics.median(s for s, _ in theirs)
            row.update({"mergekit_wall_s": round(their_wall, 2), "mergekit_rss_GB": round(max(r for _, r in theirs), 2),
                        "x_mergekit": round(wall / their_wall, 2)})
        rows.append(row)
        print(json.dumps(row), flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {os.cpu_count()} cores"
    print(f"{args.size}: {input_bytes / 1e9:.2f} GB of inputs, {out_bytes / 1e9:.2f} GB out, device {device}, "
          f"{'cold' if cold else 'warm'} page cache")


if __name__ == "__main__":
    main()
