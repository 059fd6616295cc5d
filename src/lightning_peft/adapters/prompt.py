"""Prompt tuning (Lester et al. 2021): trainable soft-prompt embeddings before the input.

::

    input_ids ──► embed ──► [P_1 ... P_n | e(x_1) ... e(x_T)] ──► frozen transformer

Only the ``n × d`` prompt ``P`` trains (§2). The attention mask gets ``n`` ones in front and
token labels ``n`` ignored positions (-100), so the model's own loss scores every real token
(the first one predicted from the prompt's last position, as in Hugging Face PEFT); the
logits of the prompt positions are dropped again, so outputs line up with ``input_ids``.
Initialising ``P`` from the embeddings of a text (§3.2, "class label" / vocabulary init)
makes the adapted model compute exactly what the base computes with that text in front.

In an encoder-decoder model (T5, BART) the prompt goes before the encoder's input, as in the
paper (its models are T5) and in Hugging Face PEFT: a hook on the encoder itself, so that
``generate``, which runs the encoder on its own, sees it too; the cross-attention mask gets
the ``n`` ones wherever it travels. Labels and logits are the decoder's and stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lightning_peft._compat import own_children
from lightning_peft.adapters.init import init_generator
from lightning_peft.adapters.inputs import (
    HFModel,
    as_keyword_arguments,
    cache_length,
    find_transformers_model,
    given_cache,
    is_encoder_decoder,
    prepend_ones,
    text_token_ids,
    virtual_token_problems,
)
from lightning_peft.errors import AdapterConfigError

PromptInit = Literal["random", "text"]
CHILD_NAME = "prompt_tuning"


@dataclass(frozen=True)
class PromptTuning:
    """Configuration of a soft prompt.

    Args:
        num_virtual_tokens: prompt length ``n``.
        init: ``"random"``: embeddings of ``n`` vocabulary tokens drawn at random (Lester §3.2
            found this beats uniform noise); ``"text"``: the embeddings of ``init_text``,
            repeated or cut to ``n`` tokens.
        init_text: the text for ``init="text"``, e.g. ``"Classify the review as positive or
            negative:"``.
        tokenizer_name_or_path: where to load the tokenizer for ``init_text`` from (a local
            folder; nothing is downloaded when ``HF_HUB_OFFLINE=1``).

    Raises:
        AdapterConfigError: listing every invalid field with the value received.
    """

    num_virtual_tokens: int = 20
    init: PromptInit = "random"
    init_text: str | None = None
    tokenizer_name_or_path: str | None = None

    def __post_init__(self) -> None:
        problems = virtual_token_problems(self)
        if problems:
            raise AdapterConfigError("invalid PromptTuning config:\n  - " + "\n  - ".join(problems))

    def check(self, model: nn.Module) -> None:
        host = find_transformers_model(model, "PromptTuning")
        main_input = getattr(host, "main_input_name", "input_ids")
        if main_input not in ("input_ids", "inputs_embeds"):
            raise AdapterConfigError(
                f"PromptTuning puts virtual tokens before the token embeddings, and "
                f"{type(host).__name__} reads {main_input} (audio or image features), not "
                "tokens; use LoRA or IA3 on this model"
            )
        if CHILD_NAME in own_children(host):
            raise AdapterConfigError(
                f"{type(host).__name__} already has a soft prompt; a model takes one PromptTuning"
            )

    def attach(self, model: nn.Module, adapter_name: str) -> None:
        host = find_transformers_model(model, "PromptTuning")
        embedding = host.get_input_embeddings()
        prompt = SoftPrompt(self, self.initial_prompt(embedding, adapter_name), adapter_name)
        host.add_module(CHILD_NAME, prompt)
        if is_encoder_decoder(host):
            host.register_forward_pre_hook(prompt.before_seq2seq_forward, with_kwargs=True)
            host.get_encoder().register_forward_pre_hook(prompt.before_encoder, with_kwargs=True)
            return
        host.register_forward_pre_hook(prompt.before_forward, with_kwargs=True)
        host.register_forward_hook(prompt.after_forward, with_kwargs=True)

    @torch.no_grad()
    def initial_prompt(
        self, embedding: nn.Embedding, adapter_name: str = "default"
    ) -> torch.Tensor:
        """The ``(n, d)`` float32 starting prompt, from ``embedding``'s rows."""
        n = self.num_virtual_tokens
        if self.init == "text":
            ids = text_token_ids(self.init_text, self.tokenizer_name_or_path, n)
        else:
            ids = torch.randint(
                0, embedding.num_embeddings, (n,), generator=init_generator(adapter_name)
            )
        return embedding.weight[ids.to(embedding.weight.device)].float().clone()


class SoftPrompt(nn.Module):
    """The trainable prompt of a model and the hooks that put it in front of the input."""

    def __init__(self, config: PromptTuning, prompt: torch.Tensor, adapter_name: str) -> None:
        super().__init__()
        self.config = config
        self.adapter_name = adapter_name
        self.prompt = nn.ParameterDict({adapter_name: nn.Parameter(prompt)})
        self._prompted_length = 0  # n + T while a forward with the prompt in front runs
        self.disabled = False

    def adapter_params(self) -> list[str]:
        return [f"prompt.{self.adapter_name}"]

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt[self.adapter_name].shape[0]

    def before_forward(self, host: HFModel, args: tuple, kwargs: dict[str, Any]) -> Any:
        self._prompted_length = 0
        if self.disabled:
            return None
        kwargs = as_keyword_arguments(host, args, kwargs)
        n = self.num_virtual_tokens
        kwargs["attention_mask"] = prepend_ones(kwargs.get("attention_mask"), n)
        if cache_length(given_cache(kwargs)) > 0:
            # A later generate step: the prompt is in the cache already.
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"] + n
            return (), kwargs
        embeds = kwargs.pop("inputs_embeds", None)
        input_ids = kwargs.pop("input_ids", None)
        if embeds is None:
            embeds = host.get_input_embeddings()(input_ids)  # (B, T, d)
        batch, length = embeds.shape[:2]
        self._prompted_length = n + length
        prompt = self.prompt[self.adapter_name].to(embeds.dtype).expand(batch, n, -1)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)  # (B, n + T, d)
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.shape[1] == length:
            kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
        positions = kwargs.get("position_ids")
        if positions is not None:
            front = torch.arange(n, device=positions.device).expand(positions.shape[0], n)
            kwargs["position_ids"] = torch.cat([front, positions + n], dim=1)
        token_types = kwargs.get("token_type_ids")
        if token_types is not None:
            kwargs["token_type_ids"] = torch.cat([token_types[:, :1].expand(-1, n), token_types], 1)
        return (), kwargs

    def before_encoder(self, encoder: HFModel, args: tuple, kwargs: dict[str, Any]) -> Any:
        """An encoder-decoder's encoder: the prompt in front of its input embeddings."""
        if self.disabled:
            return None
        kwargs = as_keyword_arguments(encoder, args, kwargs)
        embeds = kwargs.pop("inputs_embeds", None)
        input_ids = kwargs.pop("input_ids", None)
        if embeds is None:
            embeds = encoder.get_input_embeddings()(input_ids)
        batch, length = embeds.shape[:2]
        n = self.num_virtual_tokens
        prompt = self.prompt[self.adapter_name].to(embeds.dtype).expand(batch, n, -1)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.shape[-1] == length:  # not widened by the host's hook
            kwargs["attention_mask"] = prepend_ones(mask, n)
        return (), kwargs

    def before_seq2seq_forward(self, host: HFModel, args: tuple, kwargs: dict[str, Any]) -> Any:
        """An encoder-decoder's forward: its attention mask, read by the encoder and by the
        cross-attention, covers the prompt. With ``encoder_outputs`` given (``generate``'s
        decoding steps) the mask is widened only if it is ``n`` short of them."""
        if self.disabled:
            return None
        kwargs = as_keyword_arguments(host, args, kwargs)
        mask = kwargs.get("attention_mask")
        if mask is None:
            return (), kwargs
        encoded = kwargs.get("encoder_outputs")
        if encoded is None:
            kwargs["attention_mask"] = prepend_ones(mask, self.num_virtual_tokens)
        elif mask.shape[-1] + self.num_virtual_tokens == encoded[0].shape[1]:
            kwargs["attention_mask"] = prepend_ones(mask, self.num_virtual_tokens)
        return (), kwargs

    def after_forward(self, host: HFModel, args: tuple, kwargs: dict, output: Any) -> Any:
        logits = getattr(output, "logits", None)
        # Only when every position has logits: generate asks for the last one only.
        if (
            isinstance(logits, torch.Tensor)
            and logits.dim() == 3
            and self._prompted_length == logits.shape[1]
        ):
            output.logits = logits[:, self.num_virtual_tokens :]
        return output

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, init={self.config.init!r}"
