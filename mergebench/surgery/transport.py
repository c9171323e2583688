"""Optimal-transport maps between two layers' neurons (OTFusion, Singh & Jaggi 2020; semantics §3).

For each layer in forward order, A's rows (already aligned on their inputs by the previous map) are
matched to B's rows by an exact (``ot.emd``) or entropic (log-domain Sinkhorn) transport plan with
uniform marginals; the plan, divided by its column sums, is the map T̂ that carries A's neurons onto
B's. The maps are all that is kept; the fused weights are computed key by key afterwards.
"""

from __future__ import annotations

import numpy as np
import torch

from mergebench.errors import MergebenchError

EPS_CORRECTION = 1e-7
EMD_MAX_ITER = 10_000_000  # network simplex iterations; POT's default (1e5) stops early on layers of thousands


def ground_cost(a: torch.Tensor, b: torch.Tensor, squared: bool) -> np.ndarray:
    """Euclidean distances between the rows of a and b, float64 C-contiguous as POT wants."""
    cost = torch.cdist(a.double(), b.double())
    cost = cost.square() if squared else cost
    return np.ascontiguousarray(cost.numpy())


def transport_map(cost: np.ndarray, solver: str, reg: float, num_iter_max: int = 10000,
                  stop_thr: float = 1e-9) -> torch.Tensor:
    """T̂ = T·diag(1/(Tᵀ1 + 1e-7)) for the optimal plan T between uniform marginals."""
    n_a, n_b = cost.shape
    mu, nu = np.full(n_a, 1.0 / n_a), np.full(n_b, 1.0 / n_b)
    if not np.isfinite(cost).all() or (cost < 0).any():
        raise MergebenchError("ot_fusion: the ground cost has negative or non-finite entries")
    import ot  # POT takes a second to import: only recipes that fuse by transport pay for it

    if solver == "emd":
        plan, log = ot.emd(mu, nu, cost, numItermax=EMD_MAX_ITER, log=True)
        if log.get("result_code") != 1:
            raise MergebenchError(f"ot_fusion: the exact solver stopped before optimality on a {n_a}×{n_b} layer "
                                  f"({log.get('warning')}); use solver: sinkhorn for layers this wide")
    else:
        plan = ot.sinkhorn(mu, nu, cost, reg, method="sinkhorn_log", numItermax=num_iter_max, stopThr=stop_thr)
    if not np.isfinite(plan).all() or abs(plan.sum() - 1) > 1e-4:
        raise MergebenchError(f"ot_fusion: the transport plan did not converge (mass {plan.sum():.3g}); "
                              f"normalize the cost or raise 'reg'")
    plan = torch.from_numpy(np.asarray(plan, dtype=np.float64))
    return plan / (plan.sum(0, keepdim=True) + EPS_CORRECTION)


def layer_maps(weights_a: list[torch.Tensor], weights_b: list[torch.Tensor], biases_a: list[torch.Tensor | None],
               biases_b: list[torch.Tensor | None], solver: str, reg: float, squared: bool,
               last_layer: str, activations: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
               ) -> list[torch.Tensor | None]:
    """T̂_l for every layer of a chain (None for a last layer fused by identity).

    With ``activations`` (each layer's ``[samples, neurons]`` outputs of A and of B on the same inputs)
    the ground cost compares what the neurons compute rather than their weights (OTFusion's
    activation-based variant): it needs no alignment of the layer's inputs.
    """
    maps: list[torch.Tensor | None] = []
    incoming = None
    for index, (w_a, w_b) in enumerate(zip(weights_a, weights_b)):
        rows_a = incoming_aligned(w_a.double(), incoming)
        if index == len(weights_a) - 1 and last_layer == "identity":
            maps.append(None)
            break
        if activations is not None:
            incoming = transport_map(ground_cost(activations[0][index].double().T, activations[1][index].double().T,
                                                 squared), solver, reg)
            maps.append(incoming)
            continue
        rows_a, rows_b = rows_a.reshape(rows_a.shape[0], -1), w_b.double().reshape(w_b.shape[0], -1)
        if biases_a[index] is not None and biases_b[index] is not None:
            rows_a = torch.cat([rows_a, biases_a[index].double().unsqueeze(1)], 1)
            rows_b = torch.cat([rows_b, biases_b[index].double().unsqueeze(1)], 1)
        incoming = transport_map(ground_cost(rows_a, rows_b, squared), solver, reg)
        maps.append(incoming)
    return maps


def incoming_aligned(weight: torch.Tensor, incoming: torch.Tensor | None) -> torch.Tensor:
    """W·T̂_{l−1} on the input axis (axis 1), for linear ``[out, in]`` and conv ``[out, in, ...]`` weights.

    The map (planned on the CPU) is moved to the weight's device.

    A linear layer after a flatten reads C channels × P positions (channel-major, as torch flattens):
    its input axis is viewed as ``[C, P]`` and the map applies to C.
    """
    if incoming is None:
        return weight
    channels = incoming.shape[0]
    incoming = incoming.to(weight.device, weight.dtype)
    if weight.dim() == 2 and weight.shape[1] != channels:
        if weight.shape[1] % channels:
            raise MergebenchError(f"ot_fusion: {weight.shape[1]} inputs do not flatten {channels} channels")
        blocks = weight.reshape(weight.shape[0], channels, -1)
        return torch.einsum("oip,ij->ojp", blocks, incoming).reshape(weight.shape[0], -1)
    return torch.einsum("oi...,ij->oj...", weight, incoming)
