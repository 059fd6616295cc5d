"""What goes on disk: adapter state dicts (and, later, metadata and the PEFT format)."""

from lightning_peft.checkpoint.state import adapter_state_dict, load_adapter_state_dict

__all__ = ["adapter_state_dict", "load_adapter_state_dict"]
