"""LoRA (Hu et al. 2021), with rsLoRA (Kalajdzievski 2023) and DoRA (Liu et al. 2024).

A frozen weight ``W0`` (``(out, in)``) gets a trainable low-rank update::

        x ──► base_layer (W0, frozen, any storage) ─────────────┐
        │                                                       + ──► h
        └─► dropout ─► A (rank × in) ─► B (out × rank) ─► ×s ───┘

    h = W0 x + s · B A x,   s = alpha / rank   (rsLoRA: alpha / sqrt(rank))

A starts random and B at zero, so the adapted layer starts equal to the base (paper §4.1).
DoRA splits the weight into a magnitude ``m`` (one per output row) and a direction::

    W' = m · (W0 + s B A) / ||W0 + s B A||_row,    ||.|| detached (DoRA paper §4.3)

``LoRALinear`` wraps its base layer instead of subclassing it, so the same code runs over
``nn.Linear``, transformers' ``Conv1D`` and bitsandbytes' 4-bit and 8-bit layers; it reads
the base weight only through :func:`lightning_peft.quantization.dequantize`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.adapters.wrapper import BaseLayerWrapper
from lightning_peft.errors import AdapterConfigError
from lightning_peft.quantization import dequantize, in_out_features, is_linear_layer, write_weight_
from lightning_peft.targeting import Patterns, normalize_patterns

LoRAInit = Literal["kaiming", "gaussian"]
_INITS = ("kaiming", "gaussian")


@dataclass(frozen=True)
class LoRA:
    """Configuration of LoRA adapters.

    Args:
        rank: inner dimension ``r`` of the update ``B A``.
        alpha: scale numerator; the update is multiplied by ``alpha / rank``.
        dropout: dropout probability on the adapter's input, in ``[0, 1)``.
        target_modules: module-name suffixes (``["q_proj", "v_proj"]``), one regex matched
            against the full name, or ``"all-linear"`` (every linear layer but the output head).
        exclude_modules: the same kinds of pattern; matching modules are left alone.
        use_rslora: scale by ``alpha / sqrt(rank)``, which keeps high ranks learning.
        use_dora: weight-decomposed LoRA (a trainable magnitude per output feature).
        init: ``"kaiming"`` (uniform, as ``nn.Linear``) or ``"gaussian"`` (std ``1/rank``) for A.

    Raises:
        AdapterConfigError: listing every invalid field with the value received.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Patterns = "all-linear"
    exclude_modules: Patterns = ()
    use_rslora: bool = False
    use_dora: bool = False
    init: LoRAInit = "kaiming"

    def __post_init__(self) -> None:
        problems: list[str] = []
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            problems.append(f"rank must be a positive int, got {self.rank!r}")
        if not _is_number(self.alpha) or self.alpha <= 0:
            problems.append(f"alpha must be a positive number, got {self.alpha!r}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in _INITS:
            problems.append(f"init must be one of {_INITS}, got {self.init!r}")
        targets = normalize_patterns(self.target_modules, "target_modules", problems)
        excludes = normalize_patterns(self.exclude_modules, "exclude_modules", problems)
        if problems:
            raise AdapterConfigError("invalid LoRA config:\n  - " + "\n  - ".join(problems))
        object.__setattr__(self, "target_modules", targets)
        object.__setattr__(self, "exclude_modules", excludes)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def can_wrap(self, module: nn.Module) -> bool:
        return is_linear_layer(module)

    def wrap(
        self, layer: nn.Module, adapter_name: str = "default", module_name: str = ""
    ) -> LoRALinear:
        return LoRALinear(layer, self, adapter_name)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class LoRALinear(BaseLayerWrapper):
    """A linear-like base layer plus one LoRA (or DoRA) update.

    Base tensors keep their own state-dict names (see :class:`BaseLayerWrapper`). Adapter tensors are float32 whatever the base's dtype; inputs are cast to them and the
    update is cast back to the base output's dtype.
    """

    def __init__(self, base_layer: nn.Module, config: LoRA, adapter_name: str = "default") -> None:
        super().__init__(base_layer)
        in_features, out_features = in_out_features(base_layer)
        device = next(base_layer.parameters()).device
        self.config = config
        self.adapter_name = adapter_name
        self.scaling = config.scaling
        self.merged = False
        self.dropout_p = config.dropout
        lora_a = nn.Linear(in_features, config.rank, bias=False, device=device)
        lora_b = nn.Linear(config.rank, out_features, bias=False, device=device)
        if config.init == "gaussian":
            nn.init.normal_(lora_a.weight, std=1.0 / config.rank)
        else:
            nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(lora_b.weight)
        self.lora_A = nn.ModuleDict({adapter_name: lora_a})
        self.lora_B = nn.ModuleDict({adapter_name: lora_b})
        self.lora_magnitude: nn.ParameterDict | None = None
        if config.use_dora:
            # B = 0 at init, so ||W0 + sBA|| = ||W0||: the layer starts equal to the base.
            norm = torch.linalg.norm(dequantize(base_layer).float(), dim=1)
            self.lora_magnitude = nn.ParameterDict({adapter_name: nn.Parameter(norm)})
        self._merged_row_norm: torch.Tensor | None = None

    def adapter_params(self) -> list[str]:
        names = [f"lora_A.{self.adapter_name}.weight", f"lora_B.{self.adapter_name}.weight"]
        if self.lora_magnitude is not None:
            names.append(f"lora_magnitude.{self.adapter_name}")
        return names

    @property
    def lora_a(self) -> nn.Linear:
        return self.lora_A[self.adapter_name]

    @property
    def lora_b(self) -> nn.Linear:
        return self.lora_B[self.adapter_name]

    def delta_weight(self) -> torch.Tensor:
        """The update ``s · B A`` in ``(out, in)`` orientation, float32."""
        return (self.lora_b.weight @ self.lora_a.weight) * self.scaling

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        x = self._cast_once_for_autocast(x)
        out = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return out
        lora_a = self.lora_A[self.adapter_name].weight  # (rank, in)
        lora_b = self.lora_B[self.adapter_name].weight  # (out, rank)
        if self.lora_magnitude is not None:
            return out + self._dora_update(x.to(lora_a.dtype), out).to(out.dtype)
        x = self._dropout(x)
        if torch.is_autocast_enabled(x.device.type) or x.dtype == lora_a.dtype == out.dtype:
            # Fast path: out + s * (x A^T) B^T as one addmm, so scaling and the residual add
            # ride on the matmul. On small models each extra elementwise op costs a kernel
            # launch (or an interpreter round trip) forward and backward, which is most of
            # what an adapter costs over its frozen base.
            hidden = F.linear(x, lora_a)  # (..., rank)
            flat_out = out.reshape(-1, out.shape[-1])  # (tokens, out)
            flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # (tokens, rank)
            return torch.addmm(flat_out, flat_hidden, lora_b.t(), alpha=self.scaling).view(
                out.shape
            )
        update = F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b) * self.scaling
        return out + update.to(out.dtype)

    def _cast_once_for_autocast(self, x: torch.Tensor) -> torch.Tensor:
        """Under autocast, cast the input to the autocast dtype once, for base and adapter.

        Both would cast it anyway (autocast for ``nn.Linear`` and the adapter, bitsandbytes to
        its ``compute_dtype``): one copy instead of two, forward and backward. Only when the
        base computes in that dtype, so the base's result is what it would have been.
        """
        device_type = x.device.type
        if not torch.is_autocast_enabled(device_type) or not x.is_floating_point():
            return x
        dtype = torch.get_autocast_dtype(device_type)
        base_dtype = getattr(self.base_layer, "compute_dtype", None)
        if type(self.base_layer) is nn.Linear or base_dtype == dtype:
            return x.to(dtype)
        return x

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return (
            F.dropout(x, self.dropout_p, training=True) if self.dropout_p and self.training else x
        )

    def _dora_update(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``m/||W'|| · (W0 x + s B A x) - W0 x``: what DoRA adds to the base output."""
        weight = dequantize(self.base_layer).to(x.dtype)
        row_norm = torch.linalg.norm(weight + self.delta_weight().detach(), dim=1).detach()
        scale = (self.lora_magnitude[self.adapter_name] / row_norm).view(1, -1)  # (1, out)
        if not (self.dropout_p and self.training):
            base = out.to(x.dtype)
            bias = getattr(self.base_layer, "bias", None)
            if bias is not None:
                base = base - bias.to(x.dtype)
        else:
            # With dropout active, the magnitude rescales W0 applied to the dropped-out input,
            # as in the reference implementation (Hugging Face PEFT).
            x = self._dropout(x)
            base = F.linear(x, weight)
        update = F.linear(F.linear(x, self.lora_a.weight), self.lora_b.weight) * self.scaling
        return (scale - 1) * base + scale * update

    @torch.no_grad()
    def merge(self) -> float:
        """``W0 <- W0 + s B A`` (DoRA: ``m · (W0 + s B A) / ||W0 + s B A||``); a no-op if merged.

        Returns the largest absolute error the base layer's storage introduced: 0.0 for a
        float32 base, the re-quantization error for a 4-bit or 8-bit one.
        """
        if self.merged:
            return 0.0
        weight = dequantize(self.base_layer).float() + self.delta_weight()
        if self.lora_magnitude is not None:
            self._merged_row_norm = torch.linalg.norm(weight, dim=1)
            weight = weight * (self.lora_magnitude[self.adapter_name] / self._merged_row_norm).view(
                -1, 1
            )
        error = write_weight_(self.base_layer, weight)
        self.merged = True
        return error

    @torch.no_grad()
    def unmerge(self) -> float:
        """Undo :meth:`merge`; a no-op if not merged. Returns the storage error as merge does."""
        if not self.merged:
            return 0.0
        weight = dequantize(self.base_layer).float()
        if self.lora_magnitude is not None:
            weight = weight * (self._merged_row_norm / self.lora_magnitude[self.adapter_name]).view(
                -1, 1
            )
        error = write_weight_(self.base_layer, weight - self.delta_weight())
        self.merged = False
        self._merged_row_norm = None
        return error

    def extra_repr(self) -> str:
        method = "DoRA" if self.lora_magnitude is not None else "LoRA"
        return (
            f"{method}(rank={self.lora_a.out_features}, scaling={self.scaling:g}, "
            f"dropout={self.dropout_p:g}, merged={self.merged})"
        )
