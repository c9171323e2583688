"""``mergebench record``: a Hugging Face model's Fisher and Gram statistics on a local data file.

A causal language model reads text (one example per line, or JSONL ``text``) and its per-example loss
is the summed negative log-likelihood of the example's tokens; a ``...ForSequenceClassification``
model reads JSONL with ``text`` and ``label``. ``labels: sampled`` draws the labels (tokens) from the
model's own prediction instead (the true Fisher, seeded). One example per forward: no padding enters
the Gram matrices, and the per-example gradients are exact.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mergebench.errors import MergebenchError
from mergebench.io.examples import read_examples
from mergebench.io.reading import read_json_object
from mergebench.io.statistics import record_statistics, save_statistics

LABELS = ("given", "sampled")


def record(model_path: str | os.PathLike[str], data_path: str | os.PathLike[str], out: str | os.PathLike[str],
           stats: tuple[str, ...] = ("fisher", "gram"), labels: str = "given", max_examples: int | None = None,
           max_length: int = 512, seed: int = 0, force: bool = False) -> dict[str, Path]:
    """Record ``stats`` of the model at ``model_path`` on ``data_path``; write them into the folder ``out``."""
    if labels not in LABELS:
        raise MergebenchError(f"labels '{labels}': expected given or sampled")
    try:
        import transformers
    except ImportError:
        raise MergebenchError("mergebench record loads models with transformers: pip install transformers") from None
    model_path, data_path = Path(model_path), Path(data_path)
    config = read_json_object(model_path / "config.json", "model config")
    classifier = any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or [])
    examples = read_examples(data_path, ("text", "label") if classifier else ("text",), max_examples)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    loader = transformers.AutoModelForSequenceClassification if classifier else transformers.AutoModelForCausalLM
    model = loader.from_pretrained(model_path, dtype=torch.float32).eval()

    def batches() -> Iterator[dict[str, Any]]:
        for example in examples:
            batch = dict(tokenizer(example["text"], return_tensors="pt", truncation=True, max_length=max_length))
            if classifier:
                batch["labels"] = torch.tensor([int(example["label"])])
            yield batch

    def logits(m: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        out = m(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return out if classifier else out[:, :-1]  # a language model predicts each next token

    def loss(m: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        scores = logits(m, batch)
        targets = batch["labels"] if classifier else batch["input_ids"][:, 1:]
        nll = torch.nn.functional.cross_entropy(scores.reshape(-1, scores.shape[-1]), targets.reshape(-1),
                                                reduction="none")
        return nll.reshape(targets.shape[0], -1).sum(-1)

    recorded = record_statistics(model, batches(), stats, seed=seed,
                                 **({"loss": loss} if labels == "given" else {"logits": logits}))
    return save_statistics(recorded, out, model=str(model_path), force=force)
