"""What is trained: one file per method, each a frozen config dataclass and its module."""

from typing import Union

from lightning_peft.adapters.bitfit import BitFit, Unfreeze
from lightning_peft.adapters.bottleneck import BottleneckAdapter, BottleneckLinear
from lightning_peft.adapters.ia3 import IA3, IA3Linear
from lightning_peft.adapters.lora import LoRA, LoRALinear
from lightning_peft.adapters.peft_mapping import (
    IA3Mapping,
    LoRAMapping,
    PrefixTuningMapping,
    PromptTuningMapping,
)
from lightning_peft.adapters.prefix import PrefixKV, PrefixTuning, fold_prefix_
from lightning_peft.adapters.prompt import PromptTuning, SoftPrompt
from lightning_peft.adapters.registry import register_method
from lightning_peft.protocol import (
    AdapterModule,
    MergeableAdapter,
    ModelAdapterConfig,
    WrapsLayers,
    is_adapter,
)

# An adapter method, the shipped ones and any other (a class with ``can_wrap``, or with
# ``check`` and ``attach``): the type the CLI and YAML (jsonargparse) check a config's class
# path against, so a method registered outside the package is accepted there too.
MethodConfig = Union[WrapsLayers, ModelAdapterConfig]  # noqa: UP007 (jsonargparse builds the CLI from it)
register_method(LoRA, peft=LoRAMapping())
register_method(IA3, peft=IA3Mapping())
register_method(PromptTuning, peft=PromptTuningMapping())
register_method(PrefixTuning, peft=PrefixTuningMapping())
for _method in (BottleneckAdapter, BitFit, Unfreeze):  # no PEFT equivalent
    register_method(_method)

__all__ = [
    "IA3",
    "AdapterModule",
    "BitFit",
    "BottleneckAdapter",
    "BottleneckLinear",
    "IA3Linear",
    "LoRA",
    "LoRALinear",
    "MergeableAdapter",
    "MethodConfig",
    "PrefixKV",
    "PrefixTuning",
    "PromptTuning",
    "SoftPrompt",
    "Unfreeze",
    "fold_prefix_",
    "is_adapter",
    "register_method",
]
