"""The operator families; importing this package registers every operator.

Each operator is callable: eagerly on tensors or state dicts, lazily on ``mergebench.load``
checkpoints (``ops.wise_ft(zero_shot=a, fine_tuned=b, alpha=0.4)``).
"""

from mergebench.operators.alignment import align, ot_fusion, weight_matching
from mergebench.operators.base import REGISTRY, Operator
from mergebench.operators.bitdelta import bitdelta
from mergebench.operators.breadcrumbs import breadcrumbs
from mergebench.operators.dare import dare, dare_linear, darex_q
from mergebench.operators.interpolation import linear, wise_ft
from mergebench.operators.lines import lines
from mergebench.operators.localization import graft, mask_intersection, mask_topk, mask_union
from mergebench.operators.sequence import bema, ema, momentum_interp
from mergebench.operators.slerp import slerp
from mergebench.operators.sparse import sft_compose, sft_extract
from mergebench.operators.task_vectors import apply, delta, task_arithmetic
from mergebench.operators.ties import dare_ties, ties

__all__ = [
    "REGISTRY", "Operator", "align", "apply", "bema", "bitdelta", "breadcrumbs", "dare", "dare_linear", "dare_ties",
    "darex_q", "delta", "ema", "graft", "linear", "lines", "mask_intersection", "mask_topk", "mask_union",
    "momentum_interp", "ot_fusion", "sft_compose", "sft_extract", "slerp", "task_arithmetic", "ties",
    "weight_matching", "wise_ft",
]
