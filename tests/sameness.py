"""Run a fixed set of recipes — every operator, sliced and unsliced tensors, artifacts in and out, a training
run as a sequence, vocabulary union, and the Ray executor — and print the sha256 of every output file.

``tests/test_sameness.py`` runs this in a fresh interpreter with torch's vector kernels and MKL pinned to
their portable code paths, so the same code gives the same bytes on any x86 CPU, and compares with
``tests/data/sameness.json``. A change that moves a byte of any output fails it; a change meant to move
bytes records the new hashes with ``python tests/sameness.py --record`` and says why in its commit.

Outputs embed absolute paths (the model card, the resolved recipe's hash in every shard), so the run
always happens in the same folder, ``ROOT``, made afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

# Set before torch loads (when run as the script): torch's portable kernels and MKL's reproducible mode
# give the same bytes on every x86 CPU
PORTABLE_ENV = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
if __name__ == "__main__":
    os.environ.update(PORTABLE_ENV)

import torch  # noqa: E402
import yaml  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

import mergebench as mb  # noqa: E402
from mergebench.io.statistics import record_statistics, save_statistics  # noqa: E402
from mergebench.synthetic import llama_config, llama_state_dict, save_checkpoint  # noqa: E402

ROOT = Path("/tmp/mergebench-sameness")
GOLDEN = Path(__file__).parent / "data" / "sameness.json"
# hidden 128 × FFN 768 (98 304 entries) and the 600 × 128 embedding are streamed in slices of 65 536;
# norms and biases are not: both paths are covered
CONFIG = llama_config(hidden=128, intermediate=768, layers=2, heads=4, kv_heads=2, vocab=600)


def _inputs() -> None:
    base = llama_state_dict(CONFIG, seed=0)
    save_checkpoint(base, ROOT / "base", 400_000, CONFIG)  # sharded
    for i in (1, 2):
        save_checkpoint(llama_state_dict(CONFIG, seed=i, base=base, noise=0.05), ROOT / f"ft{i}", 10**9, CONFIG)
    for step in range(4):
        save_checkpoint(llama_state_dict(CONFIG, seed=10 + step, base=base, noise=0.02 * (step + 1)),
                        ROOT / "run" / f"checkpoint-{100 * step}", 10**9, CONFIG)
    for i in (1, 2):  # two independently initialised MLPs of 64-300-300-10 (the 300 × 300 layer is sliced)
        g = torch.Generator().manual_seed(100 + i)
        shapes = {"0.weight": (300, 64), "0.bias": (300,), "2.weight": (300, 300), "2.bias": (300,),
                  "4.weight": (10, 300), "4.bias": (10,)}
        state = {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}
        save_checkpoint(state, ROOT / f"mlp{i}")
        mlp = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.ReLU(), torch.nn.Linear(300, 300), torch.nn.ReLU(),
                                  torch.nn.Linear(300, 10))
        mlp.load_state_dict(state)
        inputs = torch.randn(48, 64, generator=g)
        save_statistics(record_statistics(mlp, [inputs[:24], inputs[24:]], logits=lambda m, b: m(b), seed=i),
                        ROOT / f"stats{i}")
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "merge": 3}
    small = llama_config(hidden=16, intermediate=32, layers=1, heads=2, kv_heads=1, vocab=4)
    for i, added in enumerate(([], ["<|im_start|>", "soup"])):
        tokenizer = Tokenizer(models.WordLevel(dict(vocab), unk_token="[UNK]"))
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tokenizer.add_tokens(added)
        config = {**small, "vocab_size": 4 + len(added)}
        folder = save_checkpoint(llama_state_dict(config, seed=20 + i), ROOT / f"tok{i}", 10**9, config)
        tokenizer.save(str(folder / "tokenizer.json"))


def _node(op: str, inputs: dict, **params) -> dict:
    return {"op": op, "inputs": inputs, **({"params": params} if params else {})}


BM = {"base": "base", "models": ["ft1", "ft2"]}
LLAMA = {
    "models": {"base": "base", "ft1": "ft1", "ft2": "ft2"},
    "nodes": {
        "wise": _node("wise_ft", {"zero_shot": "base", "fine_tuned": "ft1"}, alpha=0.3),
        "avg": _node("linear", {"models": ["base", "ft1", "ft2"]}, weights=[1, 2, 3]),
        "tv": _node("delta", BM),
        "ta": _node("task_arithmetic", {"deltas": "tv"}, **{"lambda": 0.7}),
        "ta_out": _node("apply", {"base": "base", "delta": "ta"}),
        "ties": _node("ties", BM, density=0.3),
        "ties_tensor": _node("ties", BM, density=0.5, scope="per_tensor"),
        "dare_lin": _node("dare_linear", BM, p=0.4),
        "dare_ties": _node("dare_ties", BM, p=0.3, density=0.6),
        "dare": _node("dare", BM, p=0.2),
        "dare_out": _node("apply", {"base": "base", "delta": "dare"}),
        "darex": _node("darex_q", BM, p=0.5, q=0.8),
        "darex_out": _node("apply", {"base": "base", "delta": "darex"}),
        "crumbs": _node("breadcrumbs", BM, density=0.5, gamma=0.05),
        "bitdelta": _node("bitdelta", {"base": "base", "fine_tuned": "ft1"}),
        "slerp": _node("slerp", {"a": "ft1", "b": "ft2"}, t=0.35),
        "lines": _node("lines", {"base": "base", "fine_tuned": "ft1"}),
        "lines_multi": _node("lines", {"delta": "ta", "task_deltas": "tv"}),
        "lines_out": _node("apply", {"base": "base", "delta": "lines_multi"}),
        "graft": _node("graft", {"pretrained": "base", "fine_tuned": "ft2"}, sparsity=0.05),
        "mask1": _node("mask_topk", {"base": "base", "fine_tuned": "ft1"}, proportion=0.1),
        "mask2": _node("mask_topk", {"base": "base", "fine_tuned": "ft2"}, proportion=0.1),
        "sparse1": _node("sft_extract", {"base": "base", "fine_tuned": "ft1"}, proportion=0.05),
        "aligned": _node("align", {"model": "ft1", "reference": "ft2"}),
    },
}
LLAMA["outputs"] = [
    {"from": name, "path": f"llama/{name}" + (".safetensors" if name.startswith(("mask", "sparse")) else "")}
    for name in ("wise", "avg", "ta_out", "ties", "ties_tensor", "dare_lin", "dare_ties", "dare_out", "darex_out",
                 "crumbs", "bitdelta", "slerp", "lines", "lines_out", "graft", "mask1", "mask2", "sparse1", "aligned")]
ARTIFACTS = {
    "models": {"base": "base", "ft1": "ft1", "m1": "llama/mask1.safetensors", "m2": "llama/mask2.safetensors",
               "s1": "llama/sparse1.safetensors"},
    "nodes": {"union": _node("mask_union", {"masks": ["m1", "m2"]}),
              "inter": _node("mask_intersection", {"masks": ["m1", "m2"]}),
              "graft": _node("graft", {"pretrained": "base", "fine_tuned": "ft1", "mask": "m2"}),
              "composed": _node("sft_compose", {"base": "base", "deltas": ["s1"]})},
    "outputs": [{"from": "union", "path": "artifacts/union.safetensors"},
                {"from": "inter", "path": "artifacts/inter.safetensors"},
                {"from": "graft", "path": "artifacts/graft"}, {"from": "composed", "path": "artifacts/composed"}],
}
SEQUENCES = {
    "models": {"run": "run/checkpoint-*", "init": "base"},
    "nodes": {"ema": _node("ema", {"sequence": "run"}), "bema": _node("bema", {"sequence": "run", "init": "init"}),
              "momentum": _node("momentum_interp", {"init": "init", "sequence": "run"})},
    "outputs": [{"from": n, "path": f"sequences/{n}"} for n in ("ema", "bema", "momentum")],
}
MLPS = {
    "models": {"a": "mlp1", "b": "mlp2"},
    "nodes": {"ot": _node("ot_fusion", {"models": ["a", "b"]}, layers=["0", "2", "4"], s=0.5),
              "matched": _node("weight_matching", {"models": ["a", "b"]})},
    "outputs": [{"from": "ot", "path": "mlps/ot"}, {"from": "matched", "path": "mlps/matched"}],
}
VOCAB = {
    "models": {"a": "tok0", "b": "tok1"},
    "nodes": {"avg": _node("linear", {"models": ["a", "b"]})},
    "outputs": [{"from": "avg", "path": "vocab/union"}],
    "tokenizer": {"source": "union"},
}
RAY = {
    "models": LLAMA["models"],
    "nodes": {name: LLAMA["nodes"][name] for name in ("wise", "ties", "dare_ties", "mask1")},
    "outputs": [{"from": "wise", "path": "ray/wise"}, {"from": "ties", "path": "ray/ties"},
                {"from": "dare_ties", "path": "ray/dare_ties"}, {"from": "mask1", "path": "ray/mask1.safetensors"}],
}
STACK = {  # depth up-scaling from a scheduled SLERP, the base and a scheduled per-tensor TIES
    "models": LLAMA["models"],
    "nodes": {"sl": _node("slerp", {"a": "ft1", "b": "ft2"}, t=[0.1, 0.8]),
              "tt": _node("ties", BM, density=[{"filter": "mlp", "value": [0.3, 0.7]}, {"value": 0.5}],
                          scope="per_tensor"),
              "up": _node("stack", {"models": ["sl", "base", "tt"]},
                          slices=[{"model": "sl", "layers": [0, 2]}, {"model": "base", "layers": [1, 2]},
                                  {"model": "tt", "layers": [0, 2]}], head="tt")},
    "outputs": [{"from": "up", "path": "stack/up"}],
}
METHODS = {  # the methods of issue 24 (SVDs included: MKL's reproducible mode keeps their bytes)
    "models": LLAMA["models"],
    "nodes": {"stock": _node("model_stock", BM), "della": _node("della", BM, density=0.6, epsilon=0.2),
              "della_lin": _node("della_linear", BM, weights=[0.6, 0.4], density=0.5),
              "crumbs_ties": _node("breadcrumbs_ties", BM, density=0.5, gamma=0.02),
              "sce": _node("sce", BM, select_topk=0.5), "nuslerp": _node("nuslerp", BM, weights=[1, 2]),
              "multislerp": _node("multislerp", {"models": ["base", "ft1", "ft2"]}, weights=[1, 2, 3]),
              "karcher": _node("karcher", {"models": ["base", "ft1", "ft2"]}),
              "nearswap": _node("nearswap", {"base": "base", "model": "ft1"}, t=0.002),
              "fusion": _node("arcee_fusion", {"base": "base", "fine_tuned": "ft1"}),
              "magmax": _node("magmax", BM), "tsv": _node("tsv_m", BM), "iso_c": _node("iso_c", BM),
              "iso_cts": _node("iso_cts", BM), "pcb": _node("pcb", BM, ratio=0.2)},
}
METHODS["outputs"] = [{"from": name, "path": f"methods/{name}"} for name in METHODS["nodes"]]
LORA = {  # adapters extracted (exact and randomized SVD), merged as adapters, applied back
    "models": LLAMA["models"],
    "nodes": {"x1": _node("lora_extract", {"base": "base", "fine_tuned": "ft1"}, rank=4, svd="full"),
              "x2": _node("lora_extract", {"base": "base", "fine_tuned": "ft2"}, energy=0.3, max_rank=12,
                          modules_to_save="norm"),
              "x3": _node("lora_extract", {"base": "base", "fine_tuned": "ft2"}, rank=6, svd="randomized"),
              "ties": _node("lora_merge", {"adapters": ["x1", "x3"]}, combination="dare_ties_svd", density=0.5,
                            weights=[1, -0.5], svd="full"),
              "cat": _node("lora_merge", {"adapters": ["x1", "x2"]}, combination="cat"),
              "back": _node("apply", {"base": "base", "delta": ["ties", "cat"]}, scale=0.5)},
    "outputs": [{"from": "ties", "path": "lora/ties"}, {"from": "cat", "path": "lora/cat"},
                {"from": "back", "path": "lora/back"}],
}
STATISTICS = {  # Fisher and RegMean from statistics recorded here (per-example gradients, Gram matrices)
    "models": {"mlp1": "mlp1", "mlp2": "mlp2", **{f"{kind}{i}": f"stats{i}/{kind}.safetensors"
                                                  for kind in ("fisher", "gram") for i in (1, 2)}},
    "nodes": {"fisher": _node("fisher", {"models": ["mlp1", "mlp2"], "fishers": ["fisher1", "fisher2"]},
                              weights=[2, 1]),
              "regmean": _node("regmean", {"models": ["mlp1", "mlp2"], "grams": ["gram1", "gram2"]}),
              "wise": _node("wise_ft", {"zero_shot": "mlp1", "fine_tuned": "mlp2", "fishers": ["fisher1", "fisher2"]},
                            alpha=0.3)},
    "outputs": [{"from": name, "path": f"statistics/{name}"} for name in ("fisher", "regmean", "wise")],
}
MOE = {  # mixtures of experts: a node as an expert, seeded routers, a zero shared expert, prompt embeddings
    "models": {**LLAMA["models"], "t": "tok1", "t2": "tok1"},
    "nodes": {"ties": _node("ties", BM, density=0.4),
              "mixtral": {**_node("moe", {"base": "base", "experts": ["ft1", "ties", "base"]}, gate_mode="random"),
                          "seed": 7},
              "qwen": _node("moe", {"base": "base", "experts": ["ft2", "base"]}, gate_mode="uniform_random",
                            architecture="qwen2_moe", experts_per_token=1),
              "cheap": _node("moe", {"base": "t", "experts": ["t", "t2"]}, gate_mode="cheap_embed",
                             prompts={"t": {"positive": ["hello world", "soup"]},
                                      "t2": {"positive": ["merge"], "negative": ["world"]}})},
    "outputs": [{"from": name, "path": f"moe/{name}"} for name in ("mixtral", "qwen", "cheap")],
}
RECIPES = {"llama": LLAMA, "artifacts": ARTIFACTS, "sequences": SEQUENCES, "mlps": MLPS, "vocab": VOCAB,
           "stack": STACK, "methods": METHODS, "lora": LORA, "statistics": STATISTICS,
           "moe": MOE}


def run_all(ray: bool) -> dict[str, str]:
    """Build the inputs in ROOT, run every recipe (and the Ray one when asked), hash every output file."""
    shutil.rmtree(ROOT, ignore_errors=True)
    ROOT.mkdir(parents=True)
    _inputs()
    recipes = {**RECIPES, **({"ray": RAY} if ray else {})}
    for name, doc in recipes.items():
        path = ROOT / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        mb.run(path, device="cpu", executor="ray" if name == "ray" else "local")
    hashes = {}
    for name in recipes:
        for file in sorted((ROOT / name).rglob("*")):
            if file.is_file():
                hashes[str(file.relative_to(ROOT))] = hashlib.sha256(file.read_bytes()).hexdigest()
    shutil.rmtree(ROOT)
    return hashes


if __name__ == "__main__":
    record = "--record" in sys.argv
    hashes = run_all(ray="--ray" in sys.argv or record)
    if record:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    print(json.dumps(hashes))
