"""LoRA (Hu et al. 2021), with rsLoRA (Kalajdzievski 2023) and DoRA (Liu et al. 2024).

A frozen weight ``W0`` (``(out, in)``) gets a trainable low-rank update::

        x ──► base_layer (W0, frozen, any storage) ─────────────┐
        │                                                       + ──► h
        └─► dropout ─► A (rank × in) ─► B (out × rank) ─► ×s ───┘

    h = W0 x + s · B A x,   s = alpha / rank   (rsLoRA: alpha / sqrt(rank))

A starts random and B at zero, so the adapted layer starts equal to the base (paper §4.1);
LoftQ starts both from the SVD of what the 4-bit base misses (see ``quantization.loftq``).
DoRA splits the weight into a magnitude ``m`` (one per output row) and a direction::

    W' = m · (W0 + s B A) / ||W0 + s B A||_row,    ||.|| detached (DoRA paper §4.3)

``LoRALinear`` wraps its base layer instead of subclassing it, so the same code runs over
``nn.Linear``, transformers' ``Conv1D`` and bitsandbytes' 4-bit and 8-bit layers; it reads
the base weight only through :func:`lightning_peft.quantization.dense_weight`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.adapters.init import (
    empty_linear,
    init_generator,
    preset_for_layer,
    reset_linear_,
    values_will_be_loaded,
)
from lightning_peft.adapters.routing import Routing
from lightning_peft.adapters.wrapper import BaseLayerWrapper, LinearDict, NamedAdapters
from lightning_peft.errors import AdapterConfigError, AdapterStateError
from lightning_peft.quantization.layers import is_linear_layer, write_weight_
from lightning_peft.quantization.storage import dense_weight, in_out_features, is_quantized
from lightning_peft.targeting import Patterns, finish_config_, normalize_patterns

LoRAInit = Literal["kaiming", "gaussian", "loftq"]
_INITS = ("kaiming", "gaussian", "loftq")
LOFTQ_NEEDS_FLOAT = (
    "LoRA(init='loftq') computes its initial values from the float weight, together with the "
    "4-bit base: quantize and attach in one call, quantize_model(model, 'nf4', "
    "adapters=LoRA(init='loftq', ...)), or train with precision='nf4-lora' / 'fp4-lora'"
)


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
        init: ``"kaiming"`` (uniform, as ``nn.Linear``) or ``"gaussian"`` (std ``1/rank``) for A,
            B zero; or ``"loftq"`` (LoftQ, Li et al. 2023: A and B such that the 4-bit base
            plus the update approximates the float weight; needs a 4-bit base made in the
            same call, see :func:`~lightning_peft.quantization.quantize_model`).
        loftq_iterations: LoftQ's alternations ``T``. With 1 the base is the usual 4-bit
            base of the float weight (any bitsandbytes loader makes the same); more
            alternations move the base too (the paper's last-alternation base).

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
    loftq_iterations: int = 1

    def __post_init__(self) -> None:
        problems: list[str] = []
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            problems.append(f"rank must be a positive int, got {self.rank!r}")
        if not _is_number(self.alpha) or self.alpha <= 0:
            problems.append(f"alpha must be a positive finite number, got {self.alpha!r}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in _INITS:
            problems.append(f"init must be one of {_INITS}, got {self.init!r}")
        iterations = self.loftq_iterations
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations <= 0:
            problems.append(f"loftq_iterations must be a positive int, got {iterations!r}")
        elif iterations != 1 and self.init != "loftq":
            problems.append(f"loftq_iterations={iterations} needs init='loftq', got {self.init!r}")
        if self.init == "loftq" and self.use_dora is True:
            problems.append("init='loftq' does not combine with use_dora (LoftQ fits B A only)")
        for field in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, field), bool):
                problems.append(f"{field} must be True or False, got {getattr(self, field)!r}")
        targets = normalize_patterns(self.target_modules, "target_modules", problems)
        excludes = normalize_patterns(self.exclude_modules, "exclude_modules", problems)
        finish_config_(self, problems, target_modules=targets, exclude_modules=excludes)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def routable(self) -> bool:
        """Rows of one batch can take different adapters (``mixed_batch``); DoRA's norm of
        the whole merged weight cannot be taken per row."""
        return not self.use_dora

    def can_wrap(self, module: nn.Module) -> bool:
        from lightning_peft.adapters.lora_layers import is_embedding_conv_or_attention

        return is_linear_layer(module) or is_embedding_conv_or_attention(module)

    def wrap(
        self, layer: nn.Module, adapter_name: str = "default", module_name: str = ""
    ) -> LoRALinear:
        """A new wrapper around ``layer``, or ``layer`` itself with this adapter added when it
        is a ``LoRALinear`` already (named adapters)."""
        from lightning_peft.adapters import lora_layers

        if isinstance(layer, LoRALinear):
            layer.add_adapter(self, adapter_name)
            return layer
        if lora_layers.is_embedding_conv_or_attention(layer):
            return lora_layers.wrap_other_layer(layer, self, adapter_name)
        return LoRALinear(layer, self, adapter_name)


@torch.no_grad()
def init_factors_(
    lora_a: nn.Linear, lora_b: nn.Linear, config: LoRA, generator: torch.Generator | None
) -> None:
    """``A`` as ``nn.Linear`` starts (or Gaussian, std ``1/rank``), ``B`` zero: the update
    starts at zero (paper §4.1)."""
    if config.init == "gaussian":
        nn.init.normal_(lora_a.weight, std=1.0 / config.rank, generator=generator)
    else:
        reset_linear_(lora_a, generator)
    nn.init.zeros_(lora_b.weight)


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool, NaN or inf)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class LoRALinear(NamedAdapters, BaseLayerWrapper):
    """A linear-like base layer plus one or more named LoRA (or DoRA) updates.

    Base tensors keep their own state-dict names (see :class:`BaseLayerWrapper`). Adapter tensors
    are float32 whatever the base's dtype; inputs are cast to them and the update is cast back
    to the base output's dtype. Several adapters may share the layer (``add_adapter``); the
    forward adds the active ones' updates, or, under :func:`lightning_peft.mixed_batch`,
    each row's own adapter's update.
    """

    def __init__(self, base_layer: nn.Module, config: LoRA, adapter_name: str = "default") -> None:
        super().__init__(base_layer)
        self.lora_A = LinearDict()
        self.lora_B = LinearDict()
        self.lora_magnitude = nn.ParameterDict()  # DoRA adapters only
        self.configs: dict[str, LoRA] = {}
        self.active_adapters: list[str] = []
        self.disabled = False
        self.routing: Routing | None = None
        self.merged = False
        self._merged_row_norm: torch.Tensor | None = None
        self.add_adapter(config, adapter_name)

    def add_adapter(self, config: LoRA, adapter_name: str) -> None:
        """Attach another adapter under ``adapter_name``; it becomes active too."""
        if self.merged:
            raise AdapterStateError("unmerge the layer before adding adapters to it")
        device = next(self.base_layer.parameters()).device
        # Drawn on the CPU, where the generator is, so a GPU run starts from the same values.
        lora_a, lora_b = self._new_factors(config, init_generator(adapter_name))
        self.lora_A[adapter_name] = lora_a.to(device)
        self.lora_B[adapter_name] = lora_b.to(device)
        if config.use_dora:
            # B = 0 at init, so ||W0 + sBA|| = ||W0||: the layer starts equal to the base.
            norm = torch.linalg.norm(dense_weight(self.base_layer).float(), dim=1)
            self.lora_magnitude[adapter_name] = nn.Parameter(norm)
        self.configs[adapter_name] = config
        self.active_adapters.append(adapter_name)

    def _new_factors(
        self, config: LoRA, generator: torch.Generator | None
    ) -> tuple[nn.Module, nn.Module]:
        """A new adapter's ``A`` (``rank x in``) and ``B`` (``out x rank``), on the CPU."""
        in_features, out_features = self._features()
        lora_a = empty_linear(in_features, config.rank, bias=False, device="cpu")
        lora_b = empty_linear(config.rank, out_features, bias=False, device="cpu")
        if config.init == "loftq":
            preset = preset_for_layer()
            if values_will_be_loaded():  # a checkpoint's values come next
                preset = (torch.zeros_like(lora_a.weight), torch.zeros_like(lora_b.weight))
            elif preset is None or not is_quantized(self.base_layer):
                raise AdapterConfigError(LOFTQ_NEEDS_FLOAT)
            with torch.no_grad():
                lora_a.weight.copy_(preset[0])
                lora_b.weight.copy_(preset[1])
        else:
            init_factors_(lora_a, lora_b, config, generator)
        return lora_a, lora_b

    def _features(self) -> tuple[int, int]:
        """``(in, out)`` of the map the update adds to."""
        return in_out_features(self.base_layer)

    def delete_adapter(self, adapter_name: str) -> None:
        for holder in (self.lora_A, self.lora_B, self.lora_magnitude):
            if adapter_name in holder:
                del holder[adapter_name]
        self.configs.pop(adapter_name)
        if adapter_name in self.active_adapters:
            self.active_adapters.remove(adapter_name)

    def adapter_params(self) -> list[str]:
        names = []
        for name in self.configs:
            names += [f"lora_A.{name}.weight", f"lora_B.{name}.weight"]
            if name in self.lora_magnitude:
                names.append(f"lora_magnitude.{name}")
        return names

    @property
    def scaling(self) -> float:
        return self.config.scaling

    @property
    def dropout_p(self) -> float:
        return self.config.dropout

    @property
    def lora_a(self) -> nn.Linear:
        return self.lora_A[self.adapter_name]

    @property
    def lora_b(self) -> nn.Linear:
        return self.lora_B[self.adapter_name]

    def peft_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Adapter ``adapter_name``'s tensors under the names Hugging Face PEFT gives them
        in its files (relative to this layer, the adapter name left out)."""
        tensors = {
            "lora_A.weight": self.lora_A[adapter_name].weight,
            "lora_B.weight": self.lora_B[adapter_name].weight,
        }
        if adapter_name in self.lora_magnitude:
            tensors["lora_magnitude_vector"] = self.lora_magnitude[adapter_name]
        return tensors

    def delta_weight(self, adapter_name: str | None = None) -> torch.Tensor:
        """The update ``s · B A`` in ``(out, in)`` orientation, float32."""
        name = adapter_name or self.adapter_name
        lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
        return (lora_b @ lora_a) * self.configs[name].scaling

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        x = self._cast_once_for_autocast(x)
        out = self.base_layer(x, *args, **kwargs)
        if self.merged or self.disabled:
            return out
        if self.routing is not None:
            return out + self._routed_update(self.routing, x, out).to(out.dtype)
        for name in self.active_adapters:
            out = self._add_update(x, out, name)
        return out

    def _add_update(self, x: torch.Tensor, out: torch.Tensor, name: str) -> torch.Tensor:
        """``out`` plus adapter ``name``'s update of ``x``."""
        config = self.configs[name]
        lora_a = self.lora_A[name].weight  # (rank, in)
        lora_b = self.lora_B[name].weight  # (out, rank)
        if name in self.lora_magnitude:
            return out + self._dora_update(x.to(lora_a.dtype), out, name).to(out.dtype)
        x = self._dropout(x, config.dropout)
        if torch.is_autocast_enabled(x.device.type) or x.dtype == lora_a.dtype == out.dtype:
            # Fast path: out + s * (x A^T) B^T as one addmm, so scaling and the residual add
            # ride on the matmul. On small models each extra elementwise op costs a kernel
            # launch (or an interpreter round trip) forward and backward, which is most of
            # what an adapter costs over its frozen base.
            hidden = F.linear(x, lora_a)  # (..., rank)
            flat_out = out.reshape(-1, out.shape[-1])  # (tokens, out)
            flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # (tokens, rank)
            return torch.addmm(flat_out, flat_hidden, lora_b.t(), alpha=config.scaling).view(
                out.shape
            )
        update = F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b) * config.scaling
        return out + update.to(out.dtype)

    def _routed_update(self, routing: Routing, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Each row's own adapter's update, for all rows at once: the rows' ``A`` and ``B``
        are gathered from stacks of every routed adapter (ranks zero-padded to the largest),
        so one batched matmul serves the batch and each adapter's gradient comes only from
        its rows. Rows routed to an adapter this layer lacks get no update."""
        present = [n for n in routing.names if n in self.configs]
        if any(n in self.lora_magnitude for n in present):
            raise AdapterStateError("mixed batches do not support DoRA adapters")
        rows = x.shape[0]
        if rows != routing.index.shape[0]:
            raise AdapterStateError(
                f"mixed_batch was given {routing.index.shape[0]} row adapters, the layer got a "
                f"batch of {rows} rows"
            )
        rank = max((self.configs[n].rank for n in present), default=1)
        dtype = self.lora_A[next(iter(self.lora_A))].weight.dtype
        zeros_a = x.new_zeros((rank, x.shape[-1]), dtype=dtype)
        zeros_b = x.new_zeros((out.shape[-1], rank), dtype=dtype)
        stack_a, stack_b, slot = [], [], []
        for name in routing.names:
            if name in self.configs:
                a, b = self.lora_A[name].weight, self.lora_B[name].weight
                pad = rank - a.shape[0]
                stack_a.append(F.pad(a, (0, 0, 0, pad)))
                stack_b.append(F.pad(b * self.configs[name].scaling, (0, pad)))
                slot.append(self.configs[name].dropout)
            else:
                stack_a.append(zeros_a)
                stack_b.append(zeros_b)
                slot.append(0.0)
        index = routing.index.to(x.device)
        rows_a = torch.stack(stack_a)[index]  # (B, rank, in)
        rows_b = torch.stack(stack_b)[index]  # (B, out, rank)
        inputs = x.to(dtype).reshape(rows, -1, x.shape[-1])  # (B, T, in)
        if self.training and any(slot):
            keep = 1 - torch.tensor(slot, device=x.device)[index].view(rows, 1, 1)
            inputs = inputs * torch.bernoulli(keep.expand_as(inputs)) / keep
        hidden = torch.bmm(inputs, rows_a.transpose(1, 2))  # (B, T, rank)
        return torch.bmm(hidden, rows_b.transpose(1, 2)).view(out.shape)

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

    def _dropout(self, x: torch.Tensor, p: float) -> torch.Tensor:
        return F.dropout(x, p, training=True) if p and self.training else x

    def _dora_update(self, x: torch.Tensor, out: torch.Tensor, name: str) -> torch.Tensor:
        """``m/||W'|| · (W0 x + s B A x) - W0 x``: what DoRA adds to the base output."""
        config = self.configs[name]
        weight = dense_weight(self.base_layer).to(x.dtype)
        delta = self.delta_weight(name).detach()
        row_norm = torch.linalg.norm(weight + delta, dim=1).detach()
        scale = (self.lora_magnitude[name] / row_norm).view(1, -1)  # (1, out)
        if not (config.dropout and self.training):
            base = out.to(x.dtype)
            bias = getattr(self.base_layer, "bias", None)
            if bias is not None:
                base = base - bias.to(x.dtype)
        else:
            # With dropout active, the magnitude rescales W0 applied to the dropped-out input,
            # as in the reference implementation (Hugging Face PEFT).
            x = self._dropout(x, config.dropout)
            base = F.linear(x, weight)
        lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
        update = F.linear(F.linear(x, lora_a), lora_b) * config.scaling
        return (scale - 1) * base + scale * update

    @torch.no_grad()
    def merge(self) -> float:
        """``W0 <- W0 + s B A`` (DoRA: ``m · (W0 + s B A) / ||W0 + s B A||``) for the active
        adapter; a no-op if merged.

        Returns the largest absolute error the base layer's storage introduced: 0.0 for a
        float32 base, the re-quantization error for a 4-bit or 8-bit one.
        """
        if self.merged:
            return 0.0
        name = self.adapter_name
        weight = dense_weight(self.base_layer).float() + self.delta_weight(name)
        if name in self.lora_magnitude:
            self._merged_row_norm = torch.linalg.norm(weight, dim=1)
            weight = weight * (self.lora_magnitude[name] / self._merged_row_norm).view(-1, 1)
        error = write_weight_(self.base_layer, weight)
        self.merged = True
        return error

    @torch.no_grad()
    def unmerge(self) -> float:
        """Undo :meth:`merge`; a no-op if not merged. Returns the storage error as merge does."""
        if not self.merged:
            return 0.0
        name = self.adapter_name
        weight = dense_weight(self.base_layer).float()
        if name in self.lora_magnitude:
            weight = weight * (self._merged_row_norm / self.lora_magnitude[name]).view(-1, 1)
        error = write_weight_(self.base_layer, weight - self.delta_weight(name))
        self.merged = False
        self._merged_row_norm = None
        return error

    def extra_repr(self) -> str:
        parts = []
        for name, config in self.configs.items():
            method = "DoRA" if name in self.lora_magnitude else "LoRA"
            parts.append(f"{name}: {method}(rank={config.rank}, scaling={config.scaling:g})")
        return f"{', '.join(parts)}, active={self.active_adapters}, merged={self.merged}"
