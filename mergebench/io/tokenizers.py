"""A model folder's tokenizer files: the vocabulary read from ``tokenizer.json`` (or, for a SentencePiece-only
folder, from ``tokenizer.model`` through the ``sentencepiece`` library, with the added tokens its
``added_tokens.json`` and ``tokenizer_config.json`` list), and the output's tokenizer written for the
vocabulary that vocabulary surgery chose (mergebench.surgery.vocab). A union vocabulary over a
SentencePiece-only tokenizer is written as a ``tokenizer.json`` that ``transformers`` converts it to."""

from __future__ import annotations

import json
from pathlib import Path

from mergebench.errors import MergebenchError
from mergebench.io.reading import read_json_object, require_regular_file
from mergebench.surgery.vocab import VocabPlan

TOKENIZER_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"
COPIED = (TOKENIZER_FILE, SENTENCEPIECE_FILE, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def has_tokenizer(folder: Path) -> bool:
    return (folder / TOKENIZER_FILE).exists() or (folder / SENTENCEPIECE_FILE).exists()


def read_vocab(folder: Path) -> list[str]:
    """Token strings by id: a fast tokenizer's ``tokenizer.json`` (model vocabulary + added tokens), else a
    SentencePiece ``tokenizer.model`` with its added tokens."""
    path = folder / TOKENIZER_FILE
    if not path.exists():
        return _sentencepiece_vocab(folder)
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


def _sentencepiece_vocab(folder: Path) -> list[str]:
    """Pieces by id from ``tokenizer.model``, then the added tokens (``added_tokens.json``: token -> id;
    ``tokenizer_config.json``: ``added_tokens_decoder``, id -> {content})."""
    try:
        import sentencepiece
    except ImportError:
        raise MergebenchError(f"{folder}: reading its SentencePiece tokenizer needs the sentencepiece package "
                              f"(pip install sentencepiece)") from None
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(folder / SENTENCEPIECE_FILE))
    except (OSError, RuntimeError) as exc:
        raise MergebenchError(f"{folder / SENTENCEPIECE_FILE}: not a SentencePiece model ({exc})") from None
    by_id = {i: processor.IdToPiece(i) for i in range(processor.GetPieceSize())}
    if (folder / "added_tokens.json").exists():
        by_id.update({int(i): token for token, i in read_json_object(folder / "added_tokens.json",
                                                                     "added tokens").items()})
    if (folder / "tokenizer_config.json").exists():
        decoder = read_json_object(folder / "tokenizer_config.json", "tokenizer config").get("added_tokens_decoder")
        by_id.update({int(i): entry["content"] for i, entry in (decoder or {}).items()})
    if sorted(by_id) != list(range(len(by_id))):
        raise MergebenchError(f"{folder}: token ids are not 0..{len(by_id) - 1} (SentencePiece and added tokens)")
    return [by_id[i] for i in range(len(by_id))]


def _converted_tokenizer(folder: Path) -> str:
    """The ``tokenizer.json`` that ``transformers`` converts a slow (SentencePiece) tokenizer folder into."""
    try:
        import transformers
    except ImportError:
        raise MergebenchError(f"{folder}: writing a union vocabulary over its SentencePiece tokenizer converts it "
                              f"with transformers (pip install transformers sentencepiece)") from None
    try:
        return transformers.AutoTokenizer.from_pretrained(folder).backend_tokenizer.to_str()
    except (OSError, ValueError, AttributeError, ImportError) as exc:
        raise MergebenchError(f"{folder}: transformers could not convert its tokenizer ({exc})") from None


def write_tokenizer(plan: VocabPlan, folders: dict[str, Path], dest: Path) -> None:
    """The output's tokenizer files: the chosen model's for ``base`` or a model; for ``union`` the base's
    tokenizer with the new tokens appended as added tokens (special flags kept from where they came)."""
    owner = plan.base if plan.source in ("base", "union") else plan.source
    for name in COPIED:
        source = folders[owner] / name
        if source.exists():
            require_regular_file(source, "tokenizer file")
            (dest / name).write_bytes(source.read_bytes())
    if plan.source != "union" or len(plan.tokens) == plan.vocab_sizes[plan.base]:
        return
    if not (dest / TOKENIZER_FILE).exists():
        (dest / TOKENIZER_FILE).write_text(_converted_tokenizer(folders[owner]))
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


TEMPLATE_FILE = "chat_template.jinja"


def read_chat_template(folder: Path | None) -> str | None:
    """A model's chat template: ``chat_template.jinja``, else ``chat_template.json``'s, else the
    ``chat_template`` of ``tokenizer_config.json`` (its ``default`` entry when it names several)."""
    if folder is None:
        return None
    if (folder / TEMPLATE_FILE).exists():
        require_regular_file(folder / TEMPLATE_FILE, "chat template")
        return (folder / TEMPLATE_FILE).read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        if (folder / name).exists():
            template = read_json_object(folder / name, "tokenizer file").get("chat_template")
            if isinstance(template, list):  # [{name, template}, ...]
                named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
                template = named.get("default", next(iter(named.values()), None))
            if isinstance(template, str):
                return template
    return None


def write_chat_template(dest: Path, template: str) -> None:
    """The output's chat template, as ``chat_template.jinja`` and in its ``tokenizer_config.json`` if it has one."""
    (dest / TEMPLATE_FILE).write_text(template)
    config_path = dest / "tokenizer_config.json"
    if config_path.exists():
        config = read_json_object(config_path, "tokenizer config")
        config["chat_template"] = template
        config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2))

