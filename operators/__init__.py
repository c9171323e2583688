"""The operator families; importing this package registers every operator.

Each operator is callable: eagerly on tensors or state dicts, lazily on ``mergebench.load``
checkpoints (``ops.wise_ft(zero_shot=a, fine_tuned=b, alpha=0.4)``).
"""

from mergebench.operators.base import REGISTRY, Operator
from mergebench.operators.interpolation import linear, wise_ft
from mergebench.operators.task_vectors import apply, delta, task_arithmetic

__all__ = ["REGISTRY", "Operator", "apply", "delta", "linear", "task_arithmetic", "wise_ft"]
