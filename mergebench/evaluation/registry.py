"""Evaluator specs (``KIND:ARGUMENT``) and running several on one model folder."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch

from mergebench.errors import MergebenchError
from mergebench.io.hf_models import model_from_state


class Evaluator(Protocol):
    """Metrics of one model: ``kind`` says which model class it needs (``causal_lm`` or ``encoder``)."""

    kind: str

    def __call__(self, model: torch.nn.Module, tokenizer: object) -> dict[str, float]: ...


PERPLEXITY_OPTIONS = ("window", "stride", "max_tokens", "batch_size")
def parse_spec(spec: str) -> Evaluator:
    """``ppl:FILE``, ``mc:FILE``, ``cls:FILE`` (``cls-logreg:FILE`` for the probe) or ``lm-eval:TASK[,TASK]``.

    Perplexity takes options after the file: ``ppl:FILE?window=512&max_tokens=20000&batch_size=8``."""
    from mergebench.evaluation.choice import MultipleChoice
    from mergebench.evaluation.classification import Classification
    from mergebench.evaluation.harness import LmEval
    from mergebench.evaluation.perplexity import Perplexity

    kinds = {"ppl": lambda a: Perplexity(Path(a.partition("?")[0]), **_options(spec, a.partition("?")[2])),
             "mc": lambda a: MultipleChoice(Path(a)),
             "cls": lambda a: Classification(Path(a), "prototype"),
             "cls-logreg": lambda a: Classification(Path(a), "logreg"),
             "lm-eval": lambda a: LmEval(tuple(t for t in a.split(",") if t))}
    kind, sep, argument = spec.partition(":")
    if not sep or kind not in kinds or not argument:
        raise MergebenchError(f"evaluator '{spec}': expected KIND:ARGUMENT with KIND one of {', '.join(kinds)}")
    return kinds[kind](argument)


def _options(spec: str, query: str) -> dict[str, int]:
    options: dict[str, int] = {}
    for item in filter(None, query.split("&")):
        name, _, value = item.partition("=")
        if name not in PERPLEXITY_OPTIONS or not value.isdigit() or int(value) <= 0:
            raise MergebenchError(f"evaluator '{spec}': '{item}' is not one of {', '.join(PERPLEXITY_OPTIONS)} "
                                  f"given a positive integer")
        options[name] = int(value)
    return options


def evaluate(model: str | os.PathLike[str], specs: Iterable[str | Evaluator], device: str = "cpu",
             dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Every evaluator's metrics on the model folder ``model`` (loaded once per model class it needs)."""
    path = _model_folder(model)
    return _run(list(specs), path, lambda loader: loader.from_pretrained(path, dtype=dtype), device, path)


def evaluate_state(state: dict[str, torch.Tensor], folder: str | os.PathLike[str], specs: Iterable[str | Evaluator],
                   device: str = "cpu") -> dict[str, float]:
    """The same metrics for weights held in memory, in the architecture and tokenizer of the model folder
    ``folder`` (a merge evaluated without writing it: the sweep's points)."""
    path = _model_folder(folder)

    def build(loader: Any) -> torch.nn.Module:
        return model_from_state(loader, path, state, torch.float32)

    return _run(list(specs), path, build, device, None)


def _model_folder(model: str | os.PathLike[str]) -> Path:
    path = Path(model)
    if not (path / "config.json").is_file():
        raise MergebenchError(f"{path}: not a Hugging Face model folder (no config.json)")
    return path


def _run(specs: list[str | Evaluator], folder: Path, build: Any, device: str, written: Path | None
         ) -> dict[str, float]:
    """Each evaluator on the model ``build(loader)`` makes (once per model class); the harness needs ``written``."""
    try:
        import transformers
    except ImportError:
        raise MergebenchError("evaluation loads models with transformers: pip install transformers") from None
    transformers.utils.logging.disable_progress_bar()  # the metrics are the output
    evaluators = [parse_spec(s) if isinstance(s, str) else s for s in specs]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    loaders = {"causal_lm": transformers.AutoModelForCausalLM, "encoder": transformers.AutoModel}
    loaded: dict[str, torch.nn.Module] = {}
    found: list[dict[str, float]] = []
    for evaluator in evaluators:
        if evaluator.kind == "harness":
            if written is None:
                raise MergebenchError("lm-eval reads a model folder: keep the outputs written (--keep)")
            found.append(evaluator(written, device))
            continue
        if evaluator.kind not in loaded:
            loaded[evaluator.kind] = build(loaders[evaluator.kind]).to(device).eval()
        with torch.no_grad():
            found.append(evaluator(loaded[evaluator.kind], tokenizer))
    return _named(evaluators, found)


def _named(evaluators: list[Evaluator], found: list[dict[str, float]]) -> dict[str, float]:
    """The metrics under their own names; where two evaluators give the same name (perplexity on a target
    and on a control file), each as ``DATA.NAME``, DATA the stem of its file."""
    counts: dict[str, int] = {}
    for metrics in found:
        for name in metrics:
            counts[name] = counts.get(name, 0) + 1
    named: dict[str, float] = {}
    for evaluator, metrics in zip(evaluators, found):
        stem = Path(getattr(evaluator, "path", "")).stem or type(evaluator).__name__
        named.update({(f"{stem}.{name}" if counts[name] > 1 else name): value for name, value in metrics.items()})
    return named
