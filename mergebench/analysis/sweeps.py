"""Parameter sweeps: every point of a grid merged in one streaming pass, then evaluated point by point.

The recipe is expanded once: nodes downstream of a swept parameter are copied per grid point, the rest
is shared, and every point's outputs become outputs of one run, so each input tensor is read once for
the whole sweep. An evaluator (a shell command printing a JSON object on its last line, or a Python
callable) scores each point; ``results.csv`` and a plot collect them. A failing point is reported and
the sweep goes on.
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import re
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

from mergebench.engine.executor import execute
from mergebench.engine.graph import Graph
from mergebench.engine.pipeline import DictSink
from mergebench.engine.runner import RunOptions, resolve_device, run_recipe
from mergebench.errors import MergebenchError
from mergebench.recipe import MEMORY_PATH, Recipe, build_recipe, read_recipe_data

Evaluator = Callable[[Path], dict[str, float]]
GRID_TOLERANCE = Decimal("1e-9")
# Every point is a merged checkpoint on disk: a grid past this many points is almost always a typo in
# STEP (0:1:1e-9 is a billion points). ``max_points`` raises it for a sweep that really means it.
MAX_GRID_POINTS = 1000


def parse_grid(spec: str, max_points: int = MAX_GRID_POINTS) -> tuple[str, list[Any]]:
    """``node.param=a:b:step`` (b included when on the grid, within 1e-9) or ``node.param=v1,v2,...``.

    The number of points is counted before any is built; more than ``max_points`` is an error.
    """
    target, eq, values = spec.partition("=")
    if not eq or "." not in target or not values.strip():
        raise MergebenchError(f"--grid {spec}: expected NODE.PARAM=START:STOP:STEP or NODE.PARAM=V1,V2,...")
    parts = values.split(":")
    if len(parts) == 3:
        try:
            start, stop, step = (Decimal(p) for p in parts)
        except InvalidOperation:
            raise MergebenchError(f"--grid {spec}: START:STOP:STEP must be numbers") from None
        if not all(v.is_finite() for v in (start, stop, step)):
            raise MergebenchError(f"--grid {spec}: START:STOP:STEP must be finite numbers")
        if step <= 0:
            raise MergebenchError(f"--grid {spec}: STEP must be positive")
        if stop < start:
            raise MergebenchError(f"--grid {spec}: STOP is below START (the range is empty)")
        count = int((stop - start) / step + GRID_TOLERANCE) + 1  # STOP counts when within 1e-9 steps of it
        _check_count(spec, count, max_points)
        return target.strip(), [float(start + i * step) for i in range(count)]
    items = values.split(",")
    if any(not item.strip() for item in items):
        raise MergebenchError(f"--grid {spec}: an empty value in the list")
    _check_count(spec, len(items), max_points)
    try:
        return target.strip(), [yaml.safe_load(v) for v in items]
    except yaml.YAMLError as exc:
        raise MergebenchError(f"--grid {spec}: a value is not valid YAML ({_yaml_problem(exc)})") from None


def _check_count(what: str, count: int, max_points: int) -> None:
    if count > max_points:
        raise MergebenchError(f"--grid {what}: {count} points, more than the limit of {max_points} (each is a "
                              f"checkpoint on disk; raise the limit with --max-points if you mean it)")


def grid_size(grid: dict[str, list[Any]], max_points: int = MAX_GRID_POINTS) -> int:
    """The number of points of the whole grid (the product of the axes), refused above ``max_points``."""
    count = 1
    for values in grid.values():
        count *= len(values)
    _check_count(" ".join(f"{t}=<{len(v)} values>" for t, v in grid.items()), count, max_points)
    return count


def _yaml_problem(exc: yaml.YAMLError) -> str:
    return getattr(exc, "problem", None) or str(exc).splitlines()[0]


@dataclass
class SweepPoint:
    index: int
    params: dict[str, Any]
    outputs: list[Path]
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def expand(data: dict[str, Any], grid: dict[str, list[Any]], out_dir: Path) -> tuple[dict[str, Any], list[SweepPoint]]:
    """One recipe holding every grid point: swept nodes and their descendants copied per point."""
    nodes: dict[str, Any] = data.get("nodes") or {}
    for target in grid:
        node = target.split(".", 1)[0]
        if node not in nodes:
            raise MergebenchError(f"--grid {target}: the recipe has no node '{node}'")
    swept = {t.split(".", 1)[0] for t in grid}
    downstream = _descendants(nodes, swept)
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    expanded = copy.deepcopy(data)
    expanded["nodes"] = {name: spec for name, spec in nodes.items() if name not in downstream}
    expanded["outputs"] = []  # a sweep writes the outputs of its points only
    points = []
    for index, combo in enumerate(combos):
        label = f"p{index:03d}-" + "-".join(f"{_slug(t)}={v}" for t, v in combo.items())
        rename = {name: f"{name}@{index}" for name in downstream}
        for name in downstream:
            spec = copy.deepcopy(nodes[name])
            spec["inputs"] = {slot: _renamed(ref, rename) for slot, ref in (spec.get("inputs") or {}).items()}
            expanded["nodes"][rename[name]] = spec
        for target, value in combo.items():
            node, param = target.split(".", 1)
            expanded["nodes"][rename[node]].setdefault("params", {})[param] = value
        paths = []
        swept_outputs = [o for o in data.get("outputs", []) if o.get("from") in downstream]
        for i, output in enumerate(swept_outputs):
            path = out_dir / label if len(swept_outputs) == 1 else out_dir / label / f"output-{i}"
            expanded["outputs"].append({**output, "from": rename[output["from"]], "path": str(path.resolve())})
            paths.append(path)
        if not paths:
            raise MergebenchError("no output of the recipe depends on the swept nodes")
        points.append(SweepPoint(index, combo, paths))
    return expanded, points


def _descendants(nodes: dict[str, Any], roots: set[str]) -> set[str]:
    found = set(roots)
    changed = True
    while changed:
        changed = False
        for name, spec in nodes.items():
            refs = [r for ref in (spec.get("inputs") or {}).values() for r in (ref if isinstance(ref, list) else [ref])]
            if name not in found and any(r in found for r in refs):
                found.add(name)
                changed = True
    return found


def _renamed(ref: Any, rename: dict[str, str]) -> Any:
    return [rename.get(r, r) for r in ref] if isinstance(ref, list) else rename.get(ref, ref)


def _slug(target: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", target)


def run_sweep(
    recipe_path: str | Path,
    grid: dict[str, list[Any]],
    out_dir: str | Path,
    evaluate: Evaluator | str | None = None,
    device: str = "auto",
    force: bool = False,
    plot: bool = True,
    executor: str = "local",
    address: str | None = None,
    resources: dict[str, float] | None = None,
    max_points: int = MAX_GRID_POINTS,
    keep: bool = True,
) -> list[SweepPoint]:
    """Merge every grid point (one pass when it can), evaluate each, write results.csv and sweep.png.

    With built-in evaluators and ``keep=False``, each point is merged into memory and scored there, one
    point at a time: no checkpoint is written (each point reads the inputs again; for models that fit in
    memory).

    ``executor="ray"``: each point, its merge then its evaluation, is a Ray task needing ``resources``
    (``num_cpus``, ``num_gpus``); the outputs folder must be on storage the cluster's nodes share.
    ``evaluate`` is a callable, a command with ``{out}`` or built-in evaluator specs (``ppl:FILE``, ...;
    several joined by spaces: mergebench.evaluation).
    """
    recipe_path, out_dir = Path(recipe_path), Path(out_dir)
    if isinstance(evaluate, str) and "{out}" not in evaluate:
        evaluate = built_in(evaluate.split(), device)
    grid_size(grid, max_points)
    data, lines = read_recipe_data(recipe_path, mergekit_out="merged")
    expanded, points = expand(data, grid, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_dir = recipe_path.resolve().parent

    def single_point(point: SweepPoint) -> Recipe:
        paths = [str(path.resolve()) for path in point.outputs]
        return point_recipe(data, lines, recipe_path, point.params, out_dir, paths)

    if isinstance(evaluate, BuiltIn) and not keep and executor == "local":
        for point in points:
            score_in_memory(point, data, lines, recipe_path, out_dir, evaluate, device)
    elif executor == "ray":
        run_points_on_ray(points, [single_point(p) for p in points], evaluate, device, force, address,
                           resources or {})
    elif executor != "local":
        raise MergebenchError(f"--executor {executor}: expected local or ray")
    else:
        try:
            run_recipe(build_recipe(expanded, recipe_path, lines, {}, base_dir=base_dir),
                       RunOptions(device=device, force=force))
        except MergebenchError:  # find the failing points: run them one at a time
            for point in points:
                point.error = merge_point(single_point(point), device, force)
        if evaluate is not None:
            for point in points:
                if point.error is None:
                    evaluate_point(point, evaluate)
    write_results(points, out_dir / "results.csv")
    if plot and evaluate is not None and any(p.metrics for p in points):
        plot_results(points, out_dir / "sweep.png")
    return points


def point_recipe(data: dict[str, Any], lines: dict, recipe_path: Path, params: dict[str, Any], out_dir: Path,
                 paths: list[str]) -> Recipe:
    """The recipe at one point: the swept parameters set, its outputs depending on them written to ``paths``."""
    single, _ = expand(data, {target: [value] for target, value in params.items()}, out_dir)
    single["outputs"] = [{**output, "path": path} for output, path in zip(single["outputs"], paths)]
    return build_recipe(single, recipe_path, lines, {}, base_dir=recipe_path.resolve().parent)


def score_in_memory(point: SweepPoint, data: dict[str, Any], lines: dict, recipe_path: Path, out_dir: Path,
                     evaluate: BuiltIn, device: str) -> None:
    """Merge one point into memory and score its weights in the architecture of the output's primary model."""
    point.outputs = [Path(MEMORY_PATH)]
    try:
        graph = Graph(point_recipe(data, lines, recipe_path, point.params, out_dir, [MEMORY_PATH]))
        sink = DictSink()
        execute(graph, [sink], resolve_device(device))
        folder = graph.sources[graph.outputs[0].primary].folder
        point.metrics = {k: float(v) for k, v in evaluate.on_weights(sink.values, folder).items()}
    except MergebenchError as exc:
        point.error = str(exc)


def merge_point(recipe: Recipe, device: str, force: bool) -> str | None:
    """Merge one point; the error to report, if any."""
    try:
        run_recipe(recipe, RunOptions(device=device, force=force))
    except MergebenchError as exc:
        return f"merge failed: {exc}"
    return None


def _point_task(point: SweepPoint, recipe: Recipe, evaluate: Evaluator | str | None, device: str,
                force: bool) -> SweepPoint:
    """One point on a Ray worker: its merge, then its evaluation."""
    point.error = merge_point(recipe, device, force)
    if point.error is None and evaluate is not None:
        evaluate_point(point, evaluate)
    return point


def run_points_on_ray(points: list[SweepPoint], recipes: list[Recipe], evaluate: Evaluator | str | None,
                       device: str, force: bool, address: str | None, resources: dict[str, float]) -> None:
    from mergebench.engine.ray_executor import connect

    ray = connect(address)
    task = ray.remote(**resources)(_point_task)
    done = ray.get([task.remote(point, recipe, evaluate, device, force) for point, recipe in zip(points, recipes)])
    for point, result in zip(points, done):
        point.metrics, point.error = result.metrics, result.error


@dataclass(frozen=True)
class BuiltIn:
    """mergebench's built-in evaluators (mergebench.evaluation) as a sweep's evaluator: on a written point,
    or on a point's weights in memory."""

    specs: tuple[str, ...]
    device: str

    def __call__(self, path: Path) -> dict[str, float]:
        from mergebench.evaluation import evaluate

        return evaluate(path, self.specs, self.device)

    def on_weights(self, state: dict[str, Any], folder: Path) -> dict[str, float]:
        from mergebench.evaluation import evaluate_state

        return evaluate_state(state, folder, self.specs, self.device)


def built_in(specs: list[str], device: str) -> BuiltIn:
    """Built-in evaluator specs, each checked now (before any merge)."""
    from mergebench.evaluation import parse_spec

    for spec in specs:
        parse_spec(spec)
    return BuiltIn(tuple(specs), "cpu" if device == "auto" else device)


def evaluate_point(point: SweepPoint, evaluate: Evaluator | str) -> None:
    """Score one merged point: a callable, or a command with {out} whose last line is a JSON object."""
    if callable(evaluate):
        try:
            point.metrics = {k: float(v) for k, v in evaluate(point.outputs[0]).items()}
        except Exception as exc:  # a user's evaluator: report it and go on with the sweep
            point.error = f"evaluator failed: {type(exc).__name__}: {exc}"
        return
    command = evaluate.replace("{out}", shlex.quote(str(point.outputs[0])))
    done = subprocess.run(command, shell=True, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not lines:
        point.error = f"eval exited {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}"
        return
    try:
        metrics = json.loads(lines[-1])
        point.metrics = {k: float(v) for k, v in metrics.items()}
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        point.error = f"eval's last line is not a JSON object of numbers: {lines[-1][:200]!r}"


def write_results(points: list[SweepPoint], path: Path) -> None:
    params = list(dict.fromkeys(k for p in points for k in p.params))
    metrics = list(dict.fromkeys(k for p in points for k in p.metrics))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["point", *params, *metrics, "output", "error"])
        for p in points:
            writer.writerow([p.index, *(p.params.get(k, "") for k in params), *(p.metrics.get(k, "") for k in metrics),
                             str(p.outputs[0]), p.error or ""])


def plot_results(points: list[SweepPoint], path: Path) -> None:
    """One metric: metric against the (first) swept parameter. Two or more: the first two against each
    other, each point labelled with its parameters (the WiSE-FT robustness curve)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MergebenchError("the plot needs matplotlib: pip install 'mergebench[plot]'") from None
    done = [p for p in points if p.metrics]
    metrics = list(dict.fromkeys(k for p in done for k in p.metrics))
    param = next(iter(done[0].params))
    fig, ax = plt.subplots(figsize=(6, 4))
    if len(metrics) >= 2:
        xs, ys = [p.metrics.get(metrics[0]) for p in done], [p.metrics.get(metrics[1]) for p in done]
        ax.plot(xs, ys, marker="o")
        for p, x, y in zip(done, xs, ys):
            ax.annotate(", ".join(f"{v}" for v in p.params.values()), (x, y), fontsize=7)
        ax.set_xlabel(metrics[0])
        ax.set_ylabel(metrics[1])
    else:
        ax.plot([p.params[param] for p in done], [p.metrics[metrics[0]] for p in done], marker="o")
        ax.set_xlabel(param)
        ax.set_ylabel(metrics[0])
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
