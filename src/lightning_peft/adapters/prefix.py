"""Prefix tuning (Li & Liang 2021): trainable keys and values in front of every layer's.

Each attention layer ``i`` attends to ``n`` extra positions whose keys and values are
trained directly, while all weights stay frozen (§4.1)::

    head_i = Attention(x W_q, [P_k^i ; x W_k], [P_v^i ; x W_v])

Optimising a randomly initialised ``P`` directly is unstable, so during training it is
produced by an MLP from a smaller matrix (§4.3, reparametrization); after training only its
output is needed, and :func:`fold_prefix_` replaces the MLP by that output. Initialising
``P`` with the keys and values the frozen model computes for real words (§7.2) starts from
"that text in front" and trains well without the MLP. The prefix enters the model as a
filled key/value cache (transformers' ``DynamicCache``), so it works wherever the model
accepts a key/value cache (``cache``; ``past_key_values`` before transformers 5.24), in
training and in ``generate``. Inputs take the positions after the prefix, as if ``n`` tokens
came first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lightning_peft._compat import own_children
from lightning_peft.adapters.init import empty_linear, init_generator, reset_linear_
from lightning_peft.adapters.inputs import (
    CACHE_ARGUMENTS,
    HFModel,
    as_keyword_arguments,
    cache_argument,
    cache_length,
    find_transformers_model,
    given_cache,
    is_encoder_decoder,
    output_cache,
    prepend_ones,
    takes_cache,
    text_config,
    text_token_ids,
    virtual_token_problems,
)
from lightning_peft.errors import AdapterConfigError, AdapterStateError, UnsupportedLayerError

CHILD_NAME = "prefix_tuning"


@dataclass(frozen=True)
class PrefixTuning:
    """Configuration of per-layer key/value prefixes.

    Args:
        num_virtual_tokens: prefix length ``n``.
        reparametrize: train the prefix through an MLP (Li & Liang §4.3); fold it away after
            training with :func:`fold_prefix_`.
        encoder_hidden_size: the MLP's hidden width (default: one layer's key width,
            ``kv_heads · head_dim``, as PEFT's default).
        init: ``"random"`` (Gaussian, as Hugging Face PEFT) or ``"text"``: the frozen model's
            own keys and values for ``init_text`` (repeated or cut to ``n`` tokens), so the
            adapted model starts as the base with that text in front. Needs
            ``reparametrize=False``.
        init_text: the text for ``init="text"``.
        tokenizer_name_or_path: where to load the tokenizer for ``init_text`` from.

    Raises:
        AdapterConfigError: listing every invalid field with the value received.
    """

    num_virtual_tokens: int = 20
    reparametrize: bool = True
    encoder_hidden_size: int | None = None
    init: Literal["random", "text"] = "random"
    init_text: str | None = None
    tokenizer_name_or_path: str | None = None

    def __post_init__(self) -> None:
        problems = virtual_token_problems(self)
        if not isinstance(self.reparametrize, bool):
            problems.append(f"reparametrize must be True or False, got {self.reparametrize!r}")
        width = self.encoder_hidden_size
        if width is not None and (
            isinstance(width, bool) or not isinstance(width, int) or width <= 0
        ):
            problems.append(f"encoder_hidden_size must be a positive int or None, got {width!r}")
        if self.init == "text" and self.reparametrize:
            problems.append(
                "init='text' sets the prefix itself, so it needs reparametrize=False, got "
                "reparametrize=True"
            )
        if problems:
            raise AdapterConfigError("invalid PrefixTuning config:\n  - " + "\n  - ".join(problems))

    def check(self, model: nn.Module) -> None:
        host = find_transformers_model(model, "PrefixTuning")
        if CHILD_NAME in own_children(host):
            raise AdapterConfigError(
                f"{type(host).__name__} already has a prefix; a model takes one PrefixTuning"
            )
        cache_shape(host)
        if not takes_cache(host):
            raise AdapterConfigError(
                f"PrefixTuning puts its keys and values in the attention's cache, and "
                f"{type(host).__name__}.forward takes no cache argument (this transformers "
                "release); use LoRA, IA3 or PromptTuning on this model"
            )
        main_input = getattr(host, "main_input_name", "input_ids")
        if main_input not in ("input_ids", "inputs_embeds") and not is_encoder_decoder(host):
            raise AdapterConfigError(
                f"PrefixTuning puts its keys and values in the attention's cache, and "
                f"{type(host).__name__} reads {main_input} with an encoder that takes no cache; "
                "use LoRA or IA3 on this model"
            )
        if is_encoder_decoder(host) and self.init == "text":
            raise AdapterConfigError(
                f"init='text' computes the prefix as a decoder-only model's keys and values of "
                f"the text; {type(host).__name__} is an encoder-decoder model: use init='random'"
            )

    def attach(self, model: nn.Module, adapter_name: str) -> None:
        host = find_transformers_model(model, "PrefixTuning")
        prefix = PrefixKV(self, cache_shape(host), adapter_name, host.config)
        prefix.to(host.get_input_embeddings().weight.device)
        if self.init == "text":
            ids = text_token_ids(
                self.init_text, self.tokenizer_name_or_path, self.num_virtual_tokens
            )
            with torch.no_grad():
                prefix.prefix[adapter_name].copy_(prefix_of_tokens(host, ids))
        host.add_module(CHILD_NAME, prefix)
        host.register_forward_pre_hook(prefix.before_forward, with_kwargs=True)


@torch.no_grad()
def prefix_of_tokens(host: HFModel, token_ids: torch.Tensor) -> torch.Tensor:
    """``(n, layers · 2 · kv_heads · head_dim)``: the keys and values ``host`` computes for
    ``token_ids`` (``(n,)``), in :class:`PrefixKV`'s layout."""
    was_training = host.training
    host.eval()  # no dropout in the keys and values
    device = host.get_input_embeddings().weight.device
    cache = output_cache(host(input_ids=token_ids[None].to(device), use_cache=True))
    host.train(was_training)
    blocks = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
    # (layers, 2, kv_heads, n, head_dim) -> (n, layers, 2, kv_heads, head_dim)
    return blocks.permute(3, 0, 1, 2, 4).reshape(len(token_ids), -1).float()


def cache_shape(host: HFModel) -> tuple[int, int, int, int]:
    """``(layers, kv_heads, head_dim, hidden)`` of a transformers decoder's attention.

    Raises:
        UnsupportedLayerError: the config does not say.
    """
    config = text_config(host)
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    if is_encoder_decoder(host):  # the prefix is the decoder's: its own fields
        config = host.config  # T5: num_decoder_layers; BART, Whisper: decoder_layers, ..._heads
        layers = getattr(config, "num_decoder_layers", None) or getattr(
            config, "decoder_layers", layers
        )
        heads = getattr(config, "decoder_attention_heads", None) or heads
    hidden = getattr(config, "hidden_size", None)
    if not (layers and heads and hidden):
        raise UnsupportedLayerError(
            f"PrefixTuning reads num_hidden_layers, num_attention_heads and hidden_size from the "
            f"model config, and {type(config).__name__} lacks one of them"
        )
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or hidden // heads
    return layers, kv_heads, head_dim, hidden


class PrefixKV(nn.Module):
    """The trainable prefix of a model, and the hook that puts it into the key/value cache.

    The prefix is one ``(n, layers · 2 · kv_heads · head_dim)`` matrix, laid out as Hugging
    Face PEFT lays out its ``past_key_values``: per layer a key block then a value block.
    """

    def __init__(
        self,
        config: PrefixTuning,
        shape: tuple[int, int, int, int],
        adapter_name: str,
        model_config: Any,
    ) -> None:
        super().__init__()
        self.config = config
        self.adapter_name = adapter_name
        self.layers, self.kv_heads, self.head_dim, _ = shape
        self.model_config = model_config
        self.seq2seq = bool(getattr(model_config, "is_encoder_decoder", False))
        n = config.num_virtual_tokens
        width = self.layers * 2 * self.kv_heads * self.head_dim
        self.folded = not config.reparametrize
        self.disabled = False
        generator = init_generator(adapter_name)
        if config.reparametrize:
            # PEFT's layout: the embedding and (by default) the MLP's inner width are one
            # layer's key width, kv_heads · head_dim (narrower than hidden under grouped-query
            # attention), so the trainable counts and an unfolded file match PEFT's.
            token_dim = self.kv_heads * self.head_dim
            inner = config.encoder_hidden_size or token_dim
            embedding = torch.randn(n, token_dim, generator=generator)
            self.embedding = nn.ParameterDict({adapter_name: nn.Parameter(embedding)})
            mlp = nn.Sequential(
                reset_linear_(empty_linear(token_dim, inner, bias=True, device="cpu"), generator),
                nn.Tanh(),
                reset_linear_(empty_linear(inner, width, bias=True, device="cpu"), generator),
            )
            self.mlp = nn.ModuleDict({adapter_name: mlp})
        else:
            prefix = torch.randn(n, width, generator=generator)
            self.prefix = nn.ParameterDict({adapter_name: nn.Parameter(prefix)})

    def adapter_params(self) -> list[str]:
        name = self.adapter_name
        if self.folded:
            return [f"prefix.{name}"]
        return [
            f"embedding.{name}",
            *(f"mlp.{name}.{p}" for p, _ in self.mlp[name].named_parameters()),
        ]

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    def flat_prefix(self) -> torch.Tensor:
        """``(n, layers · 2 · kv_heads · head_dim)``: the prefix the model attends to."""
        if self.folded:
            return self.prefix[self.adapter_name]
        return self.mlp[self.adapter_name](self.embedding[self.adapter_name])

    def key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, keys and values of shape ``(batch, kv_heads, n, head_dim)``.

        An encoder-decoder's decoder layer ``i`` reads the block stored for layer
        ``2i mod L``, as Hugging Face PEFT (0.21) computes it: its ``get_prompt`` repeats the
        ``2 L`` key/value blocks and splits them four per layer (self-attention keys and
        values, then cross-attention ones it drops). With an even ``L`` two layers share a
        block and half the blocks go unread, in PEFT as here; in exchange PEFT files mean
        the same in both.
        """
        n = self.num_virtual_tokens
        blocks = self.flat_prefix().to(dtype).view(n, self.layers * 2, self.kv_heads, self.head_dim)
        blocks = blocks.permute(1, 2, 0, 3)  # (layers · 2, kv_heads, n, head_dim)
        stored = [(2 * i) % self.layers if self.seq2seq else i for i in range(self.layers)]
        return [
            (blocks[2 * j].expand(batch, -1, -1, -1), blocks[2 * j + 1].expand(batch, -1, -1, -1))
            for j in stored
        ]

    def before_forward(self, host: HFModel, args: tuple, kwargs: dict[str, Any]) -> Any:
        if self.disabled:
            return None
        kwargs = as_keyword_arguments(host, args, kwargs)
        n = self.num_virtual_tokens
        if is_encoder_decoder(host):  # the prefix is the decoder's self-attention's
            return (), self._before_seq2seq_forward(host, kwargs)
        kwargs["attention_mask"] = prepend_ones(kwargs.get("attention_mask"), n)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + n
        if kwargs.get("cache_position") is not None:  # transformers 4.x generate passes it
            kwargs["cache_position"] = kwargs["cache_position"] + n
        cache = given_cache(kwargs)
        if cache_length(cache) == 0:
            for name in CACHE_ARGUMENTS:
                kwargs.pop(name, None)
            kwargs[cache_argument(host)] = self.filled_cache(cache, kwargs, host)
        return (), kwargs

    def _before_seq2seq_forward(self, host: HFModel, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Encoder-decoder models: the prefix goes into the decoder's self-attention cache
        only (the encoder and the cross-attention see none), as Hugging Face PEFT does; the
        decoder's own attention mask, when given, covers it."""
        n = self.num_virtual_tokens
        if kwargs.get("cache_position") is not None:  # transformers 4.x passes it
            kwargs["cache_position"] = kwargs["cache_position"] + n
        cache = given_cache(kwargs)
        if cache_length(cache) > 0:  # a later generate step: the prefix is in the cache
            mask, step = kwargs.get("decoder_attention_mask"), kwargs.get("decoder_input_ids")
            if mask is not None and step is not None:
                if mask.shape[-1] + n == cache_length(cache) + step.shape[-1]:
                    kwargs["decoder_attention_mask"] = prepend_ones(mask, n)
            return kwargs
        kwargs["decoder_attention_mask"] = prepend_ones(kwargs.get("decoder_attention_mask"), n)
        for name in CACHE_ARGUMENTS:
            kwargs.pop(name, None)
        kwargs[cache_argument(host)] = self.filled_cache(cache, kwargs, host)
        return kwargs

    def filled_cache(self, cache: Any, kwargs: dict[str, Any], host: HFModel) -> Any:
        """``cache`` (or a new ``DynamicCache``; for an encoder-decoder model, an
        ``EncoderDecoderCache``) holding the prefix of every (decoder) layer."""
        from transformers import DynamicCache, EncoderDecoderCache

        dtype = host.get_input_embeddings().weight.dtype
        if cache is None and is_encoder_decoder(host):  # layers made as the prefix fills them
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        elif cache is None:
            cache = DynamicCache(config=self.model_config)
        self_attention = getattr(cache, "self_attention_cache", cache)
        for layer, (keys, values) in enumerate(self.key_values(batch_size(kwargs), dtype)):
            self_attention.update(keys, values, layer)
        return cache

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the reparametrization MLP by the prefix it produces (inference, export)."""
        if self.folded:
            return
        prefix = self.flat_prefix().detach().clone()
        del self.embedding, self.mlp
        self.prefix = nn.ParameterDict({self.adapter_name: nn.Parameter(prefix)})
        self.folded = True

    def extra_repr(self) -> str:
        return (
            f"num_virtual_tokens={self.num_virtual_tokens}, layers={self.layers}, "
            f"folded={self.folded}"
        )


def batch_size(kwargs: dict[str, Any]) -> int:
    """The batch size of a forward's inputs, whichever it was given."""
    names = ("input_ids", "inputs_embeds", "input_features", "decoder_input_ids", "labels")
    for name in names:
        if kwargs.get(name) is not None:
            return int(kwargs[name].shape[0])
    encoded = kwargs.get("encoder_outputs")
    if encoded is not None:
        return int(encoded[0].shape[0])
    raise AdapterStateError("PrefixTuning found no input in the forward's arguments")


def fold_prefix_(model: nn.Module) -> int:
    """Fold the reparametrization MLP of every prefix in ``model`` into the prefix itself, in
    place. Afterwards only the prefix tensors are adapter tensors; returns how many folded.

    Raises:
        AdapterStateError: ``model`` has no prefix.
    """
    prefixes = [m for m in model.modules() if isinstance(m, PrefixKV)]
    if not prefixes:
        raise AdapterStateError(f"{type(model).__name__} has no PrefixTuning prefix to fold")
    folded = 0
    for prefix in prefixes:
        folded += not prefix.folded
        prefix.fold()
        prefix.prefix[prefix.adapter_name].requires_grad_(True)
    return folded
