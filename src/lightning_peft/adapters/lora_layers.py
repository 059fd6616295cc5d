"""LoRA on embeddings, convolutions and attention: the same ``W0 + s B A``, shaped for the layer.

Embedding (``W0``: ``(num_embeddings, dim)``, a table of rows)::

    h = W0[ids] + s · A^T[ids] B^T      A: (rank, num_embeddings), B: (dim, rank)

``A`` is looked up like the table itself; it starts at zero and ``B`` Gaussian (the reverse
of linear layers: a zero ``A`` keeps unseen tokens' rows from moving), as in Hugging Face PEFT.

Convolution (``Conv1d``/``2d``/``3d``, ``W0``: ``(out, in, *kernel)``)::

    h = conv(x, W0) + s · conv1x1(conv(x, A), B)    A: (rank, in, *kernel), B: (out, rank, 1...)

``A`` has the base layer's kernel, stride, padding and dilation, so its output lines up with
the base's; ``B`` mixes channels only. Merged, ``B`` composes into ``A``'s kernel.

``nn.MultiheadAttention`` reads its weights directly (``in_proj_weight`` for q, k and v,
``out_proj.weight``), never calling a layer, so an adapter on ``out_proj`` alone would never
act. Wrapped whole, it gets one update of ``in_proj_weight`` (``3E x E``) and its ``out_proj``
a ``LoRALinear``, and each forward runs the attention with ``W0 + s B A`` in place of both
weights: gradients reach A and B in train and eval mode, and PyTorch's fused eval path
(which would read the bare weights) sees the same substituted tensors. The update is a
weight, so there is no dropout on its input.

None of these is ever quantized (bitsandbytes stores linear layers only), so their base stays
float under ``nf4-lora``; merge and unmerge are exact. DoRA and mixed batches cover linear
layers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.adapters.lora import LoRA, LoRALinear, init_factors_
from lightning_peft.errors import AdapterConfigError, AdapterStateError
from lightning_peft.quantization.layers import CONV_TYPES


def is_embedding_conv_or_attention(module: nn.Module) -> bool:
    return type(module) in (nn.Embedding, nn.MultiheadAttention, *CONV_TYPES)


def check_layer_supported(layer: nn.Module, config: LoRA) -> None:
    """Refuse, naming the layer, what LoRA on these layers does not do."""
    kind = type(layer).__name__
    if isinstance(layer, nn.MultiheadAttention):
        if layer.in_proj_weight is None:  # separate q, k, v weights
            raise AdapterConfigError(
                "LoRA on nn.MultiheadAttention needs one in_proj_weight (kdim and vdim equal "
                f"to embed_dim), got kdim={layer.kdim}, vdim={layer.vdim}"
            )
        if config.dropout:
            raise AdapterConfigError(
                f"LoRA on nn.MultiheadAttention updates its weights, so there is no input to "
                f"drop out: got dropout={config.dropout}; use dropout=0.0, or leave the "
                "attention out (exclude_modules)"
            )
    if config.use_dora:
        raise AdapterConfigError(f"use_dora=True covers linear layers, not {kind}")
    if config.init == "loftq":
        raise AdapterConfigError(
            f"init='loftq' fits 4-bit linear layers; {kind} layers stay float. Leave them out "
            "(exclude_modules) or use init='kaiming'"
        )
    if isinstance(layer, CONV_TYPES) and layer.groups != 1:
        raise AdapterConfigError(
            f"LoRA on a grouped {kind} (groups={layer.groups}) is not supported; leave it out "
            "with exclude_modules"
        )
    if isinstance(layer, nn.Embedding) and (layer.max_norm is not None or layer.sparse):
        raise AdapterConfigError(
            f"LoRA on an nn.Embedding with max_norm={layer.max_norm} / sparse={layer.sparse} "
            "is not supported (the base renormalises its table in place)"
        )


class _NotLinear(LoRALinear):
    """What LoRA on an embedding or convolution changes in ``LoRALinear``'s behaviour."""

    def add_adapter(self, config: LoRA, adapter_name: str) -> None:
        check_layer_supported(self.base_layer, config)
        super().add_adapter(config, adapter_name)

    def _routed_update(self, routing: Any, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        raise _cannot_route(self)


def _cannot_route(layer: nn.Module) -> AdapterStateError:
    return AdapterStateError(
        f"mixed batches route LoRA on linear layers; {type(layer.base_layer).__name__} "
        "layers carry adapters here. Leave them out of the adapters you mix"
    )


class LoRAEmbedding(_NotLinear, LoRALinear):
    """An ``nn.Embedding`` plus named LoRA updates (see the module docstring)."""

    def _new_factors(
        self, config: LoRA, generator: torch.Generator | None
    ) -> tuple[nn.Module, nn.Module]:
        table = self.base_layer
        lora_a = nn.Linear(table.num_embeddings, config.rank, bias=False, device="meta")
        lora_b = nn.Linear(config.rank, table.embedding_dim, bias=False, device="meta")
        lora_a, lora_b = lora_a.to_empty(device="cpu"), lora_b.to_empty(device="cpu")
        nn.init.zeros_(lora_a.weight)
        nn.init.normal_(lora_b.weight, generator=generator)
        return lora_a, lora_b

    def delta_weight(self, adapter_name: str | None = None) -> torch.Tensor:
        """The update ``s · (B A)^T`` in the table's ``(num_embeddings, dim)`` layout."""
        return super().delta_weight(adapter_name).T

    def peft_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {
            "lora_embedding_A": self.lora_A[adapter_name].weight,
            "lora_embedding_B": self.lora_B[adapter_name].weight,
        }

    def _add_update(self, x: torch.Tensor, out: torch.Tensor, name: str) -> torch.Tensor:
        config = self.configs[name]
        lora_a = self.lora_A[name].weight  # (rank, num_embeddings)
        lora_b = self.lora_B[name].weight  # (dim, rank)
        hidden = F.embedding(x, lora_a.T, padding_idx=self.base_layer.padding_idx)
        # Dropout on ids means nothing; PEFT applies none to embeddings either.
        update = F.linear(hidden, lora_b) * config.scaling
        return out + update.to(out.dtype)


class LoRAConv(_NotLinear, LoRALinear):
    """An ``nn.Conv1d``/``2d``/``3d`` plus named LoRA updates (see the module docstring)."""

    def _new_factors(
        self, config: LoRA, generator: torch.Generator | None
    ) -> tuple[nn.Module, nn.Module]:
        conv = self.base_layer
        kind = type(conv)
        lora_a = kind(
            conv.in_channels,
            config.rank,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            padding_mode=conv.padding_mode,
            bias=False,
            device="meta",
        ).to_empty(device="cpu")
        lora_b = kind(config.rank, conv.out_channels, 1, bias=False, device="meta")
        lora_b = lora_b.to_empty(device="cpu")
        init_factors_(lora_a, lora_b, config, generator)
        return lora_a, lora_b

    def delta_weight(self, adapter_name: str | None = None) -> torch.Tensor:
        """The update in the base kernel's ``(out, in, *kernel)`` layout: ``B`` (a 1x1
        kernel, a matrix) applied to every tap of ``A``'s kernel."""
        name = adapter_name or self.adapter_name
        lora_a = self.lora_A[name].weight  # (rank, in, *kernel)
        lora_b = self.lora_B[name].weight.flatten(1)  # (out, rank)
        delta = (lora_b @ lora_a.flatten(1)).view(lora_b.shape[0], *lora_a.shape[1:])
        return delta * self.configs[name].scaling

    def _add_update(self, x: torch.Tensor, out: torch.Tensor, name: str) -> torch.Tensor:
        config = self.configs[name]
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        inputs = self._dropout(x.to(lora_a.weight.dtype), config.dropout)
        update = lora_b(lora_a(inputs)) * config.scaling
        return out + update.to(out.dtype)


class LoRAMultiheadAttention(_NotLinear, LoRALinear):
    """An ``nn.MultiheadAttention`` plus named LoRA updates of its q, k, v projection (here)
    and of its output projection (``out_proj``, a ``LoRALinear`` of its own)."""

    def __init__(self, base_layer: Any, config: LoRA, adapter_name: str = "default") -> None:
        check_layer_supported(base_layer, config)
        base_layer.out_proj = LoRALinear(base_layer.out_proj, config, adapter_name)
        super().__init__(base_layer, config, adapter_name)

    def add_adapter(self, config: LoRA, adapter_name: str) -> None:
        super().add_adapter(config, adapter_name)
        out_proj = self.base_layer.out_proj
        if adapter_name not in out_proj.configs:
            out_proj.add_adapter(config, adapter_name)

    def _features(self) -> tuple[int, int]:
        """The q, k, v projection: ``embed_dim`` in, ``3 * embed_dim`` out."""
        return self.base_layer.embed_dim, 3 * self.base_layer.embed_dim

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.routing is not None:
            raise _cannot_route(self)
        attention = self.base_layer
        weights = {
            "in_proj_weight": _adapted_weight(self, attention.in_proj_weight),
            "out_proj.base_layer.weight": _adapted_weight(
                attention.out_proj, attention.out_proj.base_layer.weight
            ),
        }
        return torch.func.functional_call(attention, weights, args, kwargs)

    @torch.no_grad()
    def merge(self) -> float:
        """Fold the q, k, v update into ``in_proj_weight`` (``out_proj`` merges on its own);
        returns the storage's rounding error (0.0 for float32)."""
        if self.merged:
            return 0.0
        self.merged = True
        return self._write_in_proj(self.delta_weight(self.adapter_name))

    @torch.no_grad()
    def unmerge(self) -> float:
        if not self.merged:
            return 0.0
        self.merged = False
        return self._write_in_proj(-self.delta_weight(self.adapter_name))

    def _write_in_proj(self, delta: torch.Tensor) -> float:
        """``in_proj_weight += delta``, summed in float32 (a bf16 weight rounds once)."""
        stored = self.base_layer.in_proj_weight
        weight = stored.float() + delta
        stored.copy_(weight)
        return float((stored.float() - weight).abs().max())


def _adapted_weight(layer: LoRALinear, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` plus the updates ``layer``'s forward would add (none if merged or
    disabled), differentiable in the adapters."""
    if layer.merged or layer.disabled:
        return weight
    for name in layer.active_adapters:
        weight = weight + layer.delta_weight(name).to(weight.dtype)
    return weight


def wrap_other_layer(layer: nn.Module, config: LoRA, adapter_name: str) -> Any:
    """The LoRA wrapper of an embedding, convolution or multi-head attention layer."""
    if isinstance(layer, nn.MultiheadAttention):
        return LoRAMultiheadAttention(layer, config, adapter_name)
    kind = LoRAEmbedding if isinstance(layer, nn.Embedding) else LoRAConv
    return kind(layer, config, adapter_name)
