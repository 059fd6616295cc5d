"""What goes on disk: adapter state dicts, their metadata, atomic writes (no Lightning here)."""

from lightning_peft.checkpoint.io import atomic_path, partial_path
from lightning_peft.checkpoint.metadata import (
    METADATA_KEY,
    build_metadata,
    check_base_fingerprint,
    check_optimizer_names,
    fingerprint_frozen,
    read_metadata,
)
from lightning_peft.checkpoint.rng import rng_state, set_rng_state
from lightning_peft.checkpoint.state import (
    adapter_state_dict,
    check_adapter_state_dict,
    is_adapter_only,
    load_adapter_state_dict,
)

__all__ = [
    "METADATA_KEY",
    "adapter_state_dict",
    "atomic_path",
    "build_metadata",
    "check_adapter_state_dict",
    "check_base_fingerprint",
    "check_optimizer_names",
    "fingerprint_frozen",
    "is_adapter_only",
    "load_adapter_state_dict",
    "partial_path",
    "read_metadata",
    "rng_state",
    "set_rng_state",
]
