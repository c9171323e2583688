"""Vocabulary surgery: merge models whose tokenizers differ by aligning embedding rows by token string.

Fine-tunes often add tokens (chat markers, pad tokens, domain words), so their embedding matrices
have more rows than the base, in an order only the tokenizer knows. With a recipe-level
``tokenizer: {source: base | union | MODEL}`` the output vocabulary is chosen first; then, before any
operator sees them, the rows of every embedding-like tensor of every input are rearranged to that
vocabulary. A token an input lacks takes the base's row if the base has the token, else the mean of
the rows of the inputs that have it, else zeros — or, where ``tokens`` names a model for it, that
model's row (with ``force``, in every input, so that the merge returns that row). The output's
tokenizer files and ``vocab_size`` follow the chosen vocabulary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from mergebench.errors import MergebenchError

EMBEDDING_KEYS = r"(?:^|\.)(?:embed_tokens|word_embeddings|wte|lm_head|shared|embed_out)\.weight$"
FALLBACK_RULE = "a token an input lacks takes the base's row, else the mean of the inputs that have it, else zeros"


@dataclass(frozen=True)
class VocabPlan:
    """The output vocabulary and, for each input model, where each output token's row comes from."""

    source: str
    tokens: tuple[str, ...]
    size: int  # rows of the output embeddings (tokens, padded)
    base: str
    rows: dict[str, torch.Tensor]  # model -> int64 row per output token (-1: the model lacks it)
    vocab_sizes: dict[str, int]
    embedding_pattern: re.Pattern[str]
    token_sources: dict[int, tuple[str, bool]] = field(default_factory=dict)  # output row -> (model, force)

    def is_embedding(self, key: str, model: str, shape: tuple[int, ...]) -> bool:
        return bool(self.embedding_pattern.search(key)) and len(shape) >= 1 and shape[0] == self.vocab_sizes[model]

    def align(self, key: str, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every model's rows of one embedding tensor, rearranged to the output vocabulary (stored dtype)."""
        present = {m: self.rows[m] >= 0 for m in raw}
        have = torch.stack([present[m] for m in raw]).float().sum(0)
        summed = None
        for model, tensor in raw.items():
            rows = self.rows[model].clamp(min=0)
            contribution = tensor.float()[rows] * present[model].unsqueeze(1).float()
            summed = contribution if summed is None else summed.add_(contribution)
        mean = summed / have.clamp(min=1).unsqueeze(1)
        if self.base in raw:
            base_rows = self.rows[self.base]
            fallback = torch.where((base_rows >= 0).unsqueeze(1), raw[self.base].float()[base_rows.clamp(min=0)], mean)
        else:
            fallback = mean
        aligned = {}
        for model, tensor in raw.items():
            rows = self.rows[model].clamp(min=0)
            own = torch.where(present[model].unsqueeze(1), tensor.float()[rows], fallback)
            for row, (source, force) in self.token_sources.items():
                if source in raw and (force or not bool(present[model][row])):
                    own[row] = raw[source].float()[self.rows[source][row]]
            padded = torch.zeros((self.size, *tensor.shape[1:]), dtype=torch.float32)
            padded[: len(self.tokens)] = own
            aligned[model] = padded.to(tensor.dtype)
        return aligned


def plan_vocab(source: str, base: str, vocabs: dict[str, list[str]], pad_to_multiple_of: int | None,
               embeddings: str | None, token_sources: dict[str, tuple[str, bool]] | None = None) -> VocabPlan:
    """Choose the output vocabulary: the base's, a model's, or the union (base order, then new tokens
    in the order of the models and of their ids); ``token_sources``: token -> (model, force)."""
    if source == "union":
        tokens = list(vocabs[base])
        seen = set(tokens)
        for vocab in vocabs.values():
            for token in vocab:
                if token not in seen:
                    tokens.append(token)
                    seen.add(token)
    else:
        tokens = list(vocabs[base if source == "base" else source])
    size = len(tokens)
    if pad_to_multiple_of:
        size = -(-size // pad_to_multiple_of) * pad_to_multiple_of
    rows = {}
    for model, vocab in vocabs.items():
        index = {token: i for i, token in enumerate(vocab)}
        rows[model] = torch.tensor([index.get(token, -1) for token in tokens], dtype=torch.int64)
    index = {token: i for i, token in enumerate(tokens)}
    chosen = {}
    for token, (model, force) in (token_sources or {}).items():
        if token not in index:
            raise MergebenchError(f"tokenizer.tokens: {token!r} is not in the output vocabulary ({source})")
        if model not in rows or int(rows[model][index[token]]) < 0:
            raise MergebenchError(f"tokenizer.tokens: {token!r} takes its rows from '{model}', whose vocabulary "
                                  f"lacks it")
        chosen[index[token]] = (model, force)
    return VocabPlan(source, tuple(tokens), size, base, rows, {m: len(v) for m, v in vocabs.items()},
                     re.compile(embeddings or EMBEDDING_KEYS), chosen)


def first_difference(vocabs: dict[str, list[str]]) -> str | None:
    """A readable account of the first tokens that differ between vocabularies, or None if all agree."""
    names = list(vocabs)
    reference = vocabs[names[0]]
    for name in names[1:]:
        other = vocabs[name]
        if other == reference:
            continue
        for i, (a, b) in enumerate(zip(reference, other)):
            if a != b:
                return f"id {i} is {a!r} in '{names[0]}' but {b!r} in '{name}'"
        longer, shorter = (name, names[0]) if len(other) > len(reference) else (names[0], name)
        extra = (other if len(other) > len(reference) else reference)[min(len(other), len(reference)):]
        return f"'{longer}' has {len(extra)} tokens '{shorter}' lacks, first {extra[:3]!r}"
    return None
