"""Create the demo's inputs: a tiny Llama-shaped base model and two "fine-tunes" of it, in HF layout."""

import sys
from pathlib import Path

import torch

from mergebench.synthetic import llama_config, llama_state_dict, save_checkpoint


def main(folder: Path) -> None:
    config = llama_config(hidden=128, intermediate=344, layers=4, vocab=512, dtype="bfloat16")
    base = llama_state_dict(config, seed=0, dtype=torch.bfloat16)
    models = {"base": base}
    for i, name in enumerate(("ft-math", "ft-code"), start=1):
        models[name] = llama_state_dict(config, seed=i, base=base, noise=0.05, dtype=torch.bfloat16)
    for name, state in models.items():
        # shard like the Hub does, so the demo exercises sharded reading
        save_checkpoint(state, folder / name, shard_size=600_000, config=config)
        print(f"created {folder / name} ({len(state)} tensors)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("demo-out/models"))
