"""LoRA on embeddings and convolutions: the same ``W0 + s B A``, shaped for the layer.

Embedding (``W0``: ``(num_embeddings, dim)``, a table of rows)::

    h = W0[ids] + s · A^T[ids] B^T      A: (rank, num_embeddings), B: (dim, rank)

``A`` is looked up like the table itself; it starts at zero and ``B`` Gaussian (the reverse
of linear layers: a zero ``A`` keeps unseen tokens' rows from moving), as in Hugging Face PEFT.

Convolution (``Conv1d``/``2d``/``3d``, ``W0``: ``(out, in, *kernel)``)::

    h = conv(x, W0) + s · conv1x1(conv(x, A), B)    A: (rank, in, *kernel), B: (out, rank, 1...)

``A`` has the base layer's kernel, stride, padding and dilation, so its output lines up with
the base's; ``B`` mixes channels only. Merged, ``B`` composes into ``A``'s kernel.

Neither is ever quantized (bitsandbytes stores linear layers only), so their base stays float
under ``nf4-lora``; merge and unmerge are exact. DoRA and mixed batches cover linear layers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.adapters.init import reset_linear_
from lightning_peft.adapters.lora import LoRA, LoRALinear
from lightning_peft.errors import AdapterConfigError, AdapterStateError

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_embedding_or_conv(module: nn.Module) -> bool:
    return type(module) in (nn.Embedding, *_CONV_TYPES)


def check_layer_supported(layer: nn.Module, config: LoRA) -> None:
    """Refuse, naming the layer, what LoRA on an embedding or convolution does not do."""
    kind = type(layer).__name__
    if config.use_dora:
        raise AdapterConfigError(f"use_dora=True covers linear layers, not {kind}")
    if config.init == "loftq":
        raise AdapterConfigError(
            f"init='loftq' fits 4-bit linear layers; {kind} layers stay float. Leave them out "
            "(exclude_modules) or use init='kaiming'"
        )
    if isinstance(layer, _CONV_TYPES) and layer.groups != 1:
        raise AdapterConfigError(
            f"LoRA on a grouped {kind} (groups={layer.groups}) is not supported; leave it out "
            "with exclude_modules"
        )
    if isinstance(layer, nn.Embedding) and (layer.max_norm is not None or layer.sparse):
        raise AdapterConfigError(
            f"LoRA on an nn.Embedding with max_norm={layer.max_norm} / sparse={layer.sparse} "
            "is not supported (the base renormalises its table in place)"
        )


class _NotLinear:
    """What LoRA on an embedding or convolution changes in ``LoRALinear``'s behaviour."""

    def add_adapter(self, config: LoRA, adapter_name: str) -> None:
        check_layer_supported(self.base_layer, config)
        super().add_adapter(config, adapter_name)

    def _routed_update(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        raise AdapterStateError(
            f"mixed batches route LoRA on linear layers; {type(self.base_layer).__name__} "
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
        if config.init == "gaussian":
            nn.init.normal_(lora_a.weight, std=1.0 / config.rank, generator=generator)
        else:
            reset_linear_(lora_a, generator)
        nn.init.zeros_(lora_b.weight)
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


def wrap_embedding_or_conv(layer: nn.Module, config: LoRA, adapter_name: str) -> Any:
    kind = LoRAEmbedding if isinstance(layer, nn.Embedding) else LoRAConv
    return kind(layer, config, adapter_name)
