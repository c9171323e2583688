"""mergekit configs run unchanged: mergekit's own example configs on tiny Llamas, checked against a numpy
reference of mergekit's arithmetic (always), and against mergekit 0.1.5's output where it is installed
(``MERGEKIT_YAML`` or ``mergekit-yaml`` on the PATH; skipped cleanly otherwise)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import yaml

from conftest import read_checkpoint, write_recipe
from mergebench.synthetic import llama_config, llama_state_dict, save_checkpoint

LAYERS = 4
MERGEKIT = os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml")
TINY = llama_config(hidden=64, intermediate=128, layers=LAYERS, vocab=128)

# mergekit's examples (examples/linear.yml, ties.yml, gradient-slerp.yml, orcamini-platy-44layer.yml) with the
# models renamed to tiny ones and layer ranges scaled to 4 blocks; float32 so that both tools compute alike.
CONFIGS = {
    "linear": """
models:
  - model: ./a
    parameters:
      weight: 1.0
  - model: ./b
    parameters:
      weight: 0.3
  - model: ./c
    parameters:
      weight: 0.5
merge_method: linear
dtype: float32
""",
    "ties": """
models:
  - model: ./a
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: ./b
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: ./c
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: ./base
parameters:
  normalize: true
  int8_mask: true
dtype: float32
""",
    "gradient_slerp": """
slices:
  - sources:
      - model: ./a
        layer_range: [0, 2]
      - model: ./b
        layer_range: [0, 2]
  - sources:
      - model: ./a
        layer_range: [2, 4]
      - model: ./b
        layer_range: [1, 3]
merge_method: slerp
base_model: ./a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float32
""",
    "passthrough": """
slices:
  - sources:
      - model: ./a
        layer_range: [0, 3]
  - sources:
      - model: ./b
        layer_range: [1, 4]
merge_method: passthrough
dtype: float32
""",
    "breadcrumbs": """
models:
  - model: ./a
    parameters: {weight: 1.0, density: 0.6, gamma: 0.05}
  - model: ./b
    parameters: {weight: [0.5, 1.0], density: 0.6, gamma: 0.05}
merge_method: breadcrumbs
base_model: ./base
parameters: {normalize: true, lambda: 0.9}
dtype: float32
""",
    "breadcrumbs_ties": """
models:
  - model: ./a
    parameters: {weight: 1.0, density: 0.6, gamma: 0.05}
  - model: ./b
    parameters: {weight: 0.7, density: 0.6, gamma: 0.05}
  - model: ./c
    parameters: {weight: 1.3, density: 0.6, gamma: 0.05}
merge_method: breadcrumbs_ties
base_model: ./base
dtype: float32
""",
    "model_stock": """
models: [{model: ./a}, {model: ./b}, {model: ./c}]
merge_method: model_stock
base_model: ./base
dtype: float32
""",
    "nearswap": """
models: [{model: ./a}]
merge_method: nearswap
base_model: ./base
parameters: {t: 0.01}
dtype: float32
""",
    "sce": """
models: [{model: ./a}, {model: ./b}, {model: ./c}]
merge_method: sce
base_model: ./base
parameters: {select_topk: 0.5}
dtype: float32
""",
    "nuslerp": """
models:
  - {model: ./a, parameters: {weight: 1.0}}
  - {model: ./b, parameters: {weight: 3.0}}
merge_method: nuslerp
base_model: ./base
dtype: float32
""",
    "nuslerp_rows": """
models:
  - {model: ./a, parameters: {weight: 0.3}}
  - {model: ./b, parameters: {weight: 0.7}}
merge_method: nuslerp
parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}
dtype: float32
""",
    "multislerp": """
models:
  - {model: ./a, parameters: {weight: 1.0}}
  - {model: ./b, parameters: {weight: 2.0}}
  - {model: ./c, parameters: {weight: 3.0}}
merge_method: multislerp
base_model: ./base
dtype: float32
""",
    "karcher": """
models: [{model: ./a}, {model: ./b}, {model: ./c}]
merge_method: karcher
dtype: float32
""",
    "arcee_fusion": """
models: [{model: ./a}]
merge_method: arcee_fusion
base_model: ./base
dtype: float32
""",
    "task_arithmetic": """
models:
  - model: ./a
    parameters: {weight: 0.7}
  - model: ./b
    parameters: {weight: [0.2, 0.6]}
merge_method: task_arithmetic
base_model: ./base
parameters: {lambda: 0.8, normalize: true}
dtype: float32
""",
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo")
    base = llama_state_dict(TINY, seed=0)
    states = {"base": base, **{name: llama_state_dict(TINY, seed=i, base=base, noise=0.2)
                               for i, name in enumerate("abc", start=1)}}
    for name, state in states.items():
        save_checkpoint(state, folder / name, 10**9, TINY)
    for name, text in CONFIGS.items():
        (folder / f"{name}.yml").write_text(text)
    return folder, {name: {k: v.double().numpy() for k, v in s.items()} for name, s in states.items()}


def _ours(cli, folder, name):
    out = folder / f"ours-{name}"
    if not out.exists():
        result = cli("run", folder / f"{name}.yml", "--out", out, "--quiet")
        assert result.exit_code == 0, result.output
    return {k: v.double().numpy() for k, v in read_checkpoint(out).items()}


# ---- mergekit's arithmetic in numpy (mergekit/config.py evaluate_setting, plan.py, merge_methods) ----

def setting(value, key, t):
    """mergekit's evaluate_setting: gradients read at t, the first filter contained in the key wins."""
    if isinstance(value, (int, float)):
        return float(value)
    if all(isinstance(v, (int, float)) for v in value):
        scaled = t * (len(value) - 1)
        i0 = int(scaled)
        i1 = min(len(value) - 1, i0 + 1)
        return (1 - (scaled - i0)) * value[i0] + (scaled - i0) * value[i1]
    for cond in value:
        if cond.get("filter") in (None, "*") or cond["filter"] in key:
            return setting(cond["value"], key, t)
    return None


def plan(keys, slices):
    """mergekit 0.1.5's plan: (output key, [(source model, source key)], t) — pre weights at t = 0 from the
    first slice, each slice's layers at t = i/(n − 1) (1 for one layer), post weights from the last slice,
    also at t = 0 (its modules planner reads them with the reader it made at t = 0)."""
    def rename(key, block):
        return key.replace("layers.0.", f"layers.{block}.")
    layer_keys = [k for k in keys if ".layers.0." in k]
    planned, out_block = [], 0
    for key in ("model.embed_tokens.weight",):
        planned.append((key, [(m, key) for m, _ in slices[0]], 0.0))
    for sources in slices:
        n = sources[0][1][1] - sources[0][1][0]
        for i in range(n):
            t = i / (n - 1) if n > 1 else 1.0
            for key in layer_keys:
                planned.append((rename(key, out_block), [(m, rename(key, r[0] + i)) for m, r in sources], t))
            out_block += 1
    for key in ("model.norm.weight", "lm_head.weight"):
        planned.append((key, [(m, key) for m, _ in slices[-1]], 0.0))
    return planned


def slerp(t, a, b, threshold=0.9995, eps=1e-8):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    dot = float(np.clip(np.sum((a / (na if na > eps else 1)) * (b / (nb if nb > eps else 1))), -1, 1))
    if abs(dot) > threshold:
        return (1 - t) * a + t * b
    theta = np.arccos(dot)
    return np.sin((1 - t) * theta) / np.sin(theta) * a + np.sin(t * theta) / np.sin(theta) * b


def magnitude(delta, density):
    if density >= 1:
        return delta
    k = max(1, int(density * delta.size))
    flat = np.abs(delta).reshape(-1)
    mask = np.zeros(delta.size)
    mask[np.argsort(-flat, kind="stable")[:k]] = 1
    return delta * mask.reshape(delta.shape)


def magnitude_outliers(delta, density, gamma):
    if density >= 1:
        return delta
    n = delta.size
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    mask = np.zeros(n)
    mask[np.argsort(np.abs(delta).reshape(-1), kind="stable")[bottom:bottom + keep]] = 1
    return delta * mask.reshape(delta.shape)


def nuslerp_ref(t, v0, v1, row_wise, flatten):
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.swapaxes(0, -1), v1.swapaxes(0, -1)
    u0 = v0 / np.maximum(np.linalg.norm(v0, axis=-1, keepdims=True), 1e-7)
    u1 = v1 / np.maximum(np.linalg.norm(v1, axis=-1, keepdims=True), 1e-7)
    cos = np.clip((u0 * u1).sum(-1, keepdims=True), -1, 1)
    theta = np.arccos(cos)
    out = (np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / np.sin(theta)
    if row_wise and not flatten:
        out = out.swapaxes(0, -1)
    return out.reshape(shape)


def multislerp_ref(vectors, weights):
    flat = np.stack([v.reshape(-1) for v in vectors])
    w = np.array(weights) / sum(weights)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    units = flat / norms
    mean = (units * w[:, None]).sum(0)
    mean /= np.linalg.norm(mean)
    tangent = ((units - (units @ mean)[:, None] * mean) * w[:, None]).sum(0)
    length = np.linalg.norm(tangent)
    out = mean * np.cos(length) + tangent * np.sin(length) / length
    return (out * (norms[:, 0] * w).sum()).reshape(vectors[0].shape)


def karcher_ref(vectors, iterations=10, tol=1e-5):
    norms = [np.linalg.norm(v) for v in vectors]
    units = [v / n for v, n in zip(vectors, norms)]
    mean = sum(units) / len(units)
    mean /= np.linalg.norm(mean)
    for _ in range(iterations):
        tangent = np.zeros_like(mean)
        for u in units:
            dot = np.clip(np.sum(mean * u), -1, 1)
            theta = np.arccos(dot)
            if theta >= tol:
                tangent += (theta / np.sin(theta)) * (u - dot * mean) / len(units)
        length = np.linalg.norm(tangent)
        if length < tol:
            break
        mean = np.cos(length) * mean + np.sin(length) * tangent / length
        mean /= np.linalg.norm(mean)
    return np.mean(norms) * mean


def model_stock_ref(base, models):
    offsets = [(m - base).reshape(-1) for m in models]
    cosines = [np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) for i, a in enumerate(offsets)
               for b in offsets[i + 1:]]
    cos, n = np.mean(cosines), len(models)
    t = n * cos / (1 + (n - 1) * cos)
    return t * sum(models) / n + (1 - t) * base


def sce_ref(base, models, topk):
    taus = np.stack([m - base for m in models])
    variance = taus.var(axis=0)
    k = int(np.count_nonzero(variance) * topk)
    mask = np.zeros(variance.size)
    mask[np.argsort(-variance.reshape(-1), kind="stable")[:k]] = 1
    taus = taus * mask.reshape(variance.shape)
    energy = (taus ** 2).reshape(len(models), -1).mean(1)
    weights = energy / energy.sum()
    majority = np.where(taus.sum(0) >= 0, 1.0, -1.0)
    erased = weights.reshape(-1, *[1] * base.ndim) * (np.sign(taus) == majority)
    return base + (taus * erased).sum(0) / np.maximum(erased.sum(0), 1e-6)


def arcee_ref(base, model):
    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    p, q = softmax(model) + 1e-8, softmax(base) + 1e-8
    importance = np.abs(model - base) * (p * np.log(p / q)).sum(-1, keepdims=True)
    ordered = np.sort(importance.reshape(-1))
    q1, median, q3 = (ordered[int(f * (ordered.size - 1))] for f in (0.25, 0.5, 0.75))
    threshold = median + 1.5 * (q3 - q1)
    fused = np.where(importance >= threshold, model, base)
    # an entry whose importance is within float32 rounding of the threshold may fall either side: not compared
    return np.where(np.abs(importance - threshold) <= 1e-3 * abs(threshold), np.nan, fused)


def reference(name, states):
    config = yaml.safe_load(CONFIGS[name])
    method, params = config["merge_method"], config.get("parameters") or {}
    if "slices" in config:
        slices = [[(s["model"][2:], tuple(s["layer_range"])) for s in piece["sources"]] for piece in config["slices"]]
        per_model = {}
    else:
        slices = [[(m["model"][2:], (0, LAYERS)) for m in config["models"]]]
        per_model = {m["model"][2:]: m.get("parameters") or {} for m in config["models"]}
    expected = {}
    for key, sources, t in plan(list(states["base"]), slices):
        tensors = {m: states[m][k] for m, k in sources}
        if method == "passthrough":
            expected[key] = tensors[sources[0][0]]
        elif method == "slerp":
            expected[key] = slerp(setting(params["t"], key, t), tensors["a"], states["b"][sources[1][1]])
        elif method == "nuslerp":
            w = [setting(per_model[m]["weight"], key, t) for m in per_model]
            origin = states["base"][key] if "base_model" in config else 0
            expected[key] = origin + nuslerp_ref(w[1] / sum(w), tensors["a"] - origin, tensors["b"] - origin,
                                                 params.get("nuslerp_row_wise", False),
                                                 params.get("nuslerp_flatten", True))
        elif method == "multislerp":
            base = states["base"][key]
            expected[key] = base + multislerp_ref([tensors[m] - base for m in per_model],
                                                  [setting(per_model[m]["weight"], key, t) for m in per_model])
        elif method == "karcher":
            expected[key] = karcher_ref([tensors[m] for m in per_model])
        elif method == "model_stock":
            expected[key] = model_stock_ref(states["base"][key], [tensors[m] for m in per_model])
        elif method == "nearswap":
            base, model = states["base"][key], tensors["a"]
            weight = np.clip(params["t"] / np.maximum(np.abs(base - model), 1e-6), 0, 1)
            expected[key] = weight * model + (1 - weight) * base
        elif method == "sce":
            expected[key] = sce_ref(states["base"][key], [tensors[m] for m in per_model], params["select_topk"])
        elif method == "arcee_fusion":
            expected[key] = arcee_ref(states["base"][key], tensors["a"])
        elif method == "linear":
            weights = {m: setting(per_model[m]["weight"], key, t) for m in tensors}
            expected[key] = sum(weights[m] * tensors[m] for m in tensors) / sum(weights.values())
        else:  # task_arithmetic, ties: mergekit's generalized task arithmetic
            base = states["base"][key]
            deltas, weights = [], []
            for m in per_model:
                density = setting(per_model[m].get("density", 1.0), key, t)
                delta = tensors[m] - base
                if method == "ties":
                    delta = magnitude(delta, density)
                elif method.startswith("breadcrumbs"):
                    delta = magnitude_outliers(delta, density, setting(per_model[m].get("gamma", 0.01), key, t))
                deltas.append(delta)
                weights.append(setting(per_model[m]["weight"], key, t))
            weighted = np.stack([d * w for d, w in zip(deltas, weights)])
            if method in ("ties", "breadcrumbs_ties"):
                majority = np.where(weighted.sum(0) >= 0, 1.0, -1.0)
                mask = np.sign(weighted) == majority
                mixed = (weighted * mask).sum(0)
                divisor = (np.array(weights).reshape(-1, *[1] * base.ndim) * mask).sum(0)
                divisor[divisor == 0] = 1
            else:
                mixed, divisor = weighted.sum(0), sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
            if params.get("normalize", method == "ties"):
                mixed = mixed / divisor
            expected[key] = base + mixed * params.get("lambda", 1.0)
    return expected


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mergekit_examples_equal_a_numpy_reference_of_mergekit(cli, zoo, name):
    folder, states = zoo
    ours = _ours(cli, folder, name)
    expected = reference(name, states)
    assert set(ours) == set(expected)
    for key, value in expected.items():
        decided = ~np.isnan(value)
        np.testing.assert_allclose(ours[key][decided], value[decided], rtol=2e-5, atol=2e-6, err_msg=f"{name}: {key}")


@pytest.mark.skipif(MERGEKIT is None, reason="mergekit 0.1.5 is not installed (MERGEKIT_YAML or mergekit-yaml)")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_mergekit_examples_equal_mergekit_itself(cli, zoo, name):
    folder, _ = zoo
    theirs_dir = folder / f"mergekit-{name}"
    if not theirs_dir.exists():
        subprocess.run([MERGEKIT, str(folder / f"{name}.yml"), str(theirs_dir), "--no-cuda", "--quiet"],
                       cwd=folder, check=True, capture_output=True, timeout=600)
    theirs = {k: v.double().numpy() for k, v in read_checkpoint(theirs_dir).items()}
    ours = _ours(cli, folder, name)
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        np.testing.assert_allclose(ours[key], value, rtol=2e-5, atol=2e-6, err_msg=f"{name}: {key}")
    ours_config = json.loads((folder / f"ours-{name}" / "config.json").read_text())
    theirs_config = json.loads((theirs_dir / "config.json").read_text())
    assert ours_config["num_hidden_layers"] == theirs_config["num_hidden_layers"]


def test_convert_prints_a_native_recipe_that_runs_to_the_same_tensors(cli, zoo, tmp_path):
    folder, _ = zoo
    result = cli("convert", folder / "gradient_slerp.yml", "--out", tmp_path / "native-out")
    assert result.exit_code == 0, result.output
    recipe = yaml.safe_load(result.output)
    assert [n["op"] for n in recipe["nodes"].values()] == ["stack", "stack", "slerp", "stack", "stack", "slerp",
                                                           "stack"]
    native = write_recipe(tmp_path / "native.yaml", recipe)
    assert cli("run", native, "--quiet").exit_code == 0
    ours = _ours(cli, folder, "gradient_slerp")
    converted = read_checkpoint(tmp_path / "native-out")
    assert all(np.array_equal(converted[k].double().numpy(), v) for k, v in ours.items())


@pytest.mark.parametrize(("text", "message"), [
    ("merge_method: ram\nbase_model: ./base\nmodels: [{model: ./a}, {model: ./b}]\n",
     "merge_method 'ram' has no mergebench operator yet"),
    ("merge_method: ties\nmodels: [{model: ./a, parameters: {weight: 1}}]\n", "needs a base_model"),
    ("merge_method: linear\nmodels:\n  - model: ./a\n    parameters: {weight: 1, densty: 0.5}\n",
     "takes no per-model parameter 'densty'"),
    ("merge_method: linear\nmodels:\n  - model: ./nowhere\n", "is not a path that exists"),
    ("merge_method: linear\nmodels:\n  - model: someorg/some-model\n", "nor in the Hugging Face cache"),
    ("merge_method: linear\nmodels:\n  - model: ./a\n", "needs 'weight' for model 'a'"),
    ("merge_method: ties\nbase_model: ./base\nmodels:\n  - model: ./a\n    parameters:\n      weight: 1\n"
     "      density: [0.5, 1.5]\n", "bad.yml:7: 'density' of model 'a' must lie in [0, 1]"),
    ("merge_method: linear\nmodels:\n  - model: ./a+./no-lora\n", "is not a path that exists"),
    ("merge_method: linear\nchat_template: chatml\nmodels:\n  - model: ./a\n    parameters: {weight: 1}\n",
     "built-in templates are not shipped"),
    ("merge_method: linear\ntokenizer:\n  source: union\n  tokens:\n    x: {source: {kind: zero}}\n"
     "models:\n  - model: ./a\n    parameters: {weight: 1}\n", "only a model as its source is translated"),
    ("merge_method: slerp\nbase_model: ./a\nslices:\n  - sources:\n      - {model: ./a, layer_range: [0, 2]}\n"
     "      - {model: ./b, layer_range: [0, 3]}\nparameters: {t: 0.5}\n", "spans the same number of layers"),
])
def test_bad_mergekit_configs_exit_2_naming_file_and_line(cli, zoo, tmp_path, text, message, monkeypatch):
    folder, _ = zoo
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    config = folder / "bad.yml"
    config.write_text(text)
    result = cli("run", config, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert message in result.output and "bad.yml" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_convert_refuses_a_native_recipe(cli, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {"models": {}, "nodes": {}, "outputs": []})
    result = cli("convert", recipe)
    assert result.exit_code == 2 and "not a mergekit config" in result.output, result.output


def test_a_mergekit_config_without_out_is_one_clear_error(cli, zoo):
    folder, _ = zoo
    result = cli("run", folder / "linear.yml")
    assert result.exit_code == 2 and "give --out DIR" in result.output, result.output


def test_a_repo_id_resolves_through_the_local_hugging_face_cache(cli, zoo, tmp_path, monkeypatch):
    folder, states = zoo
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-a" / "snapshots" / "0123abcd"
    shutil.copytree(folder / "a", snapshot)
    (tmp_path / "hub" / "models--tiny-org--tiny-a" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny-org--tiny-a" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    config = write_recipe(tmp_path / "hub.yml", {"merge_method": "linear", "models": [
        {"model": "tiny-org/tiny-a", "parameters": {"weight": 1.0}}, {"model": str(folder / "b"),
                                                                       "parameters": {"weight": 1.0}}]})
    result = cli("run", config, "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    out = read_checkpoint(tmp_path / "out")
    key = "model.layers.1.mlp.up_proj.weight"
    np.testing.assert_allclose(out[key].double().numpy(), (states["a"][key] + states["b"][key]) / 2, rtol=1e-6)


def test_dare_ties_draws_match_mergekit_in_distribution(cli, zoo, tmp_path):
    """Random masks cannot match entry by entry: the share of entries kept and the mean |delta| kept must."""
    folder, states = zoo
    config = write_recipe(tmp_path / "dare.yml", {
        "merge_method": "dare_ties", "base_model": str(folder / "base"), "dtype": "float32",
        "models": [{"model": str(folder / "a"), "parameters": {"weight": 1.0, "density": 0.4}}]})
    result = cli("run", config, "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    key = "model.layers.2.mlp.down_proj.weight"
    delta = read_checkpoint(tmp_path / "out")[key].double().numpy() - states["base"][key]
    kept = delta != 0
    n = delta.size
    assert abs(kept.mean() - 0.4) < 4 * np.sqrt(0.4 * 0.6 / n)  # Bernoulli(density) keep
    original = states["a"][key] - states["base"][key]
    np.testing.assert_allclose(delta[kept], original[kept] / 0.4, rtol=1e-5, atol=1e-6)  # rescaled by 1/density
    # mergekit rescales to the task vector's L1 norm; 1/density does in expectation (docs/mergekit.md)
    assert abs(np.abs(delta).sum() / np.abs(original).sum() - 1) < 0.05
    if MERGEKIT is not None:
        subprocess.run([MERGEKIT, str(config), str(tmp_path / "theirs"), "--no-cuda", "--quiet"], check=True,
                       capture_output=True, timeout=600)
        theirs = read_checkpoint(tmp_path / "theirs")[key].double().numpy() - states["base"][key]
        assert abs((theirs != 0).mean() - 0.4) < 4 * np.sqrt(0.4 * 0.6 / n)
        assert abs(np.abs(theirs).sum() / np.abs(original).sum() - 1) < 1e-4  # L1 matched exactly


def test_out_replaces_the_single_output_of_a_native_recipe(cli, zoo, tmp_path):
    folder, _ = zoo
    recipe = write_recipe(tmp_path / "r.yaml", {"models": {"a": str(folder / "a")},
                                                "nodes": {"x": {"op": "linear", "inputs": {"models": ["a"]}}},
                                                "outputs": [{"from": "x", "path": "elsewhere"}]})
    assert cli("run", recipe, "--out", tmp_path / "here", "--quiet").exit_code == 0
    assert (tmp_path / "here" / "config.json").exists() and not (tmp_path / "elsewhere").exists()


def test_a_sweep_runs_a_mergekit_config(zoo, tmp_path):
    import mergebench as mb

    folder, states = zoo
    points = mb.sweep(folder / "task_arithmetic.yml", {"merge.lambda": [0.5, 1.0]}, tmp_path / "sweep")
    key = "model.layers.3.self_attn.v_proj.weight"
    results = [read_checkpoint(p.outputs[0])[key].double().numpy() for p in points]
    moved = [r - states["base"][key] for r in results]
    np.testing.assert_allclose(moved[1], 2 * moved[0], rtol=1e-4, atol=1e-6)  # λ scales the merged delta
