"""(IA)^3, Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al. 2022).

Learned vectors rescale the keys, the values and the inner feed-forward activation (§3.3)::

    attention:     softmax(Q (l_k ⊙ K)^T / sqrt(d)) (l_v ⊙ V)
    feed-forward:  (l_ff ⊙ γ(W1 x)) W2

``l_k`` and ``l_v`` scale the *output* of the key and value projections; ``l_ff`` scales the
*input* of the second feed-forward projection (``down_proj`` in Llama, ``c_proj`` in GPT-2's
MLP). All start at one, so the adapted model starts equal to the base, and each folds into
the weight it touches: rows of ``W_k``/``W_v`` (and their bias), columns of ``W2``.

The vectors have Hugging Face PEFT's shapes, ``(out, 1)`` and ``(1, in)``, so adapters move
between the two packages unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_peft.adapters.wrapper import BaseLayerWrapper
from lightning_peft.errors import AdapterConfigError
from lightning_peft.quantization import dequantize, in_out_features, is_linear_layer, write_weight_
from lightning_peft.targeting import Patterns, matches, normalize_patterns


@dataclass(frozen=True)
class IA3:
    """Configuration of (IA)^3 vectors.

    Args:
        target_modules: the layers that get a vector (patterns as in :class:`LoRA`). The
            default is Llama's: keys, values and the second feed-forward projection. GPT-2:
            ``["c_attn", "mlp.c_proj"]``; BERT: ``["key", "value", "output.dense"]``.
        feedforward_modules: which of the targets are feed-forward layers, whose *input* is
            scaled (``l_ff``); the others have their output scaled. Must select targets only.
        exclude_modules: patterns left alone.

    Raises:
        AdapterConfigError: listing every invalid field with the value received.
    """

    target_modules: Patterns = ("k_proj", "v_proj", "down_proj")
    feedforward_modules: Patterns = ("down_proj",)
    exclude_modules: Patterns = ()

    def __post_init__(self) -> None:
        problems: list[str] = []
        targets = normalize_patterns(self.target_modules, "target_modules", problems)
        feedforward = normalize_patterns(self.feedforward_modules, "feedforward_modules", problems)
        excludes = normalize_patterns(self.exclude_modules, "exclude_modules", problems)
        if isinstance(targets, tuple) and isinstance(feedforward, tuple):
            stray = [f for f in feedforward if f not in targets]
            if stray:
                problems.append(
                    f"feedforward_modules must be among target_modules {list(targets)}, got {stray}"
                )
        if problems:
            raise AdapterConfigError("invalid IA3 config:\n  - " + "\n  - ".join(problems))
        object.__setattr__(self, "target_modules", targets)
        object.__setattr__(self, "feedforward_modules", feedforward)
        object.__setattr__(self, "exclude_modules", excludes)

    def can_wrap(self, module: nn.Module) -> bool:
        return is_linear_layer(module)

    def wrap(
        self, layer: nn.Module, adapter_name: str = "default", module_name: str = ""
    ) -> IA3Linear:
        feedforward = bool(self.feedforward_modules) and matches(
            module_name, self.feedforward_modules
        )
        return IA3Linear(layer, self, adapter_name, feedforward=feedforward)


class IA3Linear(BaseLayerWrapper):
    """A linear-like base layer whose output (or, for a feed-forward layer, input) is rescaled
    by a learned vector ``ia3_l``. State-dict keys of the base stay as they were."""

    def __init__(
        self,
        base_layer: nn.Module,
        config: IA3,
        adapter_name: str = "default",
        *,
        feedforward: bool,
    ) -> None:
        super().__init__(base_layer)
        in_features, out_features = in_out_features(base_layer)
        device = next(base_layer.parameters()).device
        shape = (1, in_features) if feedforward else (out_features, 1)
        self.config = config
        self.adapter_name = adapter_name
        self.feedforward = feedforward
        self.merged = False
        self.ia3_l = nn.ParameterDict(
            {adapter_name: nn.Parameter(torch.ones(shape, device=device))}
        )

    def adapter_params(self) -> list[str]:
        return [f"ia3_l.{self.adapter_name}"]

    @property
    def vector(self) -> torch.Tensor:
        return self.ia3_l[self.adapter_name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if self.feedforward:
            return self.base_layer(x * self.vector.flatten().to(x.dtype), *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        return out * self.vector.flatten().to(out.dtype)

    @torch.no_grad()
    def merge(self) -> float:
        """Fold the vector into the weight (rows and bias, or columns); a no-op if merged."""
        if self.merged:
            return 0.0
        error = self._scale_weight_(self.vector.float())
        self.merged = True
        return error

    @torch.no_grad()
    def unmerge(self) -> float:
        """Divide the vector back out; a no-op if not merged."""
        if not self.merged:
            return 0.0
        error = self._scale_weight_(1.0 / self.vector.float())
        self.merged = False
        return error

    def _scale_weight_(self, factor: torch.Tensor) -> float:
        weight = dequantize(self.base_layer).float()  # (out, in)
        if self.feedforward:
            return write_weight_(self.base_layer, weight * factor.view(1, -1))
        bias = getattr(self.base_layer, "bias", None)
        if bias is not None:
            bias.copy_((bias.float() * factor.flatten()).to(bias.dtype))
        return write_weight_(self.base_layer, weight * factor.view(-1, 1))

    def extra_repr(self) -> str:
        scaled = "input" if self.feedforward else "output"
        return f"IA3(scales={scaled}, size={self.vector.numel()}, merged={self.merged})"
