"""A method defined outside the package, as ``docs/extending.md`` builds it: a trained shift
added to a linear layer's output, one vector per layer, merged into the layer's bias.

Nothing in lightning_peft knows this class: the contract suite (``tests/adapters/
test_contract.py``) runs it as it runs the shipped methods, over float and NF4 bases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_peft.adapters import register_method
from lightning_peft.adapters.wrapper import BaseLayerWrapper
from lightning_peft.errors import AdapterConfigError, AdapterStateError
from lightning_peft.quantization import in_out_features, is_linear_layer
from lightning_peft.targeting import Patterns, normalize_patterns


@register_method  # checkpoints may name it: lightning-peft export and serve rebuild it
@dataclass(frozen=True)
class OutputShift:
    """A trainable vector added to the output of each target layer (zero at start)."""

    target_modules: Patterns = "all-linear"  # every linear layer but the output head
    exclude_modules: Patterns = ()

    def __post_init__(self) -> None:
        problems: list[str] = []
        targets = normalize_patterns(self.target_modules, "target_modules", problems)
        excludes = normalize_patterns(self.exclude_modules, "exclude_modules", problems)
        if problems:
            raise AdapterConfigError("invalid OutputShift config:\n  - " + "\n  - ".join(problems))
        object.__setattr__(self, "target_modules", targets)
        object.__setattr__(self, "exclude_modules", excludes)

    def can_wrap(self, module: nn.Module) -> bool:
        return is_linear_layer(module)  # float, Conv1D, 4-bit and 8-bit linear layers

    def wrap(
        self, layer: nn.Module, adapter_name: str = "default", module_name: str = ""
    ) -> OutputShiftLinear:
        return OutputShiftLinear(layer, self, adapter_name)


class OutputShiftLinear(BaseLayerWrapper):
    """``base_layer(x) + shift``; mergeable into the base layer's bias."""

    def __init__(self, base_layer: nn.Module, config: OutputShift, adapter_name: str) -> None:
        super().__init__(base_layer)  # the base's tensors keep their own state-dict names
        _, features = in_out_features(base_layer)
        device = next(base_layer.parameters()).device
        self.config = config
        self.adapter_name = adapter_name
        self.shift = nn.ParameterDict({adapter_name: torch.zeros(features, device=device)})
        self.disabled = False  # disable_adapters sets it
        self.merged = False

    # AdapterModule: the tensors this adapter trains and saves, relative to this module.
    def adapter_params(self) -> list[str]:
        return [f"shift.{self.adapter_name}"]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged:
            return out
        return out + self.shift[self.adapter_name].to(out.dtype)

    # MergeableAdapter: merge_adapters and merge_and_export fold it into the weights.
    @torch.no_grad()
    def merge(self) -> float:
        if not self.merged:
            self._bias().add_(self.shift[self.adapter_name].to(self._bias().dtype))
            self.merged = True
        return 0.0  # the bias is float, even on a 4-bit layer: adding is exact

    @torch.no_grad()
    def unmerge(self) -> float:
        if self.merged:
            self._bias().sub_(self.shift[self.adapter_name].to(self._bias().dtype))
            self.merged = False
        return 0.0

    def _bias(self) -> torch.Tensor:
        bias = self.base_layer.bias
        if bias is None:
            raise AdapterStateError("OutputShift merges into a bias; this layer has none")
        return bias
