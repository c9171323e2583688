"""A bridge to lm-evaluation-harness (``lm-eval``) for its tasks whose data is already local.

``lm-eval:TASK,TASK`` runs ``lm_eval.simple_evaluate`` with the ``hf`` model on the model folder and
returns each task's numeric metrics as ``TASK/METRIC``. Nothing here downloads: a task whose dataset is
not in the local cache fails inside lm-eval, and that failure is reported as it is.
"""

from __future__ import annotations

from pathlib import Path

from mergebench.errors import MergebenchError


class LmEval:
    kind = "harness"

    def __init__(self, tasks: tuple[str, ...]):
        if not tasks:
            raise MergebenchError("lm-eval: name at least one task (lm-eval:TASK[,TASK])")
        self.tasks = tasks

    def __call__(self, path: Path, device: str) -> dict[str, float]:
        try:
            import lm_eval
        except ImportError:
            raise MergebenchError("lm-eval:… needs lm-evaluation-harness (pip install lm-eval)") from None
        results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={path},dtype=float32",
                                          tasks=list(self.tasks), device=device)
        metrics = {}
        for task, values in (results or {}).get("results", {}).items():
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    metrics[f"{task}/{name.replace(',none', '')}"] = float(value)
        return metrics
