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

from lightning_peft.adapters.routing import Routing
from lightning_peft.adapters.wrapper import BaseLayerWrapper, NamedAdapters
from lightning_peft.errors import AdapterConfigError, AdapterStateError
from lightning_peft.quantization.layers import CONV_TYPES, is_linear_layer, write_weight_
from lightning_peft.quantization.storage import dense_weight, in_out_features
from lightning_peft.targeting import Patterns, finish_config_, matches, normalize_patterns

# Default (targets, feed-forward targets) by transformers model type: Hugging Face PEFT's
# table (so trainable counts and files match), plus ViT and Whisper.
_ATTENTION_BERT = (("key", "value", "output.dense"), ("output.dense",))
_LLAMA = (("k_proj", "v_proj", "down_proj"), ("down_proj",))
_QV_DOWN = (("q_proj", "v_proj", "down_proj"), ("down_proj",))
DEFAULT_TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "t5": (("k", "v", "wo"), ("wo",)),
    "mt5": (("k", "v", "wi_1"), ()),
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "gpt_bigcode": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "bloom": (("query_key_value", "mlp.dense_4h_to_h"), ("mlp.dense_4h_to_h",)),
    "bert": _ATTENTION_BERT,
    "roberta": _ATTENTION_BERT,
    "vit": _ATTENTION_BERT,
    "deberta-v2": (("key_proj", "value_proj", "output.dense"), ("output.dense",)),
    "opt": (("q_proj", "k_proj", "fc2"), ("fc2",)),
    "gptj": (("q_proj", "v_proj", "fc_out"), ("fc_out",)),
    "gpt_neox": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    "gpt_neo": (("q_proj", "v_proj", "c_proj"), ("c_proj",)),
    "falcon": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    "bart": (("q_proj", "v_proj", "fc2"), ("fc2",)),
    "whisper": (("k_proj", "v_proj", "fc2"), ("fc2",)),
    "phi": (("q_proj", "v_proj", "fc2"), ("fc2",)),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "mixtral": (("k_proj", "v_proj", "w2"), ("w2",)),
    "gemma": _QV_DOWN,
    "gemma2": _QV_DOWN,
    "gemma3_text": _QV_DOWN,
    "qwen2": _QV_DOWN,
    "qwen3": _QV_DOWN,
}


# Types whose layers transformers 5 renamed: these names when the model has them.
RENAMED_TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "vit": (("k_proj", "v_proj", "mlp.fc2"), ("mlp.fc2",)),
}


def model_type(model: nn.Module) -> str | None:
    """``config.model_type`` of the transformers model in ``model``, or None."""
    from lightning_peft.adapters.inputs import find_transformers_model
    from lightning_peft.errors import UnsupportedLayerError

    try:
        host = find_transformers_model(model, "")
    except UnsupportedLayerError:
        return None
    return getattr(host.config, "model_type", None)


@dataclass(frozen=True)
class IA3:
    """Configuration of (IA)^3 vectors.

    Args:
        target_modules: the layers that get a vector (patterns as in :class:`LoRA`).
            Default: chosen by the model's type when the adapters attach, as Hugging Face
            PEFT chooses them (:data:`DEFAULT_TARGETS`): keys, values and the second
            feed-forward projection for Llama, ``["c_attn", "mlp.c_proj"]`` for GPT-2,
            ``["key", "value", "output.dense"]`` for BERT, ...
        feedforward_modules: which of the targets are feed-forward layers, whose *input* is
            scaled (``l_ff``); the others have their output scaled. Must select targets only.
            Default: the model type's feed-forward targets among ``target_modules``.
        exclude_modules: patterns left alone.

    Raises:
        AdapterConfigError: listing every invalid field with the value received.
    """

    target_modules: Patterns | None = None
    feedforward_modules: Patterns | None = None
    exclude_modules: Patterns = ()

    def __post_init__(self) -> None:
        problems: list[str] = []
        targets = self.target_modules
        if targets is not None:
            targets = normalize_patterns(targets, "target_modules", problems)
        feedforward = self.feedforward_modules
        if feedforward is not None:
            feedforward = normalize_patterns(feedforward, "feedforward_modules", problems)
        excludes = normalize_patterns(self.exclude_modules, "exclude_modules", problems)
        if isinstance(targets, tuple) and isinstance(feedforward, tuple):
            stray = [f for f in feedforward if f not in targets]
            if stray:
                problems.append(
                    f"feedforward_modules must be among target_modules {list(targets)}, got {stray}"
                )
        finish_config_(
            self,
            problems,
            target_modules=targets,
            feedforward_modules=feedforward,
            exclude_modules=excludes,
        )

    routable = True  # rows of one batch can take different adapters (mixed_batch)

    def for_model(self, model: nn.Module) -> IA3:
        """This config with the defaults of ``model``'s type filled in.

        Raises:
            AdapterConfigError: no ``target_modules`` and a model type without defaults.
        """
        if self.target_modules is not None and self.feedforward_modules is not None:
            return self
        kind = model_type(model)
        defaults = DEFAULT_TARGETS.get(kind) if kind else None
        renamed = RENAMED_TARGETS.get(kind or "")
        names = [name for name, _ in model.named_modules()]
        if renamed and any(matches(name, renamed[0][:1]) for name in names):
            defaults = renamed
        targets = self.target_modules
        if targets is None:
            if defaults is None:
                described = (
                    f"model type {kind!r}"
                    if kind
                    else f"{type(model).__name__} (not a transformers model)"
                )
                raise AdapterConfigError(
                    f"IA3() picks its targets by model type and knows none for {described}: "
                    "pass target_modules=[the key, value and second feed-forward layers' "
                    "names] and feedforward_modules=[the feed-forward one]; known types: "
                    f"{', '.join(sorted(DEFAULT_TARGETS))}"
                )
            targets = defaults[0]
        feedforward = self.feedforward_modules
        if feedforward is None:
            known = defaults[1] if defaults else ()
            feedforward = tuple(f for f in known if isinstance(targets, str) or f in targets)
        return IA3(targets, feedforward, self.exclude_modules)

    def can_wrap(self, module: nn.Module) -> bool:
        return is_linear_layer(module) or isinstance(module, CONV_TYPES)

    def wrap(
        self, layer: nn.Module, adapter_name: str = "default", module_name: str = ""
    ) -> IA3Linear:
        patterns = self.feedforward_modules
        feedforward = patterns is not None and bool(patterns) and matches(module_name, patterns)
        if isinstance(layer, IA3Linear):  # another named adapter on an adapted layer
            layer.add_adapter(self, adapter_name, feedforward=feedforward)
            return layer
        return IA3Linear(layer, self, adapter_name, feedforward=feedforward)


class IA3Linear(NamedAdapters, BaseLayerWrapper):
    """A linear-like base layer whose output (or, for a feed-forward layer, input) is rescaled
    by learned vectors ``ia3_l``, one per named adapter. State-dict keys of the base stay as
    they were. Active adapters' vectors multiply; under :func:`lightning_peft.mixed_batch`
    each row gets its own adapter's vector."""

    def __init__(
        self,
        base_layer: nn.Module,
        config: IA3,
        adapter_name: str = "default",
        *,
        feedforward: bool,
    ) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.configs: dict[str, IA3] = {}
        self.feedforward: dict[str, bool] = {}
        self.active_adapters: list[str] = []
        self.disabled = False
        self.routing: Routing | None = None
        self.merged = False
        self.add_adapter(config, adapter_name, feedforward=feedforward)

    def add_adapter(self, config: IA3, adapter_name: str, *, feedforward: bool) -> None:
        """Attach another vector under ``adapter_name`` (initialised to ones); it becomes active."""
        if self.merged:
            raise AdapterStateError("unmerge the layer before adding adapters to it")
        device = next(self.base_layer.parameters()).device
        if isinstance(self.base_layer, CONV_TYPES):  # (1, channels, 1, ...), as PEFT
            conv = self.base_layer
            channels = conv.in_channels if feedforward else conv.out_channels
            shape = (1, channels) + (1,) * (conv.weight.dim() - 2)
        else:
            in_features, out_features = in_out_features(self.base_layer)
            shape = (1, in_features) if feedforward else (out_features, 1)
        self.ia3_l[adapter_name] = nn.Parameter(torch.ones(shape, device=device))
        self.configs[adapter_name] = config
        self.feedforward[adapter_name] = feedforward
        self.active_adapters.append(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        del self.ia3_l[adapter_name]
        self.configs.pop(adapter_name)
        self.feedforward.pop(adapter_name)
        if adapter_name in self.active_adapters:
            self.active_adapters.remove(adapter_name)

    def adapter_params(self) -> list[str]:
        return [f"ia3_l.{name}" for name in self.configs]

    @property
    def vector(self) -> torch.Tensor:
        return self.ia3_l[self.adapter_name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x, *args, **kwargs)
        if self.routing is not None:
            return self._routed_forward(self.routing, x, *args, **kwargs)
        for name in self.active_adapters:
            if self.feedforward[name]:
                x = x * self._broadcastable(self.ia3_l[name]).to(x.dtype)
        out = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if not self.feedforward[name]:
                out = out * self._broadcastable(self.ia3_l[name]).to(out.dtype)
        return out

    def _broadcastable(self, vector: torch.Tensor) -> torch.Tensor:
        """``vector`` shaped to scale the features of an input or output: the last dim of a
        linear layer's, dim 1 (channels) of a convolution's (stored that way)."""
        return vector if isinstance(self.base_layer, CONV_TYPES) else vector.flatten()

    def _routed_forward(
        self, routing: Routing, x: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Each row scaled by its own adapter's vectors (ones for adapters the layer lacks)."""
        if isinstance(self.base_layer, CONV_TYPES):
            raise AdapterStateError(
                f"mixed batches route IA3 on linear layers; {type(self.base_layer).__name__} "
                "layers carry adapters here. Leave them out of the adapters you mix"
            )
        if x.shape[0] != routing.index.shape[0]:
            raise AdapterStateError(
                f"mixed_batch was given {routing.index.shape[0]} row adapters, the layer got a "
                f"batch of {x.shape[0]} rows"
            )
        in_features, out_features = in_out_features(self.base_layer)
        inputs, outputs = [], []
        for name in routing.names:
            vector = self.ia3_l[name].flatten() if name in self.configs else None
            feedforward = name is not None and self.feedforward.get(name, False)
            ones_in, ones_out = x.new_ones(in_features), x.new_ones(out_features)
            inputs.append(vector if vector is not None and feedforward else ones_in)
            outputs.append(vector if vector is not None and not feedforward else ones_out)
        index = routing.index.to(x.device)
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (-1,)  # (B, 1, ..., features)
        x = x * torch.stack(inputs)[index].view(shape).to(x.dtype)
        out = self.base_layer(x, *args, **kwargs)
        return out * torch.stack(outputs)[index].view(shape).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> float:
        """Fold the active vector into the weight (rows and bias, or columns); a no-op if merged."""
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
        weight = dense_weight(self.base_layer).float()  # (out, in, *kernel)
        kernel = (1,) * (weight.dim() - 2)
        if self.feedforward[self.adapter_name]:
            return write_weight_(self.base_layer, weight * factor.view(1, -1, *kernel))
        bias = getattr(self.base_layer, "bias", None)
        if bias is not None:
            bias.copy_((bias.float() * factor.flatten()).to(bias.dtype))
        return write_weight_(self.base_layer, weight * factor.view(-1, 1, *kernel))

    def extra_repr(self) -> str:
        parts = [
            f"{name}: scales {'input' if self.feedforward[name] else 'output'}"
            for name in self.configs
        ]
        return f"IA3({', '.join(parts)}, active={self.active_adapters}, merged={self.merged})"
