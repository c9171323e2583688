"""Tied and untied output heads: a model that ties ``lm_head`` to its input embedding stores no head, so
a merge of it with a model that has its own head would find the key missing.

Such a model is read with its head materialised: ``lm_head.weight`` reads as the embedding (the same
tensor, as ``transformers`` ties them). A model counts as tied when it lacks the head that another input
has, has the embedding of the same shape, and its ``config.json`` does not say
``tie_word_embeddings: false`` (a checkpoint without its head can only be loaded tied). What the output
writes is the output's ``tie_word_embeddings`` (semantics §0.10).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from mergebench.io.checkpoint import InnerIdentity, Source
from mergebench.io.reading import read_json_object
from mergebench.io.safetensors_format import TensorInfo

HEADS = {  # word embedding key suffix -> the head that ties to it
    "embed_tokens.weight": "lm_head.weight",
    "wte.weight": "lm_head.weight",
    "embed_in.weight": "embed_out.weight",
}
HEAD_KEYS = re.compile(r"(?:^|\.)(?:lm_head|embed_out)\.weight$")


def tied_pair(keys: list[str]) -> tuple[str, str] | None:
    """(head key, embedding key) a model with these keys would tie, if it has a known word embedding."""
    for key in keys:
        for suffix, head in HEADS.items():
            if key == suffix or key.endswith("." + suffix):
                return head, key
    return None


def says_untied(folder: Path | None) -> bool:
    """Whether the model's config.json states ``tie_word_embeddings: false``."""
    if folder is None or not (folder / "config.json").is_file():
        return False
    config = read_json_object(folder / "config.json", "model config")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return config.get("tie_word_embeddings", text.get("tie_word_embeddings")) is False


class TiedHeadSource(InnerIdentity):
    """A checkpoint whose head reads as its input embedding (keys, dtypes and files otherwise its own)."""

    def __init__(self, inner: Source, head: str, embedding: str):
        self.inner = inner
        self.head, self.embedding = head, embedding
        self.label = inner.label
        self.folder = inner.folder
        self.value_type = inner.value_type

    @property
    def keys(self) -> list[str]:
        return [*self.inner.keys, self.head]

    def _own(self, key: str) -> str:
        return self.embedding if key == self.head else key

    def info(self, key: str) -> TensorInfo:
        info = self.inner.info(self._own(key))
        return TensorInfo(key, info.dtype, info.shape, info.file, info.offset, info.nbytes)

    def read(self, key: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        own = self._own(key)
        return self.inner.read(own) if buffer is None else self.inner.read(own, buffer)

    def map(self, key: str) -> torch.Tensor:
        return self.inner.map(self._own(key))

    @property
    def mappable(self) -> bool:
        return bool(getattr(self.inner, "mappable", False))



def materialise_heads(sources: Mapping[str, Source], names: list[str], everywhere: bool) -> dict[str, Source]:
    """The sources among ``names`` that lack a head another of them has (or, ``everywhere``, any head),
    wrapped to read it from their embedding; the others as they are."""
    heads = {key for name in names for key in sources[name].keys if HEAD_KEYS.search(key)}
    wrapped = dict(sources)
    for name in names:
        source = sources[name]
        pair = tied_pair(source.keys)
        if pair is None or pair[0] in source.keys or says_untied(source.folder):
            continue
        if pair[0] in heads or everywhere:
            wrapped[name] = TiedHeadSource(source, *pair)
    return wrapped
