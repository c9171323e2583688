"""Grafting, masks and sparse deltas (semantics §5, §6): goldens, artifacts on disk, round trips."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import read_checkpoint, write_recipe
from mergebench import operators as ops
from mergebench.engine.runner import RunOptions, run_recipe
from mergebench.io.artifacts import ArtifactSource, ArtifactWriter, load_artifact, mask_overlap, save_artifact
from mergebench.operators.base import MASK, SPARSE_DELTA
from mergebench.recipe import load_recipe
from mergebench.surgery.graft import optimize_mask, relax

T = torch.tensor
LT_BASE, LT_FULL = torch.ones(6), T([1.5, 0.9, 3, 1, 0.2, 1.05])


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=tol, rtol=tol)


def test_graft_golden():
    ft = T([0.5, -3, 0.1, 2, -0.05])
    close(ops.graft(pretrained=torch.zeros(5), fine_tuned=ft, sparsity=0.4, candidates="all"), [0, -3, 0, 2, 0])
    block = ops.graft(pretrained={"layers.0.w": torch.zeros(5), "embed.w": torch.zeros(5)},
                      fine_tuned={"layers.0.w": ft, "embed.w": ft}, sparsity=0.4)
    close(block["layers.0.w"], [0, -3, 0, 2, 0])
    close(block["embed.w"], [0, 0, 0, 0, 0])  # outside blocks: never grafted


def test_graft_relaxation_at_init():
    gamma = relax(T([False, True, False, True, False]), torch.zeros(5), 10.0)
    close(gamma, [4.54e-5, 0.99995, 4.54e-5, 0.99995, 4.54e-5], tol=1e-5)  # the specification's rounded values
    s = torch.sigmoid(torch.tensor(-10.0))
    close(gamma, [s, 1 - s, s, 1 - s, s], tol=1e-7)
    assert torch.equal(gamma.round().bool(), T([False, True, False, True, False]))


def test_mask_topk_and_sparsify_golden():
    assert torch.equal(ops.mask_topk(base=LT_BASE, fine_tuned=LT_FULL, k=2), T([False, False, True, False, True,
                                                                                 False]))
    close(ops.sft_extract(base=LT_BASE, fine_tuned=LT_FULL, k=2), [0, 0, 2.0, 0, -0.8, 0])
    close(ops.sft_extract(base=torch.zeros(3), fine_tuned=T([1e-8, -2e-7, 0.3])), [0, -2e-7, 0.3], tol=1e-9)


def test_compose_and_revert_golden():
    phi_l = ops.sft_extract(base=LT_BASE, fine_tuned=LT_FULL, k=2)
    phi_t = T([0.5, 0, 0, 0, 0.3, 0])
    composed = ops.sft_compose(base=LT_BASE, deltas=[phi_l, phi_t])
    close(composed, [1.5, 1, 3, 1, 0.5, 1])
    reverted = ops.apply(base=ops.apply(base=composed, delta=phi_t, scale=-1.0), delta=phi_l, scale=-1.0)
    close(reverted, torch.ones(6))


def test_sparse_delta_file_encoding(tmp_path):
    phi = {"w": T([[0.0, 0, 2.0], [0, -0.8, 0]])}
    path = save_artifact(phi, tmp_path / "phi.safetensors", SPARSE_DELTA, {"base_model": "test"})
    raw = load_file(path)
    assert raw["sparse/w/indices"].tolist() == [2, 4] and raw["sparse/w/indices"].dtype == torch.int64
    close(raw["sparse/w/values"], [2.0, -0.8])
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "mergebench.sparse_delta/1" and json.loads(meta["shape/w"]) == [2, 3]
    assert torch.equal(load_artifact(path)["w"], phi["w"])


def test_mask_file_packs_bits(tmp_path):
    mask = {"w": torch.arange(20).reshape(4, 5) % 3 == 0}
    path = save_artifact(mask, tmp_path / "m.safetensors", MASK)
    raw = load_file(path)
    assert raw["mask/w"].dtype == torch.uint8 and raw["mask/w"].numel() == 3  # 20 bits in 3 bytes
    assert torch.equal(load_artifact(path)["w"], mask["w"])


def _model_pair(tmp_path, seed=0, shapes=None):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"model.embed_tokens.weight": (40, 16), "model.layers.0.w": (32, 16),
                        "model.layers.1.w": (16, 32), "model.layers.1.b": (16,), "lm_head.weight": (40, 16)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    ft = {k: v + torch.randn(v.shape, generator=g) * 0.1 for k, v in base.items()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(ft, tmp_path / f"ft{seed}.safetensors")
    return base, ft


def test_extract_compose_round_trip_and_size(tmp_path, cli):
    base, ft = _model_pair(tmp_path)
    result = cli("extract", tmp_path / "base.safetensors", tmp_path / "ft0.safetensors",
                 tmp_path / "phi.safetensors", "--proportion", "0.01")
    assert result.exit_code == 0, result.output
    phi = ArtifactSource(tmp_path / "phi.safetensors")
    deltas = {k: ft[k] - base[k] for k in base}
    flat = torch.cat([d.reshape(-1) for d in deltas.values()])
    k = int(0.01 * flat.numel())
    threshold = flat.abs().topk(k).values[-1]
    stored = sum(phi.stored_entries(key) for key in phi.keys)
    assert stored == int((flat.abs() >= threshold).sum()) == k
    for key in base:  # the kept entries come back exactly, the rest are zero
        expected = torch.where(deltas[key].abs() >= threshold, deltas[key], 0.0)
        assert torch.equal(phi.read(key), expected), key
    dense_bytes = flat.numel() * 4
    assert phi.total_bytes < 0.01 * dense_bytes * 3 + 4096  # 4-byte value + 8-byte index per entry, plus header

    recipe = write_recipe(tmp_path / "compose.yaml", {
        "models": {"base": "base.safetensors", "phi": "phi.safetensors"},
        "nodes": {"out": {"op": "sft_compose", "inputs": {"base": "base", "deltas": ["phi"]}}},
        "outputs": [{"from": "out", "path": "composed"}],
    })
    assert cli("run", recipe, "--quiet").exit_code == 0
    composed = read_checkpoint(tmp_path / "composed")
    for key in base:
        assert torch.equal(composed[key], base[key] + phi.read(key)), key


def test_density_one_is_the_dense_delta_and_disjoint_deltas_add(tmp_path):
    base, ft = _model_pair(tmp_path)
    full = ops.sft_extract(base=base, fine_tuned=ft, proportion=1.0)
    for key in base:
        assert torch.equal(full[key], ft[key] - base[key])
    even = {k: torch.where(torch.arange(v.numel()).reshape(v.shape) % 2 == 0, v, 0.0) for k, v in full.items()}
    odd = {k: v - even[k] for k, v in full.items()}
    composed = ops.sft_compose(base=base, deltas=[even, odd])
    summed = ops.apply(base=base, delta=full)
    for key in base:
        torch.testing.assert_close(composed[key], summed[key], rtol=0, atol=1e-6)


def test_streamed_global_mask_equals_brute_force_and_writes_an_artifact(tmp_path):
    base, ft = _model_pair(tmp_path)
    recipe = write_recipe(tmp_path / "mask.yaml", {
        "models": {"base": "base.safetensors", "ft": "ft0.safetensors"},
        "nodes": {"m": {"op": "mask_topk", "inputs": {"base": "base", "fine_tuned": "ft"},
                        "params": {"proportion": 0.05}, "exclude": ["lm_head"]}},
        "outputs": [{"from": "m", "path": "mask.safetensors"}],
    })
    result = run_recipe(load_recipe(recipe), RunOptions(device="cpu"))
    assert result.summary.passes == 3
    mask = ArtifactSource(tmp_path / "mask.safetensors")
    assert mask.value_type == MASK
    keys = [k for k in base if k != "lm_head.weight"]
    flat = torch.cat([(ft[k] - base[k]).abs().reshape(-1) for k in keys])
    threshold = flat.topk(int(0.05 * flat.numel())).values[-1]
    for key in keys:
        assert torch.equal(mask.read(key), (ft[key] - base[key]).abs() >= threshold), key
    assert not mask.read("lm_head.weight").any()  # excluded: an all-False mask


def test_graft_with_a_mask_artifact_through_a_recipe(tmp_path, cli):
    base, ft = _model_pair(tmp_path)
    mask = {"model.layers.0.w": torch.rand(32, 16, generator=torch.Generator().manual_seed(3)) > 0.9}
    save_artifact(mask, tmp_path / "mask.safetensors", MASK)
    recipe = write_recipe(tmp_path / "graft.yaml", {
        "models": {"pre": "base.safetensors", "ft": "ft0.safetensors", "mask": "mask.safetensors"},
        "nodes": {"g": {"op": "graft", "inputs": {"pretrained": "pre", "fine_tuned": "ft", "mask": "mask"}}},
        "outputs": [{"from": "g", "path": "grafted"}],
    })
    result = cli("run", recipe, "--quiet")
    assert result.exit_code == 0, result.output
    grafted = read_checkpoint(tmp_path / "grafted")
    assert torch.equal(grafted["model.layers.0.w"], torch.where(mask["model.layers.0.w"], ft["model.layers.0.w"],
                                                                base["model.layers.0.w"]))
    for key in base:  # keys the mask does not list keep the pretrained values
        if key != "model.layers.0.w":
            assert torch.equal(grafted[key], base[key]), key


def test_union_intersection_and_overlap(tmp_path, cli):
    base, ft_a = _model_pair(tmp_path, seed=0)
    _, ft_b = _model_pair(tmp_path, seed=1)
    for name in ("0", "1"):
        result = cli("extract", tmp_path / "base.safetensors", tmp_path / f"ft{name}.safetensors",
                     tmp_path / f"mask{name}.safetensors", "--mask", "--proportion", "0.1")
        assert result.exit_code == 0, result.output
    recipe = write_recipe(tmp_path / "masks.yaml", {
        "models": {"a": "mask0.safetensors", "b": "mask1.safetensors"},
        "nodes": {"u": {"op": "mask_union", "inputs": {"masks": ["a", "b"]}},
                  "i": {"op": "mask_intersection", "inputs": {"masks": ["a", "b"]}}},
        "outputs": [{"from": "u", "path": "union.safetensors"}, {"from": "i", "path": "inter.safetensors"}],
    })
    assert cli("run", recipe, "--quiet").exit_code == 0
    a, b = load_artifact(tmp_path / "mask0.safetensors"), load_artifact(tmp_path / "mask1.safetensors")
    union, inter = load_artifact(tmp_path / "union.safetensors"), load_artifact(tmp_path / "inter.safetensors")
    for key in a:
        assert torch.equal(union[key], a[key] | b[key]) and torch.equal(inter[key], a[key] & b[key])
    report = mask_overlap([ArtifactSource(tmp_path / "mask0.safetensors"), ArtifactSource(tmp_path /
                                                                                          "mask1.safetensors")])
    overall = next(iter(report.values()))["overall"]
    expected = sum(int(inter[k].sum()) for k in a) / sum(int(union[k].sum()) for k in a)
    assert abs(overall - expected) < 1e-12 and 0 < overall < 0.2  # independent tasks: nearly disjoint
    shown = cli("overlap", tmp_path / "mask0.safetensors", tmp_path / "mask1.safetensors")
    assert shown.exit_code == 0 and "block 0" in shown.output and f"{overall:.4f}" in shown.output
    described = cli("inspect", tmp_path / "mask0.safetensors")
    assert described.exit_code == 0 and "Mask" in described.output and "10.0" in described.output


def test_artifact_path_must_be_a_file(tmp_path, cli):
    _model_pair(tmp_path)
    recipe = write_recipe(tmp_path / "r.yaml", {
        "models": {"base": "base.safetensors", "ft": "ft0.safetensors"},
        "nodes": {"m": {"op": "mask_topk", "inputs": {"base": "base", "fine_tuned": "ft"}}},
        "outputs": [{"from": "m", "path": "mask-folder"}],
    })
    result = cli("run", recipe)
    assert result.exit_code == 2 and "must end in .safetensors" in result.output


def test_optimize_mask_improves_on_the_base_patch():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    w_true = torch.randn(8, 1)
    y = x @ w_true
    pre = {"layers.0.w": torch.zeros(8, 1)}
    ft = {"layers.0.w": w_true + 0.05 * torch.randn(8, 1)}

    def loss(params):
        return ((x @ params["layers.0.w"] - y) ** 2).mean()

    result = optimize_mask(pre, ft, loss, sparsity=0.25, steps=30, lr=5e4)
    assert result.history[0] >= result.score
    assert result.mask["layers.0.w"].dtype == torch.bool
    assert loss({"layers.0.w": torch.where(result.mask["layers.0.w"], ft["layers.0.w"], 0.0)}) <= result.history[0]


def test_an_artifact_has_the_same_bytes_whatever_order_its_keys_come_in(tmp_path):
    """Compute threads hand keys on as they finish: the file lists them in the planned order regardless."""
    g = torch.Generator().manual_seed(0)
    deltas = {f"layers.{i}.w": torch.randn(40, 30, generator=g).mul_(torch.rand(40, 30, generator=g) > 0.7)
              for i in range(4)}
    files = {}
    for name, arrival in (("planned", list(deltas)), ("reversed", list(reversed(deltas)))):
        for value_type, values in ((SPARSE_DELTA, deltas), (MASK, {k: v != 0 for k, v in deltas.items()})):
            path = tmp_path / f"{name}-{value_type}.safetensors"
            writer = ArtifactWriter(path, value_type, {"node": "n"}, key_order=list(deltas))
            for key in arrival:
                writer.write(key, values[key])
            writer.finish_weights()
            writer.commit(replace=False)
            files[name, value_type] = path.read_bytes()
    for value_type in (SPARSE_DELTA, MASK):
        assert files["planned", value_type] == files["reversed", value_type]
    assert list(ArtifactSource(tmp_path / f"reversed-{SPARSE_DELTA}.safetensors").keys) == list(deltas)
    loaded = load_artifact(tmp_path / f"reversed-{SPARSE_DELTA}.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in deltas.items())
