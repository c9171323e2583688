"""A model folder's tokenizer files: the vocabulary read from ``tokenizer.json``, and the output's
tokenizer written for the vocabulary that vocabulary surgery chose (mergebench.surgery.vocab)."""

from __future__ import annotations

import json
from pathlib import Path

from mergebench.errors import MergebenchError
from mergebench.io.reading import read_json_object, read_text
from mergebench.surgery.vocab import VocabPlan

TOKENIZER_FILE = "tokenizer.json"


def read_vocab(folder: Path) -> list[str]:
    """Token strings by id, from a fast tokenizer's ``tokenizer.json`` (model vocabulary + added tokens)."""
    path = folder / TOKENIZER_FILE
    doc = read_json_object(path, "tokenizer file")
    by_id: dict[int, str] = {}
    vocab = (doc.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        by_id.update({int(i): token for token, i in vocab.items()})
    elif isinstance(vocab, list):  # Unigram: [[token, score], ...] in id order
        by_id.update({i: entry[0] for i, entry in enumerate(vocab)})
    else:
        raise MergebenchError(f"{path}: no model vocabulary in the tokenizer")
    for added in doc.get("added_tokens") or []:
        by_id[int(added["id"])] = added["content"]
    if sorted(by_id) != list(range(len(by_id))):
        raise MergebenchError(f"{path}: token ids are not 0..{len(by_id) - 1}")
    return [by_id[i] for i in range(len(by_id))]


def write_tokenizer(plan: VocabPlan, folders: dict[str, Path], dest: Path) -> None:
    """The output's tokenizer files: the chosen model's for ``base`` or a model; for ``union`` the base's
    tokenizer with the new tokens appended as added tokens (special flags kept from where they came)."""
    owner = plan.base if plan.source in ("base", "union") else plan.source
    for name in (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json"):
        if (folders[owner] / name).exists():
            (dest / name).write_text(read_text(folders[owner] / name, "tokenizer file"))
    if plan.source != "union" or len(plan.tokens) == plan.vocab_sizes[plan.base]:
        return
    added = {}
    for folder in folders.values():
        if (folder / TOKENIZER_FILE).exists():
            for entry in read_json_object(folder / TOKENIZER_FILE, "tokenizer file").get("added_tokens") or []:
                added.setdefault(entry["content"], entry)
    doc = json.loads((dest / TOKENIZER_FILE).read_text())
    new_entries = []
    for i in range(plan.vocab_sizes[plan.base], len(plan.tokens)):
        token = plan.tokens[i]
        template = added.get(token, {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True,
                                     "special": False})
        new_entries.append({**template, "id": i, "content": token})
    doc["added_tokens"] = [*(doc.get("added_tokens") or []), *new_entries]
    (dest / TOKENIZER_FILE).write_text(json.dumps(doc, ensure_ascii=False, indent=2))
    config_path = dest / "tokenizer_config.json"
    if config_path.exists():
        config = read_json_object(config_path, "tokenizer config")
        if isinstance(config.get("added_tokens_decoder"), dict):
            for entry in new_entries:
                config["added_tokens_decoder"][str(entry["id"])] = {k: v for k, v in entry.items() if k != "id"}
            config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2))
