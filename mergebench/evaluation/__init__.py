"""Built-in evaluators: how good is a merged model, on the user's local data, with numbers comparable to the
tools people already use.

Each evaluator is a small class called with a loaded model and its tokenizer and returning named metrics:
``ppl:FILE`` (causal-LM perplexity), ``mc:FILE`` (multiple-choice log-likelihood accuracy, scored as
lm-evaluation-harness scores it), ``cls:FILE`` (classification accuracy of an encoder's embeddings by
class prototypes or a logistic-regression probe), ``lm-eval:TASKS`` (lm-evaluation-harness itself, when
installed and its data is local). ``mergebench eval MODEL SPEC...``, ``sweep --eval SPEC`` and Python
(``evaluate(path, specs)``) share them.
"""

from __future__ import annotations

from mergebench.evaluation.registry import evaluate, evaluate_state, parse_spec

__all__ = ["evaluate", "evaluate_state", "parse_spec"]
