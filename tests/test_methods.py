"""The methods of issue 24 on small tensors: independent numpy references (the FusionBench and paper
definitions, written out again), hand-computed values, and the properties that define each method."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergebench import operators as ops


def T(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(actual: torch.Tensor, expected, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    np.testing.assert_allclose(actual.double().numpy(), np.asarray(expected, dtype=np.float64), rtol=rtol, atol=atol)


def _tasks(seed: int, shape=(12, 8), count: int = 3):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = [base + 0.3 * torch.randn(shape, generator=g) for _ in range(count)]
    return base, models


def _np_polar(m):
    u, _, vh = np.linalg.svd(m, full_matrices=False)
    return u @ vh


# ---- FusionBench's data-free subspace family, written from the papers' definitions with numpy ----

def tsv_reference(taus):
    t = len(taus)
    u0, s0, vh0 = np.linalg.svd(taus[0], full_matrices=False)
    r = int(s0.size / t)
    su, ss, svh = np.zeros_like(u0), np.zeros_like(s0), np.zeros_like(vh0)
    for i, tau in enumerate(taus):
        u, s, vh = np.linalg.svd(tau, full_matrices=False)
        su[:, i * r:(i + 1) * r], ss[i * r:(i + 1) * r], svh[i * r:(i + 1) * r] = u[:, :r], s[:r], vh[:r]
    return _np_polar(su) @ np.diag(ss) @ _np_polar(svh)


def iso_c_reference(taus):
    u, s, vh = np.linalg.svd(sum(taus), full_matrices=False)
    return u @ np.diag(np.full_like(s, s.mean())) @ vh


def iso_cts_reference(taus, fraction):
    t, k = len(taus), min(taus[0].shape)
    common = k - round((k - int(k * fraction)) / t) * t
    per = (k - common) // t
    u, s, vh = np.linalg.svd(sum(taus), full_matrices=False)
    cu = u[:, :common]
    us, ss, vs = [], [], []
    for tau in taus:
        a, b, c = np.linalg.svd(tau - cu @ cu.T @ tau, full_matrices=False)
        us.append(a[:, :per]), ss.append(b[:per]), vs.append(c[:per])
    big_u = np.concatenate([*us, cu], axis=1)
    big_s = np.concatenate([*ss, s[:common]])
    big_v = np.concatenate([*vs, vh[:common]], axis=0)
    return _np_polar(big_u) @ np.diag(np.full_like(big_s, big_s.mean())) @ _np_polar(big_v)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_subspace_methods_equal_their_numpy_definitions(seed):
    base, models = _tasks(seed)
    taus = [(m - base).double().numpy() for m in models]
    b = base.double().numpy()
    close(ops.tsv_m(base=base, models=models, alpha=0.7), b + 0.7 * tsv_reference(taus), rtol=1e-4, atol=1e-5)
    close(ops.iso_c(base=base, models=models, alpha=1.3), b + 1.3 * iso_c_reference(taus), rtol=1e-4, atol=1e-5)
    close(ops.iso_cts(base=base, models=models, common_space_fraction=0.5),
          b + iso_cts_reference(taus, 0.5), rtol=1e-4, atol=1e-5)


def test_subspace_methods_average_vectors_and_the_average_keys():
    base, models = _tasks(3, shape=(8,))
    mean_tau = sum(m - base for m in models) / 3
    for op in (ops.tsv_m, ops.iso_c, ops.iso_cts):
        close(op(base=base, models=models), base + mean_tau)
    matrices = {"embed.weight": torch.randn(6, 4), "layers.0.w": torch.randn(6, 4)}
    tuned = [{k: v + 0.1 * torch.randn(v.shape) for k, v in matrices.items()} for _ in range(2)]
    out = ops.iso_c(base=matrices, models=tuned, average="embed")
    close(out["embed.weight"], matrices["embed.weight"] + sum(t["embed.weight"] - matrices["embed.weight"]
                                                            for t in tuned) / 2)
    assert not torch.allclose(out["layers.0.w"], matrices["layers.0.w"] + sum(
        t["layers.0.w"] - matrices["layers.0.w"] for t in tuned) / 2)


def test_iso_c_flattens_the_spectrum_of_the_summed_task_vector():
    """Hand-computed: Σ τ = diag(3, 1) has σ = (3, 1); Iso-C gives diag(2, 2)."""
    base = torch.zeros(2, 2)
    out = ops.iso_c(base=base, models=[T([[2.0, 0], [0, 0.5]]), T([[1.0, 0], [0, 0.5]])])
    close(out, [[2, 0], [0, 2]])


def test_tsv_of_one_task_is_its_task_vector():
    base, models = _tasks(4, count=1)
    close(ops.tsv_m(base=base, models=models), models[0], rtol=1e-4, atol=1e-5)


def test_magmax_golden_and_ties_to_the_first_task():
    out = ops.magmax(deltas=[T([1.0, -3.0, 2.0]), T([-2.0, 1.0, -2.0])], **{"lambda": 0.5})
    close(out, [-1.0, -1.5, 1.0])


def pcb_reference(taus, ratio):
    """PCB_merge of the reference implementation (duguodong7/pcb-merging), in numpy."""
    n, d = taus.shape

    def clamp(x, lo, hi):
        s = np.sort(x, axis=1)
        return np.clip(x, s[:, int(d * lo)][:, None], s[:, int(d * (1 - hi) - 1)][:, None])

    def norm(x):
        return (x - x.min(1, keepdims=True)) / (x.max(1, keepdims=True) - x.min(1, keepdims=True))

    mags = clamp(np.abs(taus), 0.0001, 0.0001)
    clipped = np.sign(taus) * mags
    score = np.exp(n * norm(mags) ** 2) * np.tanh(taus * taus.sum(0))
    scale = norm(clamp(score, 1 - ratio, 0))
    return (clipped * scale).sum(0) / np.maximum(scale.sum(0), 1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_pcb_per_tensor_equals_the_reference_on_each_tensor(seed):
    base, models = _tasks(seed, shape=(40, 25))
    taus = np.stack([(m - base).double().numpy().reshape(-1) for m in models])
    expected = base.double().numpy() + 0.8 * pcb_reference(taus, 0.2).reshape(40, 25)
    close(ops.pcb(base=base, models=models, ratio=0.2, **{"lambda": 0.8}), expected, rtol=1e-4, atol=1e-5)


# ---- mergekit's methods: properties (their arithmetic is checked against mergekit in test_mergekit.py) ----

def test_karcher_of_identical_models_returns_the_model():
    model = torch.randn(5, 7)
    close(ops.karcher(models=[model, model.clone(), model.clone()]), model, rtol=1e-5, atol=1e-6)


def test_karcher_of_two_equal_norm_models_is_their_slerp_midpoint():
    a, b = T([3.0, 0.0]), T([0.0, 3.0])
    close(ops.karcher(models=[a, b]), ops.slerp(a=a, b=b, t=0.5))
    close(ops.karcher(models=[a, b]), [2.121320, 2.121320])


def test_multislerp_of_two_equal_norm_models_with_equal_weights_is_slerp():
    """Multi-SLERP projects on the tangent space instead of the log map: it is SLERP at the midpoint (and for
    equal norms), not at every weight (docs/methods.md)."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(64, generator=g)
    b = torch.randn(64, generator=g)
    b = b / b.norm() * a.norm()
    close(ops.multislerp(models=[a, b]), ops.slerp(a=a, b=b, t=0.5), rtol=1e-5, atol=1e-6)


def test_nuslerp_flattened_is_slerp_at_the_weight_ratio():
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    close(ops.nuslerp(models=[a, b], weights=[1.0, 3.0]), ops.slerp(a=a, b=b, t=0.75), rtol=1e-5, atol=1e-6)


def test_model_stock_with_two_equidistant_fine_tunes_follows_its_closed_form():
    """Two fine-tunes at the same distance from the base at angle θ: t = 2cos θ / (1 + cos θ) (Jang et al.)."""
    base = torch.zeros(2)
    a, b = T([1.0, 0.0]), T([0.5, 3 ** 0.5 / 2])  # 60°: cos θ = 1/2, t = 2/3
    out = ops.model_stock(base=base, models=[a, b])
    close(out, (2 / 3) * (a + b) / 2)


def test_nearswap_golden():
    """w = clamp(t/|a − b|, 0, 1): |Δ| = 0.05 < t swaps fully, |Δ| = 0.4 takes a quarter, |Δ| = 2 takes 0.05."""
    out = ops.nearswap(base=T([1.0, 1.0, 1.0]), model=T([1.05, 1.4, 3.0]), t=0.1)
    close(out, [1.05, 1.1, 1.1])


def test_sce_golden():
    """Two tasks on 4 entries; variances 0, 4, 0.01, 2.25 (3 non-zero), so select_topk 0.7 keeps ⌊2.1⌋ = 2:
    entries 1 and 3. τ1 = (0, −2, 0, 0), τ2 = (0, 2, 0, 3); energies 1 and 3.25 give w = (4/17, 13/17).
    Entry 1 sums to 0, which elects +: τ1 is erased there and τ2's 2 is kept whole; entry 3 keeps τ2's 3."""
    base = torch.zeros(4)
    t1, t2 = T([1.0, -2.0, 0.1, 0.0]), T([1.0, 2.0, 0.3, 3.0])
    close(ops.sce(base=base, models=[t1, t2], select_topk=0.7), [0.0, 2.0, 0.0, 3.0])
    close(ops.sce(base=base, models=[t1, t2], select_topk=0.5), [0.0, 2.0, 0.0, 0.0])  # ⌊1.5⌋ = 1 entry


def test_arcee_fusion_keeps_only_the_important_changes():
    base = torch.zeros(1, 9)
    tuned = T([[0.01, 0.02, 0.01, 0.03, 0.02, 0.01, 0.02, 0.01, 5.0]])
    out = ops.arcee_fusion(base=base, fine_tuned=tuned)
    close(out, [[0, 0, 0, 0, 0, 0, 0, 0, 5.0]])


# ---- DELLA: its draws, in distribution ----

def test_della_keeps_entries_with_the_rank_probabilities_and_rescales_them():
    rows, n = 400, 11
    tau = torch.arange(1, n + 1, dtype=torch.float32).repeat(rows, 1)  # ranks 0..10 in every row
    base = torch.zeros(rows, n)
    out = ops.della_linear(base=base, models=[tau], density=0.5, epsilon=0.3, seed=3)
    kept = out != 0
    expected_keep = 0.2 + 0.6 * torch.arange(n) / (n - 1)
    observed = kept.float().mean(0)
    assert torch.all((observed - expected_keep).abs() < 4 * torch.sqrt(expected_keep * (1 - expected_keep) / rows))
    close(out[kept], (tau / expected_keep)[kept], rtol=1e-5)  # each kept entry divided by its probability
    again = ops.della_linear(base=base, models=[tau], density=0.5, epsilon=0.3, seed=3)
    assert torch.equal(out, again)  # the draws are the seed's


def test_della_with_consensus_drops_the_minority_sign():
    base = torch.zeros(2000)
    up, down = torch.ones(2000), -0.5 * torch.ones(2000)
    out = ops.della(base=base, models=[up, down], density=0.99, epsilon=0.005, rescale=False)
    # kept entries of `up` win the sign vote wherever they are kept; normalize divides by the agreeing weight
    assert set(out.unique().tolist()) <= {1.0, -0.5, 0.0}
    assert (out == 1.0).float().mean() > 0.95
