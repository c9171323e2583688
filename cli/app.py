"""The ``mergebench`` command: parses arguments and calls the public API, nothing more.

Heavy imports (torch, the engine) happen inside the commands so that ``mergebench --help`` is instant.
A wrong recipe or input prints one line and exits 2; anything else is a bug and exits 1.
"""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,  # help texts are plain: 'mergebench[ray]' must print as written
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Model merging and weight surgery: run YAML recipes of weight operators on safetensors checkpoints.",
)
console = Console(emoji=False)  # a path with :thumbs_up: in it is a path
errors = Console(stderr=True, emoji=False)


def _flag(*names: str, help: str) -> Any:
    """A boolean option shown without a ``<bool>`` type: it takes no value."""
    return typer.Option(*names, help=help, metavar="")

RecipeArg = Annotated[Path, typer.Argument(help="the recipe YAML file")]
SetOpt = Annotated[list[str], typer.Option("--set", help="override a parameter: NODE.PARAM=VALUE (repeatable)")]
PickleOpt = Annotated[bool, _flag("--allow-pickle", help="read pickled .bin/.pt weights, through "
                                                                "torch.load(weights_only=True)")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="the output folder of a mergekit config (which names "
                                                            "none), or of a recipe with one output")]
ExecutorOpt = Annotated[str, typer.Option(help="local, or ray: tasks on a Ray cluster (pip install "
                                               "'mergebench[ray]'); paths must be visible to every node")]
AddressOpt = Annotated[str | None, typer.Option(help="the Ray cluster: auto or HOST:PORT (default: start a local "
                                                     "one)")]


@contextmanager
def _user_errors() -> Iterator[None]:
    from mergebench.errors import MergebenchError

    try:
        yield
    except MergebenchError as exc:
        errors.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True)
        raise typer.Exit(2) from None


def _parse_sets(sets: list[str]) -> dict[str, str]:
    from mergebench.errors import MergebenchError

    parsed = {}
    for item in sets:
        target, eq, value = item.partition("=")
        if not eq or "." not in target:
            raise MergebenchError(f"--set {item}: expected NODE.PARAM=VALUE")
        parsed[target.strip()] = value
    return parsed


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000
    raise AssertionError


@app.command()
def run(
    recipe: RecipeArg,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    set_: SetOpt = None,
    force: Annotated[bool, _flag("--force", help="replace existing outputs")] = False,
    resume: Annotated[bool, _flag("--resume", help="continue an interrupted run from its partial output")
                      ] = False,
    allow_non_finite: Annotated[bool, _flag("--allow-non-finite", help="write NaN/Inf results instead of "
                                                                              "stopping")] = False,
    allow_pickle: PickleOpt = False,
    quiet: Annotated[bool, _flag("--quiet", "-q", help="no progress bar, no summary")] = False,
    as_json: Annotated[bool, _flag("--json", help="print the summary as JSON")] = False,
    executor: ExecutorOpt = "local",
    address: AddressOpt = None,
    out: OutOpt = None,
) -> None:
    """Run a recipe (or a mergekit config) and write its outputs as Hugging Face checkpoints."""
    with _user_errors():
        from mergebench.engine.runner import RunOptions, run_recipe
        from mergebench.recipe import load_recipe

        # the imports' objects (hundreds of thousands, mostly torch's) live until exit: frozen, no
        # collection scans them, during the run or at exit (where that took half a second)
        gc.freeze()
        loaded = load_recipe(recipe, _parse_sets(set_ or []), out)
        show_progress = not (quiet or as_json)
        try:
            with _Progress(show_progress) as progress:
                options = RunOptions(device=device, force=force, resume=resume, allow_non_finite=allow_non_finite,
                                     allow_pickle=allow_pickle, executor=executor, address=address)
                result = run_recipe(loaded, options, progress_factory=progress.factory)
        except KeyboardInterrupt:
            kept = ", ".join(f"{o.path}.partial" for o in loaded.outputs)
            errors.print(f"interrupted: what was written is kept ({escape(kept)}); continue with: mergebench run "
                         f"{escape(str(recipe))} --resume", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
    summary = result.summary
    if as_json:
        doc = {"outputs": result.outputs, "tensors": summary.tensors, "bytes_read": summary.bytes_read,
               "bytes_written": summary.bytes_written, "passes": summary.passes, "seconds": summary.seconds,
               "device": summary.device}
        print(json.dumps(doc, indent=2))
        return
    if quiet:
        return
    table = Table(title="written", title_justify="left")
    table.add_column("output", overflow="fold")
    for column in ("tensors", "shards", "size"):
        table.add_column(column, no_wrap=True)
    for out in result.outputs:
        table.add_row(escape(out["path"]), str(out["tensors"]), str(out["shards"]), _size(out["bytes"]))
    console.print(table)
    for out in result.outputs:
        for line in out["files_not_copied"]:
            console.print(f"not copied to {escape(out['path'])}: {escape(line)}", highlight=False)
    rate = summary.bytes_read / summary.seconds if summary.seconds else 0.0
    console.print(f"read {_size(summary.bytes_read)} in {summary.passes} pass(es), wrote "
                  f"{_size(summary.bytes_written)} on {summary.device} in {summary.seconds:.2f} s "
                  f"({_size(rate)}/s read)")


class _Progress:
    """A rich progress bar over bytes read (every pass), tensors counted alongside."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._bar = None

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def factory(self, graph):
        if not self.enabled:
            return None
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        from mergebench.engine.stages import statistics_stages

        passes = 1 + len(statistics_stages(graph))
        self._bar = Progress(TextColumn("[bold]merging"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                             TextColumn("tensors"), MofNCompleteColumn(), TimeRemainingColumn(), console=errors,
                             transient=True)
        self._bar.start()
        task = self._bar.add_task("merge", total=graph.bytes_to_read * passes)
        tensors = self._bar.add_task("tensors", total=len(graph.keys) * passes, visible=False)
        bar = self._bar

        def advance(nbytes: int) -> None:
            bar.advance(task, nbytes)
            bar.advance(tensors, 1)

        return advance


@app.command()
def sweep(
    recipe: RecipeArg,
    grid: Annotated[list[str], typer.Option("--grid", help="NODE.PARAM=START:STOP:STEP or NODE.PARAM=V1,V2,... "
                                                           "(repeatable: the product is swept)")],
    eval_command: Annotated[str | None, typer.Option("--eval", help="command run on each output ({out} is its "
                                                                    "path; its last line is a JSON object), or "
                                                                    "built-in evaluators: 'ppl:FILE mc:FILE'")] = None,
    out: Annotated[Path | None, typer.Option(help="folder for the points, results.csv and sweep.png")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    force: Annotated[bool, _flag("--force", help="replace existing outputs")] = False,
    executor: ExecutorOpt = "local",
    address: AddressOpt = None,
    gpus_per_point: Annotated[float, typer.Option(help="GPUs each point's merge and eval needs (Ray)")] = 0.0,
    cpus_per_point: Annotated[float, typer.Option(help="CPUs each point's merge and eval needs (Ray)")] = 1.0,
    max_points: Annotated[int, typer.Option(help="refuse a grid of more points than this")] = 1000,
    keep: Annotated[bool, _flag("--keep", help="write every point's model (built-in evaluators otherwise score "
                                               "the points in memory)")] = False,
) -> None:
    """Merge every point of a parameter grid (one pass over the inputs), evaluate each, tabulate and plot.

    With --executor ray each point (its merge, then its eval) is a Ray task with the resources given.
    """
    with _user_errors():
        from mergebench.analysis.sweeps import parse_grid, run_sweep

        parsed = dict(parse_grid(spec, max_points) for spec in grid)
        out_dir = out or Path(f"sweep-{recipe.stem}")
        points = run_sweep(recipe, parsed, out_dir, eval_command, device=device, force=force, executor=executor,
                           address=address, resources={"num_gpus": gpus_per_point, "num_cpus": cpus_per_point},
                           max_points=max_points, keep=keep)
    metrics = list(dict.fromkeys(k for p in points for k in p.metrics))
    table = Table(title=f"sweep of {recipe} -> {out_dir}", title_justify="left")
    for column in ("point", *parsed, *metrics, "status"):
        table.add_column(column)
    for point in points:
        table.add_row(str(point.index), *(str(point.params[k]) for k in parsed),
                      *(f"{point.metrics[m]:.4g}" if m in point.metrics else "-" for m in metrics),
                      escape(point.error or "ok"))
    console.print(table)
    console.print(f"results in {out_dir / 'results.csv'}" + (f", plot in {out_dir / 'sweep.png'}"
                                                             if (out_dir / "sweep.png").exists() else ""))


@app.command()
def convert(
    config: Annotated[Path, typer.Argument(help="a mergekit config (YAML)")],
    out: Annotated[Path, typer.Option("--out", help="the output path the recipe names")] = Path("merged"),
) -> None:
    """Print the native recipe a mergekit config translates to (validated), to move to mergebench's own dialect."""
    with _user_errors():
        import yaml

        from mergebench.recipe import convert_mergekit

        recipe = convert_mergekit(config, out)
    print(f"# translated from the mergekit config {config} by mergebench convert")
    print(yaml.safe_dump(recipe, sort_keys=False), end="")


@app.command()
def plan(recipe: RecipeArg, set_: SetOpt = None, allow_pickle: PickleOpt = False, out: OutOpt = None) -> None:
    """Check a recipe against its inputs and show what a run would do: nodes, bytes, peak memory."""
    with _user_errors():
        import mergebench as mb

        planned = mb.plan(recipe, _parse_sets(set_ or []), allow_pickle=allow_pickle, out=out)
    graph = planned.graph
    models = Table(title="models", title_justify="left")
    for column in ("name", "path", "tensors", "size", "reads"):
        models.add_column(column)
    for name in graph.recipe.models:
        source = graph.sources[name]
        models.add_row(name, source.label, str(len(source.keys)), _size(source.total_bytes),
                       str(planned.reads.get(name, 0)))
    console.print(models)
    nodes = Table(title="nodes (in evaluation order)", title_justify="left")
    for column in ("node", "operator", "inputs", "result", "params"):
        nodes.add_column(column)
    for node in graph.recipe.nodes.values():  # as written: a stack's renamed copies of its inputs are the engine's
        inputs = escape(", ".join(f"{k}={v if isinstance(v, str) else '[' + ', '.join(v) + ']'}"
                                  for k, v in node.inputs.items()))
        written = graph.recipe.resolved["nodes"][node.name].get("params", {})
        shown = {**node.params.model_dump(by_alias=True),  # schedules as written, not their first value
                 **{k: v for k, v in written.items() if isinstance(v, list)}}
        params = json.dumps(shown, separators=(", ", ": "))
        nodes.add_row(node.name, node.op.name, inputs, escape(node.result), escape(params + _selection(node)))
    console.print(nodes)
    outputs = Table(title="outputs", title_justify="left")
    for column in ("from", "path", "dtype", "tensors", "size", "shard size"):
        outputs.add_column(column)
    for out in graph.outputs:
        outputs.add_row(out.output.node, str(out.path), out.output.dtype or "as inputs",
                        str(len(out.tensors)), _size(out.nbytes), _size(out.output.shard_size))
    console.print(outputs)
    for made in graph.layouts.generated.values():
        holds = getattr(made, "preparation_bytes", 0)
        console.print(escape(made.describe() + (f" (holds {_size(holds)} before the merge streams)" if holds else "")))
    skipped = f", {planned.may_skip} of them skipped when earlier ones settle its result" if planned.may_skip else ""
    console.print(f"{len(graph.keys)} keys, {planned.passes} pass(es){skipped}; read "
                  f"{_size(planned.bytes_per_pass)} per pass, write {_size(planned.bytes_written)}; peak memory ≈ "
                  f"{_size(planned.peak_memory)} beyond the interpreter")


def _selection(node) -> str:
    """Which keys a node merges and with which per-key parameters, as the plan shows it."""
    lines = []
    if node.include:
        lines.append("include: " + ", ".join(p.pattern for p in node.include))
    if node.exclude:
        lines.append("exclude: " + ", ".join(p.pattern for p in node.exclude))
    for pattern, params, _ in node.overrides:
        changed = params.model_dump(by_alias=True, exclude_unset=True)
        lines.append(f"override {pattern.pattern}: {json.dumps(changed, separators=(', ', ': '))}")
    return "".join("\n" + line for line in lines)


@app.command()
def ops(name: Annotated[str | None, typer.Argument(help="an operator name")] = None) -> None:
    """List the operators, or show one: input slots, result, parameters with defaults and docs."""
    with _user_errors():
        from mergebench.cli.catalog import operator_entries
        from mergebench.errors import MergebenchError

        entries = {entry["name"]: entry for entry in operator_entries()}
        if name is None:
            table = Table(title="operators", title_justify="left")
            for column in ("name", "class", "inputs -> result", "summary"):
                table.add_column(column)
            for entry in entries.values():
                table.add_row(entry["name"], entry["execution"], escape("\n".join(entry["inputs"])),
                              escape(entry["doc"].splitlines()[0]) if entry["doc"] else "")
            console.print(table)
            return
        entry = entries.get(name)
        if entry is None:
            raise MergebenchError(f"unknown operator '{name}' (known: {', '.join(sorted(entries))})")
    console.print(f"[bold]{entry['name']}[/] ({entry['execution']})")
    console.print(escape(entry["doc"]), highlight=False)
    console.print(f"implements: {escape(entry['paper'])}", highlight=False)
    for inputs in entry["inputs"]:
        console.print(f"  inputs {escape(inputs)}", highlight=False)
    table = Table(title="parameters", title_justify="left")
    for column in ("name", "type", "default", "meaning"):
        table.add_column(column)
    for row in entry["params"]:
        table.add_row(*(escape(cell) for cell in row))
    for common in ("include", "exclude", "overrides", "seed"):
        table.add_row(common, "", "", _COMMON_DOCS[common])
    console.print(table)


_COMMON_DOCS = {
    "include": "regexes (re.search); only matching keys are merged",
    "exclude": "regexes; matching keys pass through from the primary input",
    "overrides": "list of {match, params}: per-key parameters, first match wins",
    "seed": "seed of random draws (default: the recipe's seed)",
}


@app.command()
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="a .safetensors file, HF folder, index, or mask/sparse delta")],
    allow_pickle: PickleOpt = False,
) -> None:
    """List a checkpoint's tensors (dtype, shape, size, block), or describe a mask or sparse delta."""
    with _user_errors():
        from mergebench.io.kinds import has_block_scales, source_kind
        from mergebench.io.safetensors_header import DTYPE_INFO
        from mergebench.io.weight_files import stored_tensors, weight_files
        from mergebench.surgery.layers import BlockIndex

        rows: list[tuple[str, str, tuple[int, ...], int]] | None = None  # key, dtype, shape, bytes
        if source_kind(checkpoint, allow_pickle) == "safetensors":  # from the headers: no torch
            stored = stored_tensors(checkpoint, weight_files(checkpoint))
            if not has_block_scales(stored):  # FP8 weights list as read: dequantized, through the source
                rows = [(key, DTYPE_INFO[t.dtype][0], t.shape, t.nbytes) for key, t in stored.items()]
                total = sum(t.nbytes for t in stored.values())
        if rows is None:
            from mergebench.io.artifacts import ArtifactSource
            from mergebench.io.sources import open_source

            ckpt = open_source(checkpoint, allow_pickle)
            if isinstance(ckpt, ArtifactSource):
                _describe_artifact(ckpt)
                return
            infos = [ckpt.info(key) for key in ckpt.keys]
            rows = [(i.key, str(i.dtype).replace("torch.", ""), i.shape, i.nbytes) for i in infos]
            total = ckpt.total_bytes
    blocks = BlockIndex([key for key, *_ in rows])
    table = Table(title=str(checkpoint), title_justify="left")
    table.add_column("tensor", overflow="fold")
    for column in ("dtype", "shape", "size", "block"):
        table.add_column(column, no_wrap=True)
    for key, dtype, shape, nbytes in rows:
        position = blocks.position(key)
        table.add_row(key, dtype, str(list(shape)), _size(nbytes),
                      "-" if position is None else f"{position[0]}/{position[1]}")
    console.print(table)
    stacks = ", ".join(f"{stack or '(top level)'}: {count}" for stack, count in blocks.stacks.items()) or "none"
    console.print(f"{len(rows)} tensors, {_size(total)}; blocks per stack: {stacks}", highlight=False)


def _describe_artifact(source) -> None:
    from mergebench.io.artifacts import describe

    table = Table(title=f"{source.label} ({source.value_type})", title_justify="left")
    for column in ("where", "stored", "of", "density"):
        table.add_column(column)
    stored_total = elements_total = 0
    for label, stored, elements in describe(source):
        table.add_row(label, str(stored), str(elements), f"{stored / elements:.4%}" if elements else "-")
        stored_total, elements_total = stored_total + stored, elements_total + elements
    console.print(table)
    dense = elements_total * 4
    console.print(f"{len(source.keys)} tensors; {stored_total} of {elements_total} entries "
                  f"({stored_total / max(elements_total, 1):.4%}); {_size(source.total_bytes)} on disk = "
                  f"{source.total_bytes / max(dense, 1):.2%} of the dense float32 size ({_size(dense)})",
                  highlight=False)
    provenance = {k: v for k, v in source.metadata.items() if not k.startswith("shape/")}
    console.print(escape(json.dumps(provenance, indent=2, sort_keys=True)), highlight=False)


@app.command()
def extract(
    base: Annotated[Path, typer.Argument(help="the base (pretrained) checkpoint")],
    fine_tuned: Annotated[Path, typer.Argument(help="the fine-tuned checkpoint")],
    out: Annotated[Path, typer.Argument(help="the artifact to write (.safetensors)")],
    mask: Annotated[bool, _flag("--mask", help="write the Mask of kept entries, not the SparseDelta")] = False,
    proportion: Annotated[float | None, typer.Option(help="fraction of entries kept by |Δ| (top-K)")] = None,
    k: Annotated[int | None, typer.Option(help="number of entries kept by |Δ|")] = None,
    scope: Annotated[str, typer.Option(help="global or per_tensor top-K")] = "global",
    eps: Annotated[float, typer.Option(help="sparse delta without --proportion/--k: keep |Δ| > eps")] = 1e-7,
    include: Annotated[list[str], typer.Option("--include", help="only keys matching (regex, repeatable)")] = None,
    exclude: Annotated[list[str], typer.Option("--exclude", help="skip keys matching (regex, repeatable)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    force: Annotated[bool, _flag("--force", help="replace an existing artifact")] = False,
) -> None:
    """Turn a fine-tune into a SparseDelta (or, with --mask, a Mask) artifact in one streamed pass."""
    with _user_errors():
        import mergebench as mb

        result = mb.extract(base, fine_tuned, out, mask=mask, proportion=proportion, k=k, scope=scope, eps=eps,
                            include=include, exclude=exclude, device=device, force=force)
    written = result.outputs[0]
    console.print(f"wrote {written['path']} ({_size(written['bytes'])}) in {result.summary.seconds:.2f} s",
                  highlight=False)


@app.command()
def search(
    recipe: RecipeArg,
    space: Annotated[list[str], typer.Option("--space", help="NODE.PARAM=LOW:HIGH[:log] (repeatable)")],
    evaluate: Annotated[str, typer.Option("--eval", help="built-in evaluators ('ppl:FILE mc:FILE') or a command "
                                                         "with {out}")],
    objective: Annotated[list[str], typer.Option("--objective", help="METRIC[:min|max] (one, or two for a "
                                                                     "Pareto front)")],
    trials: Annotated[int, typer.Option(help="completed trials the study should reach")] = 40,
    sampler: Annotated[str, typer.Option(help="tpe or cmaes")] = "tpe",
    seed: Annotated[int, typer.Option(help="the sampler's seed")] = 0,
    out: Annotated[Path | None, typer.Option(help="folder of the study (study.db), trials.csv, best.yaml")] = None,
    keep: Annotated[bool, _flag("--keep", help="keep every trial's merged model")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    executor: ExecutorOpt = "local",
    address: AddressOpt = None,
    parallel: Annotated[int, typer.Option(help="trials at a time on Ray")] = 2,
    gpus_per_trial: Annotated[float, typer.Option(help="GPUs each trial's merge and eval needs (Ray)")] = 0.0,
    cpus_per_trial: Annotated[float, typer.Option(help="CPUs each trial's merge and eval needs (Ray)")] = 1.0,
) -> None:
    """Search merge parameters with Optuna (each trial a merge and an evaluation); rerun to resume."""
    with _user_errors():
        from mergebench.analysis.search import Parallel, parse_objective, parse_space, run_search
        from mergebench.errors import MergebenchError

        if executor not in ("local", "ray"):
            raise MergebenchError(f"--executor {executor}: expected local or ray")
        out_dir = out or Path(f"search-{recipe.stem}")
        ray = Parallel(parallel, address, {"num_gpus": gpus_per_trial, "num_cpus": cpus_per_trial}) \
            if executor == "ray" else None
        result = run_search(recipe, [parse_space(s) for s in space], out_dir, evaluate,
                            [parse_objective(o) for o in objective], trials, sampler, seed, device, keep, ray)
    for best in result.best:
        console.print(f"trial {best['number']}: {json.dumps(best['params'])} -> {json.dumps(best['metrics'])}",
                      highlight=False)
    console.print(f"{len(result.trials)} trials in {out_dir}; best recipe: {result.best_recipe}", highlight=False)


@app.command("eval")
def eval_model(
    model: Annotated[Path, typer.Argument(help="a Hugging Face model folder")],
    specs: Annotated[list[str], typer.Argument(help="ppl:FILE, mc:FILE, cls:FILE, cls-logreg:FILE, lm-eval:TASKS")],
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N")] = "cpu",
    max_tokens: Annotated[int | None, typer.Option(help="perplexity: score at most this many tokens")] = None,
    window: Annotated[int | None, typer.Option(help="perplexity: tokens per window (default min(1024, the "
                                                    "model's positions))")] = None,
    stride: Annotated[int | None, typer.Option(help="perplexity: tokens a window advances (default half one)")
                      ] = None,
    batch_size: Annotated[int | None, typer.Option(help="perplexity: windows per forward pass (default 8)")] = None,
) -> None:
    """Evaluate a model with built-in evaluators on local files; prints the metrics as one JSON object."""
    with _user_errors():
        from mergebench.evaluation import evaluate

        given = {"max_tokens": max_tokens, "window": window, "stride": stride, "batch_size": batch_size}
        query = "&".join(f"{k}={v}" for k, v in given.items() if v is not None)
        specs = [f"{s}{'&' if '?' in s else '?'}{query}" if query and s.startswith("ppl:") else s for s in specs]
        metrics = evaluate(model, specs, device=device)
    print(json.dumps(metrics))


@app.command("extract-lora")
def extract_lora(
    base: Annotated[Path, typer.Argument(help="the base (pretrained) checkpoint")],
    fine_tuned: Annotated[Path, typer.Argument(help="the fine-tuned checkpoint")],
    out: Annotated[Path, typer.Argument(help="the PEFT adapter folder to write")],
    rank: Annotated[int | None, typer.Option(help="rank of every factored matrix")] = None,
    energy: Annotated[float | None, typer.Option(help="instead of --rank: share of each matrix's spectral energy "
                                                      "kept")] = None,
    min_rank: Annotated[int, typer.Option(help="least rank with --energy")] = 1,
    max_rank: Annotated[int | None, typer.Option(help="most rank with --energy")] = None,
    target_modules: Annotated[str | None, typer.Option(help="regex of the weights to factor (default: every 2-D "
                                                            "weight in the blocks but embeddings)")] = None,
    modules_to_save: Annotated[str | None, typer.Option(help="regex of other changed tensors to save whole")] = None,
    svd: Annotated[str, typer.Option(help="auto, full or randomized")] = "auto",
    dtype: Annotated[str | None, typer.Option(help="stored dtype of the factors (default float32)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    force: Annotated[bool, _flag("--force", help="replace an existing adapter written by mergebench")] = False,
) -> None:
    """Turn a full fine-tune into a LoRA adapter of its base (truncated SVD of each weight delta), key by key."""
    with _user_errors():
        import mergebench as mb

        result = mb.extract_lora(base, fine_tuned, out, rank=rank, energy=energy, min_rank=min_rank,
                                 max_rank=max_rank, target_modules=target_modules, modules_to_save=modules_to_save,
                                 svd=svd, dtype=dtype, device=device, force=force)
    written = result.outputs[0]
    table = Table(title=f"{written['path']} ({_size(written['bytes'])}, {result.summary.seconds:.2f} s)",
                  title_justify="left")
    for column in ("tensor", "rank", "relative error"):
        table.add_column(column, overflow="fold")
    for key, row in written["modules"].items():
        error = "" if row["error"] is None else f"{row['error']:.3g}"
        table.add_row(escape(key), "whole" if row["rank"] is None else str(row["rank"]), error)
    console.print(table)


@app.command()
def record(
    model: Annotated[Path, typer.Argument(help="a Hugging Face model folder (causal LM or sequence classifier)")],
    data: Annotated[Path, typer.Argument(help="a text file (one example per line) or JSONL with text (and label)")],
    out: Annotated[Path | None, typer.Option("--out", help="the folder to write fisher.safetensors / gram.safetensors "
                                                           "in (default ./MODEL-stats)")] = None,
    stats: Annotated[str, typer.Option(help="fisher, gram or both (comma-separated)")] = "fisher,gram",
    labels: Annotated[str, typer.Option(help="Fisher of the given labels, or of labels sampled from the model")
                      ] = "given",
    max_examples: Annotated[int | None, typer.Option(help="read at most this many examples")] = None,
    max_length: Annotated[int, typer.Option(help="truncate each example to this many tokens")] = 512,
    seed: Annotated[int, typer.Option(help="seed of the sampled labels")] = 0,
    force: Annotated[bool, _flag("--force", help="replace statistics files mergebench wrote")] = False,
) -> None:
    """Record a model's diagonal Fisher and RegMean Gram matrices on local data, for fisher and regmean merges."""
    with _user_errors():
        import mergebench as mb

        chosen = tuple(s.strip() for s in stats.split(",") if s.strip())
        written = mb.record(model, data, out or Path(f"{model.resolve().name}-stats"), stats=chosen,
                            labels=labels, max_examples=max_examples, max_length=max_length, seed=seed, force=force)
    for name, path in written.items():
        console.print(f"wrote {name}: {escape(str(path))}", highlight=False)


@app.command()
def diff(
    checkpoints: Annotated[list[Path], typer.Argument(help="the base, then one or more fine-tunes of it")],
    masks: Annotated[float | None, typer.Option("--masks", help="also the Jaccard overlap of per-tensor top-k masks "
                                                                "at this density (e.g. 0.01)")] = None,
    as_json: Annotated[bool, _flag("--json", help="print the report as JSON")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="write a PNG of norms and cosines per block")] = None,
) -> None:
    """Per-block delta norms, changed fraction, cosine similarity and sign agreement between fine-tunes."""
    with _user_errors():
        from mergebench.analysis.diff import check_plot_path, json_ready, plot_diff, weight_diff
        from mergebench.errors import MergebenchError
        from mergebench.io.sources import open_source

        if len(checkpoints) < 2:
            raise MergebenchError("diff needs a base and at least one other checkpoint")
        if plot:
            check_plot_path(plot)
        sources = [open_source(path) for path in checkpoints]
        names = _short_names(checkpoints[1:])
        report = weight_diff(sources[0], sources[1:], names, masks)
        if plot:
            plot_diff(report, str(plot))
    if as_json:
        print(json.dumps(json_ready(report), indent=2, allow_nan=False))
        return
    columns = list(next(iter(report.values())))
    for group in ("relative norm", "norm", "changed", "cosine", "sign agreement", "mask jaccard"):
        chosen = [c for c in columns if c.startswith(group + " ")]
        columns = [c for c in columns if c not in chosen]
        if not chosen:
            continue
        table = Table(title=f"{group} (deltas from {checkpoints[0]})", title_justify="left")
        table.add_column("where")
        for column in chosen:
            table.add_column(escape(column[len(group) + 1:]), overflow="fold")
        for label, row in report.items():
            table.add_row(label, *(f"{row[c]:.4g}" for c in chosen))
        console.print(table)


def _short_names(paths: list[Path]) -> list[str]:
    names = [path.stem if path.is_file() else path.name for path in paths]
    return names if len(set(names)) == len(names) else [f"{i}:{n}" for i, n in enumerate(names, 1)]


@app.command()
def overlap(masks: Annotated[list[Path], typer.Argument(help="two or more mask files")]) -> None:
    """Jaccard overlap of task masks, per block and overall (near-disjoint masks compose with little interference)."""
    with _user_errors():
        from mergebench.errors import MergebenchError
        from mergebench.io.artifacts import ArtifactSource, mask_overlap

        if len(masks) < 2:
            raise MergebenchError("overlap needs at least two masks")
        report = mask_overlap([ArtifactSource(path) for path in masks])
    for pair, rows in report.items():
        table = Table(title=f"Jaccard overlap: {pair}", title_justify="left")
        table.add_column("where")
        table.add_column("|A∩B| / |A∪B|")
        for label, value in rows.items():
            table.add_row(label, f"{value:.4f}")
        console.print(table)


def main() -> None:
    app(prog_name="mergebench")


if __name__ == "__main__":
    sys.exit(main())
