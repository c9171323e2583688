"""mergebench: model merging and weight surgery as a YAML DAG of weight operators, streamed.

    import mergebench as mb
    from mergebench import operators as ops

    merged = ops.wise_ft(zero_shot=sd0, fine_tuned=sd1, alpha=0.4)          # eager, state dicts
    node = ops.wise_ft(zero_shot=mb.load("base"), fine_tuned=mb.load("ft"))  # lazy, checkpoints
    node.save("out/merged")
    mb.run("merge.yaml", set={"wise.alpha": 0.3})

Imports are lazy so that ``mergebench --help`` answers without loading torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MergebenchError", "extract", "extract_lora", "load", "plan", "record", "run", "search", "sweep"]


def __getattr__(name: str) -> Any:
    if name in ("extract", "extract_lora", "load", "plan", "record", "run", "search", "sweep"):
        from mergebench import api

        return getattr(api, name)
    if name == "MergebenchError":
        from mergebench.errors import MergebenchError

        return MergebenchError
    raise AttributeError(f"module 'mergebench' has no attribute {name!r}")
