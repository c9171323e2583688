"""Search over merge parameters with Optuna: each trial a merge and an evaluation, the study in SQLite.

``mergebench search RECIPE --space merge.density=0.1:0.9 --eval ppl:val.txt --trials 40`` asks Optuna's
sampler (TPE, or CMA-ES for one objective) for parameters, merges the recipe with them into
``OUT/trial-N`` (removed after its evaluation unless ``keep``; built-in evaluators score it in memory
instead, without writing it), evaluates it, and tells the study. The
study lives in ``OUT/study.db``: a killed search resumes where it stopped and runs only the trials still
missing. ``OUT/trials.csv`` is rewritten after every trial; the best parameters are written as a plain
recipe (``OUT/best.yaml``); two objectives give their Pareto front (``OUT/pareto.png``).
"""

from __future__ import annotations

import copy
import csv
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mergebench.analysis.sweeps import (
    BuiltIn,
    Evaluator,
    SweepPoint,
    built_in,
    evaluate_point,
    expand,
    merge_point,
    point_recipe,
    run_points_on_ray,
    score_in_memory,
)
from mergebench.errors import MergebenchError
from mergebench.io.output_guard import check_replaceable
from mergebench.recipe import read_recipe_data

SAMPLERS = ("tpe", "cmaes")
MINIMISED = ("ppl", "loss", "error")  # metrics that get better as they fall, when no direction is given


@dataclass(frozen=True)
class Space:
    target: str  # node.param
    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str  # minimize or maximize


def parse_space(spec: str) -> Space:
    """``node.param=LOW:HIGH`` (``:log`` for a log-uniform range)."""
    target, eq, bounds = spec.partition("=")
    parts = bounds.split(":")
    if not eq or "." not in target or len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
        raise MergebenchError(f"--space {spec}: expected NODE.PARAM=LOW:HIGH or NODE.PARAM=LOW:HIGH:log")
    try:
        low, high = float(parts[0]), float(parts[1])
    except ValueError:
        raise MergebenchError(f"--space {spec}: LOW and HIGH must be numbers") from None
    if not low < high or (len(parts) == 3 and low <= 0):
        raise MergebenchError(f"--space {spec}: needs LOW < HIGH (and LOW > 0 for log)")
    return Space(target.strip(), low, high, len(parts) == 3)


def parse_objective(spec: str) -> Objective:
    """``METRIC`` or ``METRIC:min`` / ``METRIC:max``; without one, perplexities and losses are minimised."""
    metric, _, direction = spec.partition(":")
    if direction not in ("", "min", "max"):
        raise MergebenchError(f"--objective {spec}: the direction is min or max")
    if not direction:
        direction = "min" if any(word in metric for word in MINIMISED) else "max"
    return Objective(metric, "minimize" if direction == "min" else "maximize")


@dataclass
class SearchResult:
    trials: list[dict[str, Any]]  # number, params, metrics, state
    best: list[dict[str, Any]]  # the best trial, or the Pareto front for several objectives
    best_recipe: Path | None


@dataclass(frozen=True)
class Parallel:
    """Trials side by side on Ray: ``trials`` asked at once, each merged and scored by a task."""

    trials: int = 1
    address: str | None = None
    resources: dict[str, float] | None = None


def run_search(recipe_path: str | Path, spaces: list[Space], out_dir: str | Path, evaluate: Evaluator | str,
               objectives: list[Objective], trials: int, sampler: str = "tpe", seed: int = 0, device: str = "auto",
               keep: bool = False, ray: Parallel | None = None) -> SearchResult:
    """Run the study to ``trials`` completed trials (resuming one already in ``out_dir``); with ``ray``,
    ``ray.trials`` at a time as Ray tasks (each writes its trial's model, removed once scored unless ``keep``)."""
    optuna = _optuna()
    if sampler not in SAMPLERS:
        raise MergebenchError(f"--sampler {sampler}: expected {' or '.join(SAMPLERS)}")
    if sampler == "cmaes" and len(objectives) > 1:
        raise MergebenchError("CMA-ES optimises one objective; use tpe for two")
    if not objectives or not spaces:
        raise MergebenchError("a search needs at least one --space and one --objective")
    recipe_path, out_dir = Path(recipe_path), Path(out_dir)
    if isinstance(evaluate, str) and "{out}" not in evaluate:
        evaluate = built_in(evaluate.split(), device)
    data, lines = read_recipe_data(recipe_path, mergekit_out="merged")
    expand(data, {s.target: [s.low] for s in spaces}, out_dir)  # the targets name nodes of the recipe
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = optuna.samplers.TPESampler(seed=seed) if sampler == "tpe" else optuna.samplers.CmaEsSampler(seed=seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="mergebench", storage=f"sqlite:///{out_dir / 'study.db'}",
                                load_if_exists=True, directions=[o.direction for o in objectives], sampler=chosen)
    complete = optuna.trial.TrialState.COMPLETE
    in_memory = isinstance(evaluate, BuiltIn) and not keep and ray is None

    def written(point: SweepPoint) -> Any:  # the trial's recipe, its model written to its trial folder
        return point_recipe(data, lines, recipe_path, point.params, out_dir, [str(point.outputs[0].resolve())])

    while (done := len(study.get_trials(states=(complete,)))) < trials:
        asked = [study.ask() for _ in range(min(ray.trials if ray else 1, trials - done))]
        points = [SweepPoint(t.number, {s.target: t.suggest_float(s.target, s.low, s.high, log=s.log)
                                        for s in spaces}, [out_dir / f"trial-{t.number:03d}"]) for t in asked]
        if in_memory:
            score_in_memory(points[0], data, lines, recipe_path, out_dir, evaluate, device)
        elif ray is not None:
            recipes = [written(point) for point in points]
            run_points_on_ray(points, recipes, evaluate, device, True, ray.address, ray.resources or {})
        else:
            point = points[0]
            point.error = merge_point(written(point), device, True)
            if point.error is None:
                evaluate_point(point, evaluate)
        for trial, point in zip(asked, points):
            _tell(study, trial, point, objectives)
            if not keep and not in_memory and point.outputs[0].exists():
                check_replaceable(point.outputs[0], artifact=False)  # only what the merge wrote goes
                shutil.rmtree(point.outputs[0], ignore_errors=True)
        _write_trials(study, out_dir / "trials.csv")
    return _finish(study, data, recipe_path, out_dir, objectives)


def _tell(study: Any, trial: Any, point: SweepPoint, objectives: list[Objective]) -> None:
    """The trial's objectives to the study (every metric kept on the trial); a failed trial stops the search."""
    missing = [o.metric for o in objectives if o.metric not in point.metrics]
    if point.error is not None or missing:
        study.tell(trial, state=_optuna().trial.TrialState.FAIL)
        reason = point.error or f"the evaluation gave no {missing[0]} (it gave {', '.join(point.metrics)})"
        raise MergebenchError(f"trial {trial.number} ({point.params}): {reason}")
    for name, value in point.metrics.items():
        trial.set_user_attr(name, value)
    study.tell(trial, [point.metrics[o.metric] for o in objectives])


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise MergebenchError("search uses Optuna: pip install 'mergebench[search]'") from None
    return optuna


def _write_trials(study: Any, path: Path) -> None:
    rows = study.get_trials(deepcopy=False)
    params = list(dict.fromkeys(k for t in rows for k in t.params))
    metrics = list(dict.fromkeys(k for t in rows for k in t.user_attrs))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", *params, *metrics, "state"])
        for t in rows:
            writer.writerow([t.number, *(t.params.get(k, "") for k in params),
                             *(t.user_attrs.get(k, "") for k in metrics), t.state.name])


def _finish(study: Any, data: dict[str, Any], recipe_path: Path, out_dir: Path,
            objectives: list[Objective]) -> SearchResult:
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    trials = [{"number": t.number, "params": dict(t.params), "metrics": dict(t.user_attrs)} for t in done]
    best = study.best_trials if len(objectives) > 1 else [study.best_trial]
    recipe = copy.deepcopy(data)
    for target, value in best[0].params.items():
        node, param = target.split(".", 1)
        recipe["nodes"][node].setdefault("params", {})[param] = value
    recipe["models"] = _absolute(recipe.get("models") or {}, recipe_path.resolve().parent)
    best_recipe = out_dir / "best.yaml"
    best_recipe.write_text(yaml.safe_dump(recipe, sort_keys=False))
    if len(objectives) == 2:
        _plot_pareto(done, best, objectives, out_dir / "pareto.png")
    summary = [{"number": t.number, "params": dict(t.params), "metrics": dict(t.user_attrs)} for t in best]
    return SearchResult(trials, summary, best_recipe)


def _absolute(models: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Model paths resolved against the recipe's folder, so the best recipe runs from anywhere."""

    def resolve(path: str) -> str:
        return str((base_dir / path).resolve()) if (base_dir / path).exists() else path

    result: dict[str, Any] = {}
    for name, entry in models.items():
        if isinstance(entry, str):
            result[name] = resolve(entry)
        elif isinstance(entry, dict) and {"base", "adapter"} <= set(entry):
            result[name] = {**entry, "base": resolve(entry["base"]) if entry["base"] not in models else entry["base"],
                            "adapter": resolve(entry["adapter"])}
        else:
            result[name] = entry
    return result


def _plot_pareto(trials: list[Any], front: list[Any], objectives: list[Objective], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MergebenchError("the Pareto plot needs matplotlib: pip install 'mergebench[plot]'") from None
    x, y = objectives[0].metric, objectives[1].metric
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([t.user_attrs[x] for t in trials], [t.user_attrs[y] for t in trials], s=14, alpha=0.5,
               label="trials")
    ordered = sorted(front, key=lambda t: t.user_attrs[x])
    ax.plot([t.user_attrs[x] for t in ordered], [t.user_attrs[y] for t in ordered], marker="o", color="C3",
            label="Pareto front")
    ax.set_xlabel(f"{x} ({objectives[0].direction})")
    ax.set_ylabel(f"{y} ({objectives[1].direction})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
