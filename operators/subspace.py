"""Data-free subspace merging, per matrix (semantics §9.14): Task Singular Vectors (TSV-M) and isotropic merging
in the common (Iso-C) and common + task-specific (Iso-CTS) subspaces, as FusionBench implements them.

Every 2-D tensor is merged through SVDs of its task vectors, one key at a time (the SVD of a 4096 × 11008
matrix is in the benchmark); other tensors, and keys matching ``average``, take the mean task vector.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from pydantic import Field

from mergebench.operators.base import (
    CHECKPOINT,
    DELTA,
    KeyContext,
    Params,
    Regex,
    list_of,
    operator,
    signature,
)
from mergebench.operators.task_vectors import finish, task_vectors

SIGNATURES = [signature(CHECKPOINT, base=CHECKPOINT, models=list_of(CHECKPOINT)),
              signature(DELTA, deltas=list_of(DELTA))]


class SubspaceParams(Params):
    alpha: float = Field(1.0, description="scaling of the merged task vector")
    average: Regex | None = Field(None, description="regex of 2-D keys merged by the mean task vector instead "
                                                    "(FusionBench's exclude_keys)")

    def in_subspace(self, tau: torch.Tensor, key: str) -> bool:
        return tau.dim() == 2 and not (self.average and re.search(self.average, key))


def _mean(taus: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(taus).mean(dim=0)


def _merged(p: SubspaceParams, ctx: KeyContext, base: torch.Tensor | None, taus: list[torch.Tensor],
            merge: Callable[[list[torch.Tensor]], torch.Tensor]) -> torch.Tensor:
    """θ_0 + α·merge(τ) on the keys merged in the subspace, θ_0 + α·mean(τ) on the others."""
    merged = merge(taus) if p.in_subspace(taus[0], ctx.key) else _mean(taus)
    return finish(merged.mul_(p.alpha), base)


def _polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal factor U·Vᵀ of the reduced SVD: the nearest matrix with orthonormal columns (or rows)."""
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def tsv_merge(taus: list[torch.Tensor]) -> torch.Tensor:
    """Each task keeps its top ⌊k/T⌋ singular triplets (k = min(m, n)); their U blocks and V blocks are
    concatenated, orthogonalised (polar factor) and recombined with the kept singular values."""
    count = len(taus)
    u0, s0, vh0 = torch.linalg.svd(taus[0], full_matrices=False)
    rank = int(s0.shape[0] * (1 / count))
    sum_u, sum_s, sum_vh = torch.zeros_like(u0), torch.zeros_like(s0), torch.zeros_like(vh0)
    for i, tau in enumerate(taus):
        u, s, vh = (u0, s0, vh0) if i == 0 else torch.linalg.svd(tau, full_matrices=False)
        block = slice(i * rank, (i + 1) * rank)
        sum_u[:, block], sum_s[block], sum_vh[block, :] = u[:, :rank], s[:rank], vh[:rank, :]
    return torch.linalg.multi_dot((_polar(sum_u), torch.diag(sum_s), _polar(sum_vh)))


class TsvParams(SubspaceParams):
    weights: list[float] | None = Field(None, description="per-task scales applied before the SVDs (FusionBench's "
                                                          "alpha list)")


@operator(
    "tsv_m",
    paper="Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025 "
          "(arXiv:2412.00081)",
    signatures=SIGNATURES, params=TsvParams)
def tsv_m(p: TsvParams, ctx: KeyContext, base=None, models=None, deltas=None) -> torch.Tensor:
    """θ_0 + α·TSV-M(τ_1…τ_T) on 2-D keys; θ_0 + α·mean(τ) on the others."""
    taus = task_vectors(base, models, deltas)
    if p.weights is not None:
        taus = [tau * w for tau, w in zip(taus, p.weights)]
    return _merged(p, ctx, base, taus, tsv_merge)


def isotropic(matrix: torch.Tensor) -> torch.Tensor:
    """U·diag(mean σ)·Vᵀ: the matrix's singular directions with a flat spectrum."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return torch.linalg.multi_dot((u, torch.diag(torch.full_like(s, float(s.mean()))), vh))


@operator(
    "iso_c",
    paper="Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, "
          "ICML 2025 (arXiv:2502.04959)",
    signatures=SIGNATURES, params=SubspaceParams)
def iso_c(p: SubspaceParams, ctx: KeyContext, base=None, models=None, deltas=None) -> torch.Tensor:
    """θ_0 + α·iso(Σ_t τ_t) on 2-D keys (the summed task vector with its singular values flattened to their
    mean); θ_0 + α·mean(τ) on the others."""
    return _merged(p, ctx, base, task_vectors(base, models, deltas), lambda taus: isotropic(sum(taus)))


class IsoCtsParams(SubspaceParams):
    common_space_fraction: float = Field(0.8, ge=0, le=1, description="share of the rank given to the common "
                                                                      "subspace (the rest is split among the tasks)")


def iso_cts_merge(taus: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """The common subspace (top singular vectors of Σ τ_t) plus each task's top directions outside it, made
    orthonormal, with a flat spectrum at the mean of the kept singular values."""
    count, k = len(taus), min(taus[0].shape)
    common = int(k * fraction)
    common = k - round((k - common) / count) * count
    per_task = int((k - common) / count)
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    common_u, common_s, common_vh = u[:, :common], s[:common], vh[:common, :]
    space_u, space_s, space_vh = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(vh)
    for i, tau in enumerate(taus):
        specific = tau - common_u @ (common_u.T @ tau)
        ut, st, vht = torch.linalg.svd(specific, full_matrices=False)
        block = slice(i * per_task, (i + 1) * per_task)
        space_u[:, block], space_s[block], space_vh[block, :] = ut[:, :per_task], st[:per_task], vht[:per_task, :]
    shared = slice(count * per_task, count * per_task + common)
    space_u[:, shared], space_s[shared], space_vh[shared, :] = common_u, common_s, common_vh
    flat = torch.full_like(space_s, float(space_s.mean()))
    return torch.linalg.multi_dot((_polar(space_u), torch.diag(flat), _polar(space_vh)))


@operator(
    "iso_cts",
    paper="Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, "
          "ICML 2025 (arXiv:2502.04959)",
    signatures=SIGNATURES, params=IsoCtsParams)
def iso_cts(p: IsoCtsParams, ctx: KeyContext, base=None, models=None, deltas=None) -> torch.Tensor:
    """θ_0 + α·Iso-CTS(τ_1…τ_T) on 2-D keys; θ_0 + α·mean(τ) on the others."""
    return _merged(p, ctx, base, task_vectors(base, models, deltas),
                   lambda taus: iso_cts_merge(taus, p.common_space_fraction))
