"""Classification accuracy of an encoder's sentence embeddings on a labelled JSONL file.

Examples ``{"text": ..., "label": ...}`` (and optionally ``"split": "train" | "test"``; without it every
fifth example is a test example). Embeddings are the attention-masked mean of the last hidden states (the
sentence-transformers pooling of MiniLM-style models), L2-normalised. ``prototype``: the class whose mean
training embedding is nearest in cosine; ``logreg``: scikit-learn's logistic regression on the training
embeddings. Metric ``cls_acc`` (``cls_logreg_acc``) on the test examples.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mergebench.errors import MergebenchError
from mergebench.evaluation.progress import tracked
from mergebench.io.examples import read_examples

TEST_EVERY = 5


class Classification:
    kind = "encoder"

    def __init__(self, path: Path, method: str = "prototype", batch_size: int = 32):
        if method not in ("prototype", "logreg"):
            raise MergebenchError(f"classification method '{method}': expected prototype or logreg")
        self.path, self.method, self.batch_size = path, method, batch_size

    def __call__(self, model: torch.nn.Module, tokenizer: object) -> dict[str, float]:
        examples = read_examples(self.path, ("text", "label"))
        test = [e.get("split") == "test" if "split" in e else i % TEST_EVERY == TEST_EVERY - 1
                for i, e in enumerate(examples)]
        if all(test) or not any(test):
            raise MergebenchError(f"{self.path}: needs both training and test examples")
        embeddings = self.embed(model, tokenizer, [e["text"] for e in examples])
        labels = [str(e["label"]) for e in examples]
        train = [i for i, t in enumerate(test) if not t]
        held = [i for i, t in enumerate(test) if t]
        predicted = self.fit_predict(embeddings[train], [labels[i] for i in train], embeddings[held])
        name = "cls_acc" if self.method == "prototype" else "cls_logreg_acc"
        return {name: sum(p == labels[i] for p, i in zip(predicted, held)) / len(held)}

    def embed(self, model: torch.nn.Module, tokenizer: object, texts: list[str]) -> torch.Tensor:
        device = next(model.parameters()).device
        parts = []
        for start in tracked(range(0, len(texts), self.batch_size), "embeddings"):
            batch = tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                              return_tensors="pt").to(device)
            hidden = model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            parts.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).cpu())
        return torch.cat(parts)

    def fit_predict(self, train: torch.Tensor, labels: list[str], test: torch.Tensor) -> list[str]:
        classes = sorted(set(labels))
        if self.method == "prototype":
            prototypes = torch.stack([train[[i for i, y in enumerate(labels) if y == c]].mean(0) for c in classes])
            nearest = (test @ torch.nn.functional.normalize(prototypes, dim=-1).T).argmax(1)
            return [classes[i] for i in nearest.tolist()]
        try:
            from sklearn.linear_model import LogisticRegression
        except ImportError:
            raise MergebenchError("the logreg probe needs scikit-learn (pip install scikit-learn)") from None
        probe = LogisticRegression(max_iter=2000).fit(train.double().numpy(), labels)
        return list(probe.predict(test.double().numpy()))
