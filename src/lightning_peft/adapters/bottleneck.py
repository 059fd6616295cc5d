"""Bottleneck adapters: Houlsby et al. 2019 and Pfeiffer et al. 2020.

A small residual MLP applied to a sub-layer's output, before the transformer's own skip
connection (Houlsby §2.1, Figure 2)::

    h ──► down (d → m) ─► activation ─► up (m → d) ─► + ──► h'
    └──────────────────────────────────────────────────┘

    h' = h + W_up f(W_down h + b_down) + b_up,   m = d / reduction_factor

Houlsby places one after the attention output projection and one after the feed-forward
block; Pfeiffer (AdapterFusion §3, the configuration found best) keeps only the one after the
feed-forward block. ``up`` starts at zero, so the adapted model starts equal to the base.
Each adapter trains ``2 m d + d + m`` parameters (Houlsby §2.1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.adapters.init import empty_linear, init_generator, reset_linear_
from lightning_peft.adapters.wrapper import BaseLayerWrapper
from lightning_peft.quantization.layers import is_linear_layer
from lightning_peft.quantization.storage import in_out_features
from lightning_peft.targeting import Patterns, finish_config_, normalize_patterns

Placement = Literal["houlsby", "pfeiffer"]
Activation = Literal["relu", "gelu", "silu", "tanh"]
_PLACEMENTS = ("houlsby", "pfeiffer")
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


@dataclass(frozen=True)
class BottleneckAdapter:
    """Configuration of bottleneck adapters.

    Args:
        reduction_factor: hidden size divided by the bottleneck size ``m`` (at least 1 unit).
        placement: ``"houlsby"`` (after attention and feed-forward) or ``"pfeiffer"``
            (after feed-forward only).
        activation: the nonlinearity between the projections.
        attention_modules: the attention output projections (Llama ``o_proj``; GPT-2
            ``attn.c_proj``; BERT ``attention.output.dense``).
        feedforward_modules: the feed-forward output projections (Llama ``down_proj``; GPT-2
            ``mlp.c_proj``; BERT ``layer.0.output.dense`` style names via a regex).
        exclude_modules: patterns left alone.

    Raises:
        AdapterConfigError: listing every invalid field with the value received.
    """

    reduction_factor: int = 16
    placement: Placement = "houlsby"
    activation: Activation = "relu"
    attention_modules: Patterns = ("o_proj",)
    feedforward_modules: Patterns = ("down_proj",)
    exclude_modules: Patterns = ()

    def __post_init__(self) -> None:
        problems: list[str] = []
        factor = self.reduction_factor
        if isinstance(factor, bool) or not isinstance(factor, int) or factor <= 0:
            problems.append(f"reduction_factor must be a positive int, got {factor!r}")
        if self.placement not in _PLACEMENTS:
            problems.append(f"placement must be one of {_PLACEMENTS}, got {self.placement!r}")
        if self.activation not in _ACTIVATIONS:
            problems.append(
                f"activation must be one of {tuple(_ACTIVATIONS)}, got {self.activation!r}"
            )
        attention = normalize_patterns(self.attention_modules, "attention_modules", problems)
        feedforward = normalize_patterns(self.feedforward_modules, "feedforward_modules", problems)
        excludes = normalize_patterns(self.exclude_modules, "exclude_modules", problems)
        if self.placement == "houlsby" and isinstance(attention, str) != isinstance(
            feedforward, str
        ):
            problems.append(
                "attention_modules and feedforward_modules must both be suffix lists or both be "
                f"regexes, got {attention!r} and {feedforward!r}"
            )
        finish_config_(
            self,
            problems,
            attention_modules=attention,
            feedforward_modules=feedforward,
            exclude_modules=excludes,
        )

    @property
    def target_modules(self) -> Patterns:
        """The layers that get an adapter, from ``placement``."""
        if self.placement == "pfeiffer":
            return self.feedforward_modules
        if isinstance(self.attention_modules, str):
            return f"(?:{self.attention_modules})|(?:{self.feedforward_modules})"
        return (*self.attention_modules, *self.feedforward_modules)

    def can_wrap(self, module: nn.Module) -> bool:
        return is_linear_layer(module)

    def wrap(
        self, layer: nn.Module, adapter_name: str = "default", module_name: str = ""
    ) -> BottleneckLinear:
        return BottleneckLinear(layer, self, adapter_name)


class BottleneckLinear(BaseLayerWrapper):
    """A linear-like base layer followed by a residual bottleneck adapter on its output."""

    def __init__(
        self, base_layer: nn.Module, config: BottleneckAdapter, adapter_name: str = "default"
    ) -> None:
        super().__init__(base_layer)
        _, features = in_out_features(base_layer)
        bottleneck = max(1, features // config.reduction_factor)
        device = next(base_layer.parameters()).device
        self.config = config
        self.adapter_name = adapter_name
        self.activation = _ACTIVATIONS[config.activation]
        down = reset_linear_(
            empty_linear(features, bottleneck, bias=True, device="cpu"),
            init_generator(adapter_name),
        ).to(device)
        up = empty_linear(bottleneck, features, bias=True, device=device)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        self.adapter_down = nn.ModuleDict({adapter_name: down})
        self.adapter_up = nn.ModuleDict({adapter_name: up})
        self.disabled = False

    def adapter_params(self) -> list[str]:
        name = self.adapter_name
        return [
            f"adapter_down.{name}.weight",
            f"adapter_down.{name}.bias",
            f"adapter_up.{name}.weight",
            f"adapter_up.{name}.bias",
        ]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return out
        down = self.adapter_down[self.adapter_name]
        up = self.adapter_up[self.adapter_name]
        update = up(self.activation(down(out.to(down.weight.dtype))))
        return out + update.to(out.dtype)

    def extra_repr(self) -> str:
        down = self.adapter_down[self.adapter_name]
        return f"Bottleneck({down.in_features} -> {down.out_features}, {self.config.activation})"
