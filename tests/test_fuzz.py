"""Property-based tests: untrusted headers and indexes never crash the reader; random recipes either
run and match the eager API or fail with exit code 2 — never a traceback, never a partial output."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from conftest import read_checkpoint, write_recipe
from mergebench import operators as ops
from mergebench.errors import MergebenchError
from mergebench.io.artifacts import ArtifactSource
from mergebench.io.checkpoint import Checkpoint
from mergebench.recipe import load_recipe

DTYPE_NAMES = ["F32", "F16", "BF16", "I64", "BOOL", "U8", "F64", "X9", ""]
json_scalars = st.one_of(st.integers(-10, 10**6), st.text(max_size=5), st.none(), st.booleans())
entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(DTYPE_NAMES) | json_scalars,
    "shape": st.lists(st.integers(-2, 6), max_size=3) | json_scalars,
    "data_offsets": st.lists(st.integers(-4, 80), min_size=0, max_size=3) | json_scalars,
})
headers = st.dictionaries(st.text(min_size=1, max_size=6), entries | json_scalars, max_size=4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=headers, data=st.binary(max_size=64), claimed_extra=st.integers(-8, 8), raw=st.booleans())
def test_header_fuzz_opens_or_refuses_cleanly(header, data, claimed_extra, raw):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "f.safetensors"
        body = json.dumps(header).encode() if not raw else json.dumps(header).encode()[::-1]
        path.write_bytes(struct.pack("<Q", max(0, len(body) + claimed_extra)) + body + data)
        try:
            ckpt = Checkpoint(path)
        except MergebenchError as exc:
            assert str(path) in str(exc)
            return
        for key in ckpt.keys:  # whatever was accepted reads back with the promised shape and dtype
            info = ckpt.info(key)
            tensor = ckpt.read(key)
            assert tensor.dtype == info.dtype and tuple(tensor.shape) == info.shape


@settings(max_examples=100, deadline=None)
@given(weight_map=st.dictionaries(st.text(min_size=1, max_size=4),
                                  st.sampled_from(["a.safetensors", "../a.safetensors", "/abs.safetensors",
                                                   "missing.safetensors", "sub/../a.safetensors", ""]) | json_scalars,
                                  max_size=4))
def test_index_fuzz_opens_or_refuses_cleanly(weight_map):
    with tempfile.TemporaryDirectory() as folder:
        model = Path(folder) / "m"
        model.mkdir()
        save_file({"k": torch.ones(2)}, model / "a.safetensors")
        (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        try:
            ckpt = Checkpoint(model)
        except MergebenchError:
            return
        assert set(ckpt.keys) <= {"k"}


SHAPES = st.sampled_from([(3,), (2, 3), (4, 2)])
OPS = {
    "linear": lambda names: {"models": names},
    "task_arithmetic": lambda names: {"base": names[0], "models": names[1:] or names},
    "ties": lambda names: {"base": names[0], "models": names[1:] or names},
    "wise_ft": lambda names: {"zero_shot": names[0], "fine_tuned": names[-1]},
    "slerp": lambda names: {"a": names[0], "b": names[-1]},
    "breadcrumbs": lambda names: {"base": names[0], "models": names[1:] or names},
    "dare_linear": lambda names: {"base": names[0], "models": names[1:] or names},
}
PARAMS = {
    "linear": st.fixed_dictionaries({}, optional={"normalize": st.booleans(), "weights": st.lists(
        st.floats(-2, 2), min_size=1, max_size=3)}),
    "task_arithmetic": st.fixed_dictionaries({}, optional={"lambda": st.floats(-2, 2) | st.text(max_size=2)}),
    "ties": st.fixed_dictionaries({}, optional={"density": st.floats(-0.5, 1.5), "agg": st.sampled_from(
        ["mean", "sum", "max", "median"]), "scope": st.sampled_from(["global", "per_tensor"])}),
    "wise_ft": st.fixed_dictionaries({}, optional={"alpha": st.floats(-1, 2), "beta": st.floats()}),
    "slerp": st.fixed_dictionaries({}, optional={"t": st.floats(0, 1)}),
    "breadcrumbs": st.fixed_dictionaries({}, optional={"density": st.floats(0, 1), "gamma": st.floats(0, 1)}),
    "dare_linear": st.fixed_dictionaries({}, optional={"p": st.floats(-0.5, 1.5)}),
}


@st.composite
def recipes(draw):
    count = draw(st.integers(1, 3))
    keys = draw(st.lists(st.sampled_from(["layers.0.w", "layers.1.w", "head.w", "ids"]), min_size=1, max_size=4,
                         unique=True))
    shapes = {k: draw(SHAPES) for k in keys}
    models = []
    for i in range(count):
        state = {}
        for k in keys:
            if k == "ids":
                state[k] = torch.arange(3)
            else:
                shape = shapes[k] if draw(st.integers(0, 9)) else (5,)  # now and then a mismatched shape
                state[k] = torch.randn(shape, generator=torch.Generator().manual_seed(i * 31 + len(k)))
        models.append(state)
    op = draw(st.sampled_from(sorted(OPS)))
    params = draw(PARAMS[op])
    exclude = draw(st.lists(st.sampled_from(["head", "layers.1", "[bad"]), max_size=2))
    return models, op, params, exclude


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(case=recipes())
def test_random_recipes_run_and_match_eager_or_exit_2(case, cli):
    models, op, params, exclude = case
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        names = [f"m{i}" for i in range(len(models))]
        for name, state in zip(names, models):
            save_file(state, folder / f"{name}.safetensors")
        inputs = OPS[op](names)
        recipe = write_recipe(folder / "r.yaml", {
            "models": {n: f"{n}.safetensors" for n in names},
            "nodes": {"m": {"op": op, "inputs": inputs, "params": params, "exclude": exclude}},
            "outputs": [{"from": "m", "path": "out"}],
        })
        result = cli("run", recipe, "--quiet")
        event(f"exit code {result.exit_code}")
        assert result.exit_code in (0, 2), result.output
        assert not (folder / "out.partial").exists()
        if result.exit_code == 2:
            assert result.output.startswith("error: ") and not (folder / "out").exists()
            return
        by_name = dict(zip(names, models))
        eager_inputs = {slot: [by_name[r] for r in ref] if isinstance(ref, list) else by_name[ref]
                        for slot, ref in inputs.items()}
        expected = getattr(ops, op)(**eager_inputs, **params, exclude=exclude)
        written = read_checkpoint(folder / "out")
        assert written.keys() == expected.keys()
        for key in expected:
            assert torch.equal(written[key], expected[key]), key


REGEX_TEXT = st.text(alphabet="()[]{}*+?|^$.\\ab0-:", max_size=8)


@settings(max_examples=150, deadline=None)
@given(block_regex=REGEX_TEXT, include=REGEX_TEXT, match=REGEX_TEXT)
def test_regex_parameters_validate_or_refuse_cleanly(block_regex, include, match):
    """Every regex a recipe holds (operator parameters, include, override matches) is compiled during
    validation: a pattern that does not compile is a MergebenchError naming the recipe, never re.error."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        save_file({"layers.0.w": torch.ones(2)}, folder / "a.safetensors")
        doc = {"models": {"a": "a.safetensors", "b": "a.safetensors"},
               "nodes": {"l": {"op": "lines", "inputs": {"base": "a", "fine_tuned": "b"}, "include": [include],
                               "params": {"block_regex": block_regex},
                               "overrides": [{"match": match, "params": {"alpha": 0.5}}]}},
               "outputs": [{"from": "l", "path": "out"}]}
        recipe = write_recipe(folder / "r.yaml", doc)
        try:
            load_recipe(recipe)
        except MergebenchError as exc:
            assert str(recipe) in str(exc)


METADATA_VALUES = st.one_of(st.text(max_size=12), st.lists(st.integers(-3, 2**45) | st.floats() | st.booleans(),
                                                           max_size=3).map(json.dumps),
                            st.dictionaries(st.text(max_size=2), st.integers(), max_size=2).map(json.dumps))


@settings(max_examples=200, deadline=None)
@given(shape=METADATA_VALUES, fmt=st.sampled_from(["mergebench.mask/1", "mergebench.sparse_delta/1", "x"]),
       packed=st.integers(0, 3))
def test_artifact_metadata_fuzz_opens_or_refuses_cleanly(shape, fmt, packed):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.safetensors"
        tensors = {"mask/k": torch.zeros(packed, dtype=torch.uint8),
                   "sparse/k/indices": torch.zeros(packed, dtype=torch.int64),
                   "sparse/k/values": torch.zeros(packed)}
        save_file(tensors, path, metadata={"format": fmt, "shape/k": shape})
        try:
            source = ArtifactSource(path)
        except MergebenchError as exc:
            assert str(path) in str(exc)
            return
        for key in source.keys:  # whatever was accepted reads back with the shape it claims, or refuses
            if source.info(key).nbytes > 2**26:  # a sparse delta of a large tensor is dense when read: not here
                continue
            try:
                value = source.read(key)
            except MergebenchError:
                continue
            assert tuple(value.shape) == source.info(key).shape


SPEC_VALUES = st.dictionaries(st.text(max_size=3), st.lists(st.tuples(
    st.sampled_from(["0.weight", "0.bias", "2.weight", "2.bias", "nope"]), st.integers(-4, 4)), max_size=3),
    max_size=2)


@settings(max_examples=60, deadline=None)
@given(spec=SPEC_VALUES)
def test_permutation_spec_fuzz_aligns_or_refuses_cleanly(spec):
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    other = {k: v + 0.1 for k, v in state.items()}
    try:
        aligned = ops.align(model=other, reference=state, spec=spec)
    except MergebenchError:
        return
    assert aligned.keys() == state.keys()
    assert all(aligned[k].shape == state[k].shape for k in state)
