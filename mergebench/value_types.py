"""The value types that flow along a recipe's edges, shared by the operators' contract, the recipe's
validation and the sources and writers that hold them on disk (a Mask is an artifact file, an Adapter a
PEFT folder)."""

from __future__ import annotations

CHECKPOINT = "Checkpoint"
DELTA = "Delta"
SEQUENCE = "Sequence"  # ordered checkpoints of one training run, with their steps
MASK = "Mask"  # per key, a boolean tensor (an artifact file: mergebench.io.artifacts)
SPARSE_DELTA = "SparseDelta"  # per key, a delta stored as indices and values (an artifact file)
ACTIVATIONS = "Activations"  # per layer, [samples, neurons] recorded on shared inputs (an artifact file)
FISHER = "Fisher"  # per parameter, its diagonal Fisher information on the user's data (an artifact file)
GRAM = "Gram"  # per linear layer, XᵀX of its inputs on the user's data, [in, in] (an artifact file)
ADAPTER = "Adapter"  # per key, a low-rank update (a PEFT LoRA folder: mergebench.io.adapters)
FILE_ARTIFACTS = (MASK, SPARSE_DELTA, ACTIVATIONS, FISHER, GRAM)  # one .safetensors file each
# dense float32 tensors stored as recorded, by tensor-name prefix and the suffix that makes a layer a model key
DENSE_STATISTICS = {ACTIVATIONS: ("activations/", ".weight"), GRAM: ("gram/", ".weight"), FISHER: ("fisher/", "")}
ARTIFACT_TYPES = (*FILE_ARTIFACTS, ADAPTER)  # typed inputs and outputs that are not checkpoints


def list_of(value_type: str) -> str:
    return f"[{value_type}]"


def is_list_type(value_type: str) -> bool:
    return value_type.startswith("[")


def element_type(value_type: str) -> str:
    return value_type[1:-1] if is_list_type(value_type) else value_type
