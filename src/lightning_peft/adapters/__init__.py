"""What is trained: one file per method, each a frozen config dataclass and its module."""

from lightning_peft.adapters.lora import LoRA, LoRALinear
from lightning_peft.adapters.protocol import AdapterModule, MergeableAdapter, is_adapter

__all__ = ["AdapterModule", "LoRA", "LoRALinear", "MergeableAdapter", "is_adapter"]
