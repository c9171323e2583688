"""TIES, DARE, DAREx-q, Breadcrumbs, BitDelta, SLERP and LiNeS: the golden examples of docs/semantics.md and
the properties that make them trustworthy at model scale."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from conftest import read_checkpoint, write_recipe
from mergebench import operators as ops
from mergebench.engine.runner import RunOptions, run_recipe
from mergebench.io.checkpoint import Checkpoint
from mergebench.operators.base import KeyContext
from mergebench.operators.dare import keep_mask, rescale_kept
from mergebench.recipe import load_recipe
from mergebench.surgery import numerics
from mergebench.surgery.numerics import FEW, draw_seed, sum_of_signs, threshold_for, weighted_sum

T = torch.tensor
TIES_TAUS = [T([4.0, -1, 0.5, -3, 2]), T([-2.0, 3, 0.2, -1, -5]), T([1.0, 2, -6, 0.1, 1.5])]
BREADCRUMBS_TAU = T([0.1, -5, 0.3, 2, -0.2, 1, 0.05, -0.4, 0.6, 3])


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=tol, rtol=tol)


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_ties_golden(scope):
    close(ops.ties(deltas=TIES_TAUS, density=0.6, scope=scope), [4, 2.5, -6, -3, -5])


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_ties_zero_sum_takes_the_majority_sign(scope):
    close(ops.ties(deltas=[T([2.0, 1]), T([-2.0, 1])], density=1.0, scope=scope), [2, 1])


@pytest.mark.parametrize(("agg", "expected"), [("sum", [4, 5, -6, -3, -5]), ("max", [4, 3, -6, -3, -5])])
def test_ties_aggregations(agg, expected):
    close(ops.ties(deltas=TIES_TAUS, density=0.6, agg=agg), expected)


def test_ties_with_base_applies_lambda():
    base = T([1.0, 1, 1, 1, 1])
    out = ops.ties(base=base, models=[base + t for t in TIES_TAUS], density=0.6, lambda_=0.5)
    close(out, [3, 2.25, -2, -0.5, -1.5])


def test_dare_golden_with_injected_mask():
    tau, keep = T([0.1, -0.2, 0.3, 0.4]), T([True, False, False, True])
    close(rescale_kept(tau, keep, 1 / (1 - 0.5)), [0.2, 0, 0, 0.8])
    close(rescale_kept(tau, keep, 1 / 0.8), [0.125, 0, 0, 0.5])  # DAREx-q, q = 0.8


def test_dare_statistics_and_seeds():
    tau = torch.linspace(-1, 1, 100_000)
    dropped = ops.dare(deltas=[tau], p=0.9)[0]
    kept = (dropped != 0).float().mean().item()
    assert abs(kept - 0.1) < 0.003
    sigma = (tau.square().mean() * (0.9 / 0.1) / tau.numel()).sqrt().item()  # std of the mean of m·τ/(1−p)
    assert abs(dropped.mean().item() - tau.mean().item()) < 3 * sigma
    assert torch.equal(dropped, ops.dare(deltas=[tau], p=0.9)[0])
    assert not torch.equal(dropped, ops.dare(deltas=[tau], p=0.9, seed=1)[0])
    two = ops.dare(deltas=[tau, tau], p=0.9)
    assert torch.equal(two[0], dropped) and not torch.equal(two[1], dropped)  # one mask per input position


def test_dare_mask_does_not_depend_on_key_order_or_neighbours():
    a = {"x": torch.ones(50), "y": torch.ones(7)}
    b = {"y": torch.ones(7), "x": torch.ones(50)}
    alone = ops.dare(deltas=[{"x": torch.ones(50)}], p=0.5)[0]["x"]
    assert torch.equal(ops.dare(deltas=[a], p=0.5)[0]["x"], ops.dare(deltas=[b], p=0.5)[0]["x"])
    assert torch.equal(ops.dare(deltas=[a], p=0.5)[0]["x"], alone)


def test_dare_mask_is_the_seeded_draw_of_the_whole_key():
    """semantics §0.5: keep iff torch.rand(shape, generator seeded by (seed, "dare", position, key)) >= p,
    also for a key larger than the pieces the draws are made in."""
    shape = (3, 65_536 + 7)
    dropped = ops.dare(deltas=[{"w": torch.ones(shape)}], p=0.3, seed=5)[0]["w"]
    generator = torch.Generator().manual_seed(draw_seed(5, "dare", 0, "w"))
    assert torch.equal(dropped != 0, torch.rand(shape, generator=generator) >= 0.3)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.3, 0.5, 1 / 3, 0.9, 2**-24, 1 - 2**-24, 1.0])
def test_dare_masks_from_numpy_words_are_torch_rand_compared_with_p(p):
    """The masks are computed on the MT19937 words behind torch.rand: the same draws, the same comparison."""
    ctx = KeyContext("layer.w", None, 0, (), seed=3)
    numel = 2 * 65_536 + 11  # three pieces, the last one short
    mask = keep_mask(torch.Size([numel]), p, ctx, index=1)
    generator = torch.Generator().manual_seed(draw_seed(3, "dare", 1, "layer.w"))
    assert torch.equal(mask, torch.rand(numel, generator=generator) >= p)


def test_sum_of_signs_stays_exact_past_the_integers_of_float32():
    """The sum, 2²⁴ + 7, is no float32: one float32 sum over all the signs gives 2²⁴ + 8."""
    values = torch.ones(2**24 + 21)
    values[:5], values[5:9] = -2.0, 0.0
    assert sum_of_signs(values) == (2**24 + 21 - 9) - 5


def _bf16_deltas(n: int) -> torch.Tensor:
    """|θ_ft − θ_base| of bf16 weights a few units in the last place apart: few distinct magnitudes."""
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(n, generator=generator).to(torch.bfloat16)
    steps = torch.randint(-3, 4, (n,), generator=generator).to(torch.bfloat16)
    return (base + steps * base.abs() * 2**-7).float().sub(base.float()).abs()


def _mostly_bf16_deltas(n: int) -> torch.Tensor:
    """bf16 task vectors where one entry in 3 is not a bf16 value (a weight near zero, say): bins hold both."""
    magnitudes = _bf16_deltas(n)
    magnitudes[::3] *= 1 + 2**-20
    return magnitudes


@pytest.mark.parametrize("data", ["normal", "bf16 deltas", "mostly bf16 deltas", "rescaled bf16 deltas",
                                  "one value"])
@pytest.mark.parametrize("fraction", [0.0001, 0.2, 0.5, 0.9999])
@pytest.mark.parametrize("piece", [numerics.FINE_PIECE, 65_536])  # the tensor in one piece, or in four
def test_threshold_is_the_kth_largest_magnitude(data, fraction, piece, monkeypatch):
    """Both histogram passes, with the k-th largest in a bin of a few entries or of thousands; or the coarse
    pass alone, when the k-th largest is the floor of its bin (bfloat16 values: their low bits are zero)."""
    monkeypatch.setattr(numerics, "FINE_PIECE", piece)
    n = 200_003
    magnitudes = {"normal": lambda: torch.randn(n, generator=torch.Generator().manual_seed(3)).abs(),
                  "bf16 deltas": lambda: _bf16_deltas(n),
                  "mostly bf16 deltas": lambda: _mostly_bf16_deltas(n),
                  "rescaled bf16 deltas": lambda: _bf16_deltas(n) / 0.7,  # DARE's rescaling: few values, low bits
                  "one value": lambda: torch.full((n,), 0.3)}[data]()
    k = max(1, int(n * fraction))
    kth = float(magnitudes.sort(descending=True).values[k - 1])
    assert threshold_for(magnitudes, k) == kth
    selector = numerics.ExactThreshold()
    selector.add_coarse(magnitudes)
    needs_fine = selector.choose_bin(k)
    bits = magnitudes.view(torch.int32)
    in_bin = bits[(bits >> numerics.HALF_BITS) == selector.bin]
    above_floor = int((in_bin & (numerics.BINS - 1) != 0).sum())
    assert needs_fine == (selector.rank <= above_floor)  # settled exactly when the k-th largest is the floor
    if data == "bf16 deltas" or (data == "mostly bf16 deltas" and fraction >= 0.5):
        assert not needs_fine
    if data in ("normal", "one value") or (data == "mostly bf16 deltas" and fraction <= 0.2):
        assert needs_fine
    if not needs_fine:
        assert kth == float(torch.tensor([selector.bin << numerics.HALF_BITS], dtype=torch.int32).view(torch.float32))
    else:  # the fine counts are exactly those of the bin's entries, every piece counted
        selector.add_fine(magnitudes)
        assert torch.equal(selector.fine, torch.bincount(in_bin & (numerics.BINS - 1), minlength=numerics.BINS))
        if data == "rescaled bf16 deltas" and fraction == 0.5:  # the fine pass counted thousands of one bin
            assert in_bin.numel() > 10 * FEW


@pytest.mark.parametrize("cuts", [[], [4096, 8192], [1000, 5000, 9001], list(range(1, 12_345, 777))])
def test_chunked_dot_has_the_same_bits_however_the_tensors_are_cut(cuts):
    """SLERP's norms and angle, gathered whole or slice by slice (slices of any length), are one number."""
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(12_345, generator=g) * 1e3, torch.randn(12_345, generator=g)
    bounds = [0, *cuts, x.numel()]
    dot = numerics.ChunkedDot()
    for start, end in zip(bounds, bounds[1:]):
        dot.add(x[start:end], y[start:end])
    whole = numerics.ChunkedDot()
    whole.add(x, y)
    exact = math.fsum((x.double() * y.double()).tolist())  # float32 products are exact in float64
    scale = math.fsum((x.double() * y.double()).abs().tolist())
    assert dot.total() == whole.total() and abs(whole.total() - exact) <= 1e-6 * scale


@pytest.mark.parametrize("weights", [[1.0, 0.3, -2.0], [1.0, 0.0, 0.5], [0.0, 1.0, 1.0], [0.7, 1.0, 1.0], [1.0]])
def test_weighted_sum_has_the_bits_of_multiplying_then_adding(weights):
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(1000, generator=g) for _ in weights]
    tensors[0][:4] = torch.tensor([-0.0, float("inf"), float("nan"), 1e38])
    expected = None
    for tensor, weight in zip(tensors, weights):
        if weight != 0:
            expected = torch.mul(tensor, weight) if expected is None else expected.add_(tensor, alpha=weight)
    total = weighted_sum(tensors, weights)
    assert torch.equal(total.view(torch.int32), expected.view(torch.int32))
    assert all(total.data_ptr() != t.data_ptr() for t in tensors)


def test_darex_q_with_q_one_minus_p_is_dare():
    tau = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    p = 0.7
    assert torch.equal(ops.darex_q(deltas=[tau], p=p, q=1 - p)[0], ops.dare(deltas=[tau], p=p)[0])
    assert torch.equal(ops.darex_q(deltas=[tau], p=p)[0], ops.dare(deltas=[tau], p=p)[0])
    drop_only = ops.darex_q(deltas=[tau], p=p, q=1.0)[0]
    assert torch.equal(drop_only, torch.where(drop_only != 0, tau, 0.0))


def test_dare_linear_and_dare_ties_at_p_zero_are_their_bases():
    base = T([1.0, 1, 1, 1, 1])
    models = [base + t for t in TIES_TAUS]
    close(ops.dare_linear(base=base, models=models, p=0.0, lambda_=0.5),
          ops.task_arithmetic(base=base, models=models, lambda_=0.5))
    close(ops.dare_ties(base=base, models=models, p=0.0, density=0.6), ops.ties(base=base, models=models, density=0.6))


def test_dare_ties_drops_then_merges():
    base = torch.zeros(1000)
    models = [torch.randn(1000, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    dropped = ops.dare(base=base, models=models, p=0.5)
    close(ops.dare_ties(base=base, models=models, p=0.5), ops.ties(deltas=dropped, density=1.0))


@pytest.mark.parametrize("granularity", ["per_tensor", "row"])
def test_breadcrumbs_golden(granularity):
    out = ops.breadcrumbs(deltas=[BREADCRUMBS_TAU], gamma=0.1, density=0.3, granularity=granularity, lambda_=1.0)
    close(out, [0, 0, 0, 2, 0, 1, 0, 0, 0, 3])


def test_breadcrumbs_rows_are_masked_independently():
    tau = torch.stack([BREADCRUMBS_TAU, -BREADCRUMBS_TAU.flip(0)])
    out = ops.breadcrumbs(deltas=[tau], gamma=0.1, density=0.3, granularity="row", lambda_=1.0)
    close(out[0], [0, 0, 0, 2, 0, 1, 0, 0, 0, 3])
    close(out[1], [-3, 0, 0, 0, -1, 0, -2, 0, 0, 0])


def test_bitdelta_golden_and_default_targets():
    close(ops.bitdelta(base=torch.zeros(4), fine_tuned=T([0.5, -1.5, 0, 2]), targets="all"), [1, -1, 1, 1])
    base = {"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2), "model.norm.weight": torch.zeros(2)}
    ft = {"model.layers.0.mlp.up_proj.weight": T([[0.5, -1.5], [0.0, 2.0]]), "model.norm.weight": T([0.3, -0.1])}
    out = ops.bitdelta(base=base, fine_tuned=ft)
    close(out["model.layers.0.mlp.up_proj.weight"], [[1, -1], [1, 1]])
    assert torch.equal(out["model.norm.weight"], ft["model.norm.weight"])  # not compressed: fine-tuned values


@pytest.mark.parametrize(("a", "b", "t", "expected"), [
    ([2.0, 0], [0.0, 1], 0.5, [1.414214, 0.707107]),
    ([1.0, 0], [0.0, 1], 0.25, [0.923880, 0.382683]),
    ([1.0, 1], [2.0, 2], 0.5, [1.5, 1.5]),
    ([0.0, 0], [2.0, 2], 0.5, [1.0, 1.0]),  # a zero vector: lerp
])
def test_slerp_golden(a, b, t, expected):
    close(ops.slerp(a=T(a), b=T(b), t=t), expected)


def test_slerp_schedule_over_blocks():
    """A gradient reads x = ℓ/(L−1) in the blocks, 0 before them (embeddings), 1 after (semantics §0.8)."""
    a = {f"layers.{i}.w": T([1.0, 0]) for i in range(3)} | {"head.w": T([1.0, 0]), "embed.w": T([1.0, 0])}
    b = {k: T([0.0, 1]) for k in a}
    out = ops.slerp(a=a, b=b, t=[0.0, 1.0])
    close(out["embed.w"], [1, 0])
    close(out["layers.0.w"], [1, 0])
    close(out["layers.1.w"], [0.707107, 0.707107])
    close(out["layers.2.w"], [0, 1])
    close(out["head.w"], [0, 1])
    filtered = ops.slerp(a=a, b=b, t=[{"filter": "head", "value": 0.25}, {"value": [0.0, 1.0]}])
    close(filtered["head.w"], [0.923880, 0.382683])
    close(filtered["layers.1.w"], [0.707107, 0.707107])


LINES_TAU = {"embed.w": T([4.0]), "layers.0.w": T([2.0, 4]), "layers.1.w": T([3.0, -6]),
             "layers.2.w": T([6.0, 12]), "layers.3.w": T([1.0, -1])}
LINES_EXPECTED = {"embed.w": [2.0], "layers.0.w": [1, 2], "layers.1.w": [2, -4], "layers.2.w": [5, 10],
                  "layers.3.w": [1, -1]}


def test_lines_single_golden():
    zero = {k: torch.zeros_like(v) for k, v in LINES_TAU.items()}
    out = ops.lines(base=zero, fine_tuned=LINES_TAU, alpha=0.5, beta=0.5)
    for key, expected in LINES_EXPECTED.items():
        close(out[key], expected)
    scaled_delta = ops.lines(delta=LINES_TAU, alpha=0.5, beta=0.5)
    for key, expected in LINES_EXPECTED.items():
        close(scaled_delta[key], expected)


def test_lines_single_defaults_alpha_0_1_beta_0_9():
    out = ops.lines(delta={"layers.0.w": T([1.0]), "layers.1.w": T([1.0]), "final.w": T([1.0])})
    close(out["layers.0.w"], [0.1])
    close(out["layers.1.w"], [1.0])
    close(out["final.w"], [0.1])
    split = ops.lines(delta={"embed.w": T([1.0]), "layers.0.w": T([1.0]), "layers.1.w": T([1.0]),
                             "norm.w": T([1.0])}, outside_blocks="split")
    close(split["embed.w"], [0.1])
    close(split["norm.w"], [1.0])


def test_lines_auto_alpha_for_task_arithmetic_is_one_over_t():
    taus = [{"layers.0.w": T([1.0, -2]), "layers.1.w": T([3.0, 0])},
            {"layers.0.w": T([0.5, 1]), "layers.1.w": T([-1.0, 2])}]
    merged = ops.task_arithmetic(deltas=taus, lambda_=1.0)
    out = ops.lines(delta=merged, task_deltas=taus, beta=0.0)  # β = 0: every key scaled by α alone
    for key in merged:
        close(out[key], merged[key] * 0.5)


def test_lines_auto_alpha_ratio_of_l1_norms():
    taus = [{"w": T([6.0, 0])}, {"w": T([0.0, 4])}]  # ‖Σ τ‖₁ = 10
    merged = {"w": T([5.0, -3])}  # ‖τ_MTL‖₁ = 8
    close(ops.lines(delta=merged, task_deltas=taus, beta=0.0)["w"], [5 * 0.625, -3 * 0.625])


def _stack(template: str, count: int) -> list[str]:
    return [template.format(i) for i in range(count)]


LLAMA = _stack("model.layers.{}.mlp.down_proj.weight", 12) + ["model.layers.10.mlp.experts.3.w1.weight",
                                                              "model.embed_tokens.weight"]
GPT2 = _stack("transformer.h.{}.attn.c_attn.weight", 12) + ["transformer.wte.weight"]
BERT = _stack("encoder.layer.{}.attention.self.query.weight", 12) + ["embeddings.word_embeddings.weight"]
T5 = (_stack("decoder.block.{}.layer.1.EncDecAttention.q.weight", 4)  # decoder first, as sorted headers list it
      + _stack("encoder.block.{}.layer.0.SelfAttention.q.weight", 6) + ["shared.weight"])
OPEN_CLIP = _stack("visual.transformer.resblocks.{}.mlp.c_fc.weight", 12) + _stack(
    "transformer.resblocks.{}.attn.in_proj_weight", 6)

BLOCK_CASES = {
    "llama": (LLAMA, "model.layers.7.mlp.down_proj.weight", "separate", (7, 12)),
    "moe expert": (LLAMA, "model.layers.10.mlp.experts.3.w1.weight", "separate", (10, 12)),
    "outside blocks": (LLAMA, "model.embed_tokens.weight", "separate", None),
    "gpt2": (GPT2, "transformer.h.7.attn.c_attn.weight", "separate", (7, 12)),
    "bert": (BERT, "encoder.layer.7.attention.self.query.weight", "separate", (7, 12)),
    "t5 encoder": (T5, "encoder.block.3.layer.0.SelfAttention.q.weight", "separate", (3, 6)),
    "t5 decoder": (T5, "decoder.block.3.layer.1.EncDecAttention.q.weight", "separate", (3, 4)),
    "t5 encoder concatenated": (T5, "encoder.block.3.layer.0.SelfAttention.q.weight", "concatenate", (3, 10)),
    "t5 decoder concatenated": (T5, "decoder.block.3.layer.1.EncDecAttention.q.weight", "concatenate", (9, 10)),
    "open_clip visual": (OPEN_CLIP, "visual.transformer.resblocks.7.mlp.c_fc.weight", "separate", (7, 12)),
    "open_clip text": (OPEN_CLIP, "transformer.resblocks.5.attn.in_proj_weight", "separate", (5, 6)),
}


@pytest.mark.parametrize("case", sorted(BLOCK_CASES))
def test_block_assignment_across_architectures(case):
    from mergebench.surgery.layers import BlockIndex

    keys, key, mode, expected = BLOCK_CASES[case]
    assert BlockIndex(keys, stack_mode=mode).position(key) == expected


def test_block_regex_ignores_expert_numbers():
    from mergebench.surgery.layers import block_index

    assert block_index("model.layers.10.mlp.experts.3.w1.weight") == 10
    assert block_index("model.embed_tokens.weight") is None


def _multi_tensor_model(tmp_path, tasks=3):
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (50, 8), "model.layers.0.w": (8, 8), "model.layers.0.b": (8,),
              "model.layers.1.w": (16, 8), "model.layers.2.w": (8, 16), "lm_head.weight": (50, 8)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    models = [{k: v + torch.randn(v.shape, generator=g) * (0.1 + i) for k, v in base.items()} for i in range(tasks)]
    save_file(base, tmp_path / "base.safetensors")
    for i, m in enumerate(models):
        save_file(m, tmp_path / f"ft{i}.safetensors")
    return base, models


def _brute_force_ties(base, models, density, lam, exclude=()):
    keys = [k for k in base if not any(e in k for e in exclude)]
    flat = torch.stack([torch.cat([(m[k] - base[k]).flatten() for k in keys]) for m in models])
    n = flat.shape[1]
    k = int(density * n + 1e-9)
    trimmed = []
    for row in flat:
        threshold = row.abs().sort(descending=True).values[k - 1]
        trimmed.append(torch.where(row.abs() >= threshold, row, 0.0))
    trimmed = torch.stack(trimmed)
    signs = torch.sign(trimmed.sum(0))
    majority = torch.sign(signs.sum())
    signs = torch.where(signs == 0, majority, signs)
    agree = (trimmed != 0) & (torch.sign(trimmed) == signs)
    merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    out, offset = {}, 0
    for key in keys:
        size = base[key].numel()
        out[key] = base[key] + lam * merged[offset:offset + size].reshape(base[key].shape)
        offset += size
    return out


def test_global_ties_streamed_equals_brute_force_concatenation(tmp_path):
    base, models = _multi_tensor_model(tmp_path)
    recipe = write_recipe(tmp_path / "ties.yaml", {
        "models": {"base": "base.safetensors", **{f"ft{i}": f"ft{i}.safetensors" for i in range(3)}},
        "nodes": {"ties": {"op": "ties", "inputs": {"base": "base", "models": ["ft0", "ft1", "ft2"]},
                           "params": {"density": 0.3, "lambda": 0.8}, "exclude": ["lm_head"]}},
        "outputs": [{"from": "ties", "path": "out"}],
    })
    sources = {name: Checkpoint(tmp_path / f"{name}.safetensors") for name in ("base", "ft0", "ft1", "ft2")}
    result = run_recipe(load_recipe(recipe), RunOptions(device="cpu"), sources=sources)
    assert result.summary.passes == 4  # coarse histogram, fine histogram, majority sign, merge
    assert sources["ft0"].reads["lm_head.weight"] == 0  # excluded: never read from the fine-tunes
    merged = read_checkpoint(tmp_path / "out")
    expected = _brute_force_ties(base, models, 0.3, 0.8, exclude=("lm_head",))
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6)
    assert torch.equal(merged["lm_head.weight"], base["lm_head.weight"])


def test_global_ties_of_bf16_fine_tunes_settles_its_thresholds_in_the_coarse_pass(tmp_path):
    """Task vectors of bf16 checkpoints a few units in the last place apart are bf16 values themselves: the coarse
    histogram's bin is the threshold, and the fine pass (a whole read of every input) is skipped."""
    g = torch.Generator().manual_seed(5)
    shapes = {"model.layers.0.w": (64, 32), "model.layers.1.w": (32, 64), "model.layers.1.b": (64,)}
    base = {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items()}
    models = [{k: (v + torch.randint(-3, 4, v.shape, generator=g).to(torch.bfloat16) * v.abs() * 2**-7)
               for k, v in base.items()} for _ in range(3)]
    for name, state in [("base", base), *((f"ft{i}", m) for i, m in enumerate(models))]:
        save_file(state, tmp_path / f"{name}.safetensors")
    recipe = write_recipe(tmp_path / "ties.yaml", {
        "models": {"base": "base.safetensors", **{f"ft{i}": f"ft{i}.safetensors" for i in range(3)}},
        "nodes": {"ties": {"op": "ties", "inputs": {"base": "base", "models": ["ft0", "ft1", "ft2"]},
                           "params": {"density": 0.3}}},
        "outputs": [{"from": "ties", "path": "out"}],
    })
    result = run_recipe(load_recipe(recipe), RunOptions(device="cpu"))
    assert result.summary.passes == 3  # coarse histogram, majority sign, merge
    upcast = [{k: v.float() for k, v in state.items()} for state in (base, *models)]
    expected = _brute_force_ties(upcast[0], upcast[1:], 0.3, 1.0)
    merged = read_checkpoint(tmp_path / "out")
    for key, value in expected.items():
        assert torch.equal(merged[key], value.to(torch.bfloat16)), key


def test_per_tensor_ties_needs_one_pass(tmp_path):
    _multi_tensor_model(tmp_path, tasks=2)
    recipe = write_recipe(tmp_path / "ties.yaml", {
        "models": {"base": "base.safetensors", "a": "ft0.safetensors", "b": "ft1.safetensors"},
        "nodes": {"ties": {"op": "ties", "inputs": {"base": "base", "models": ["a", "b"]},
                           "params": {"scope": "per_tensor"}}},
        "outputs": [{"from": "ties", "path": "out"}],
    })
    assert run_recipe(load_recipe(recipe), RunOptions(device="cpu")).summary.passes == 1


def test_composition_delta_ties_lines_apply(tmp_path):
    base, models = _multi_tensor_model(tmp_path)
    recipe = write_recipe(tmp_path / "compose.yaml", {
        "models": {"base": "base.safetensors", **{f"ft{i}": f"ft{i}.safetensors" for i in range(3)}},
        "nodes": {
            "tv": {"op": "delta", "inputs": {"base": "base", "models": ["ft0", "ft1", "ft2"]}},
            "merged": {"op": "ties", "inputs": {"deltas": "tv"}, "params": {"density": 0.2, "scope": "global"}},
            "scaled": {"op": "lines", "inputs": {"delta": "merged", "task_deltas": "tv"},
                       "params": {"mode": "multi", "beta": 0.5}},
            "out": {"op": "apply", "inputs": {"base": "base", "delta": "scaled"}, "params": {"scale": 1.0}},
        },
        "outputs": [{"from": "out", "path": "out"}],
    })
    result = run_recipe(load_recipe(recipe), RunOptions(device="cpu"))
    assert result.summary.passes == 5  # TIES: 3 statistics passes, then LiNeS' L1 pass, then the main pass
    ties_model = _brute_force_ties(base, models, 0.2, 1.0)
    tau_mtl = {k: ties_model[k] - base[k] for k in base}
    summed = sum(float(sum(m[k] - base[k] for m in models).abs().sum()) for k in base)
    alpha = summed / (3 * sum(float(t.abs().sum()) for t in tau_mtl.values()))
    scales = {"model.layers.0.w": alpha, "model.layers.0.b": alpha, "model.layers.1.w": alpha + 0.25,
              "model.layers.2.w": alpha + 0.5, "model.embed_tokens.weight": alpha, "lm_head.weight": alpha}
    merged = read_checkpoint(tmp_path / "out")
    for key in base:
        torch.testing.assert_close(merged[key], base[key] + scales[key] * tau_mtl[key], rtol=1e-5, atol=1e-5)


NEW_GOLDEN_RECIPES = [
    ("ties", {"deltas": ["a", "b", "c"]}, {"density": 0.6}, TIES_TAUS, [4, 2.5, -6, -3, -5]),
    ("breadcrumbs", {"deltas": ["a"]}, {"gamma": 0.1, "density": 0.3, "lambda": 1.0}, [BREADCRUMBS_TAU],
     [0, 0, 0, 2, 0, 1, 0, 0, 0, 3]),
    ("slerp", {"a": "a", "b": "b"}, {"t": 0.25}, [T([1.0, 0]), T([0.0, 1])], [0.923880, 0.382683]),
    ("bitdelta", {"base": "a", "fine_tuned": "b"}, {"targets": "all"}, [torch.zeros(4), T([0.5, -1.5, 0, 2])],
     [1, -1, 1, 1]),
]


@pytest.mark.parametrize(("op", "inputs", "params", "tensors", "expected"), NEW_GOLDEN_RECIPES,
                         ids=[c[0] for c in NEW_GOLDEN_RECIPES])
def test_golden_through_yaml(tmp_path, cli, op, inputs, params, tensors, expected):
    names = ["a", "b", "c"][:len(tensors)]
    for name, tensor in zip(names, tensors):
        save_file({"layers.0.w": tensor}, tmp_path / f"{name}.safetensors")
    save_file({"layers.0.w": torch.zeros_like(tensors[0])}, tmp_path / "zero.safetensors")
    nodes = {"m": {"op": op, "inputs": inputs, "params": params}}
    if "deltas" in inputs:  # the golden vectors are deltas from a zero base; the result is applied to it
        nodes["tv"] = {"op": "delta", "inputs": {"base": "zero", "models": names}}
        nodes["m"]["inputs"] = {"deltas": "tv"}
        nodes["out"] = {"op": "apply", "inputs": {"base": "zero", "delta": "m"}}
    recipe = write_recipe(tmp_path / "r.yaml", {
        "models": {"zero": "zero.safetensors", **{n: f"{n}.safetensors" for n in names}},
        "nodes": nodes,
        "outputs": [{"from": "out" if "out" in nodes else "m", "path": "out"}],
    })
    result = cli("run", recipe, "--quiet")
    assert result.exit_code == 0, result.output
    close(read_checkpoint(tmp_path / "out")["layers.0.w"], expected)
