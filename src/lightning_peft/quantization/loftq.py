"""LoftQ (Li et al. 2023): a 4-bit base and LoRA initial values that together approximate the
float weight.

Standard QLoRA starts at ``Q(W)``, so the adapted model starts as far from the float model
as the quantization puts it. LoftQ alternates, ``T`` times (``B_0 A_0 = 0``)::

    Q_t       = quantize(W - s B_{t-1} A_{t-1})          the base absorbs what the adapter does not
    s B_t A_t = rank-r SVD of  W - dequant(Q_t)         the adapter absorbs the quantization error

and starts training from ``(Q_T, A_T, B_T)``: ``dequant(Q_T) + s B_T A_T`` is closer to ``W``
than ``dequant(Q(W))`` is. Everything here is a function of ``W`` alone (no random draw),
so a resumed run recomputes the same base and the same starting adapters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_peft.quantization.layers import QuantMode, quantize_linear
from lightning_peft.quantization.storage import dense_weight


def _float_copy(layer: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` like ``layer`` holding ``weight`` (``(out, in)``), for quantizing."""
    out_features, in_features = weight.shape
    bias = getattr(layer, "bias", None)
    copy = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    copy.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        copy.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return copy


@torch.no_grad()
def loftq_layer(
    layer: nn.Module,
    rank: int,
    scaling: float,
    *,
    iterations: int = 1,
    mode: QuantMode = "nf4",
    **quantize_kwargs: Any,
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """``(quantized base, A, B)`` for a float linear ``layer``: ``A`` is ``(rank, in)`` and ``B``
    ``(out, rank)``, float32, with ``dense_weight(base) + scaling * B @ A`` close to the weight.

    Args:
        iterations: LoftQ's ``T``, the alternations.
        mode, quantize_kwargs: as :func:`~lightning_peft.quantization.quantize_linear`.

    The first alternation quantizes the weight itself, so with ``iterations=1`` the base is
    the usual 4-bit base (what bitsandbytes gives any loader of the float model) and only
    the adapters differ from standard QLoRA's.
    """
    weight = dense_weight(layer).detach()
    target = weight.float()
    update = torch.zeros_like(target)  # s B A
    for _ in range(iterations):
        residual_base = (target - update).to(weight.dtype)
        quantized = quantize_linear(_float_copy(layer, residual_base), mode, **quantize_kwargs)
        error = target - dense_weight(quantized).float()
        u, s, vh = torch.linalg.svd(error, full_matrices=False)
        root = s[:rank].sqrt()
        lora_b = u[:, :rank] * root / scaling**0.5  # (out, rank)
        lora_a = root[:, None] * vh[:rank] / scaling**0.5  # (rank, in)
        update = scaling * lora_b @ lora_a
    return quantized, lora_a.contiguous(), lora_b.contiguous()
