"""A ``transformers`` model of a folder's architecture holding weights from elsewhere (a merge in memory,
a source read key by key), for the few steps that must run a model: evaluation and a MoE's router."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mergebench.errors import MergebenchError


def model_from_state(loader: Any, folder: Path, state: dict[str, torch.Tensor], dtype: torch.dtype
                     ) -> torch.nn.Module:
    """``loader.from_config(folder's config)`` with ``state`` loaded (a tied head may be absent); one error
    naming the keys when the weights do not fit the architecture."""
    import transformers
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every weight is about to be replaced: no random initialisation
        model = loader.from_config(transformers.AutoConfig.from_pretrained(folder), dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    lacking = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if lacking or unexpected:
        raise MergebenchError(f"the weights do not fit {folder}'s architecture (missing {lacking[:3]}, "
                              f"unexpected {unexpected[:3]})")
    model.tie_weights()
    return model
