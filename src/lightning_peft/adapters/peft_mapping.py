"""How each shipped method reads and writes Hugging Face PEFT's files.

``checkpoint/peft_format.py`` does the file work (folders, safetensors, key and shape
checks, ``modules_to_save``) for any method; what differs by method lives here, one
:class:`PeftMapping` per method, handed to ``register_method(config_class, peft=...)``. A
method registered without one has no PEFT format, and ``save_peft`` refuses it by name.

As PEFT 0.21 writes them (notes: lightning-internals.md §5): tensor keys are the module
path under ``base_model.model.`` with the adapter name left out
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``; IA3 ``...k_proj.ia3_l``;
DoRA ``...q_proj.lora_magnitude_vector``); prompt and prefix tuning store one
``prompt_embeddings`` tensor (prefix tuning: the prefix itself, the MLP folded away).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from lightning_peft.adapters.ia3 import IA3, IA3Linear
from lightning_peft.adapters.inputs import HFModel, is_encoder_decoder
from lightning_peft.adapters.lora import LoRA, LoRALinear
from lightning_peft.adapters.lora_layers import LoRAMultiheadAttention
from lightning_peft.adapters.prefix import PrefixKV, PrefixTuning, cache_shape
from lightning_peft.adapters.prompt import PromptTuning, SoftPrompt
from lightning_peft.quantization.layers import is_linear_layer
from lightning_peft.targeting import Patterns

PROMPT = "prompt_embeddings"  # prompt learning's one tensor, keyed without a module path


class PeftMapping:
    """One method's side of the PEFT format. Subclasses set ``peft_type`` and implement
    :meth:`fields`, :meth:`config` and :meth:`tensors`; the other hooks have defaults."""

    peft_type: str = ""
    # Prompt learning wraps the whole model: PEFT keys its modules_to_save under
    # "base_model." and writes num_transformer_submodules.
    prompt_learning: bool = False

    def fields(self, host: HFModel, config: Any) -> dict[str, Any]:
        """``adapter_config.json``'s method fields for ``config`` on ``host``."""
        raise NotImplementedError

    def config(self, fields: dict[str, Any]) -> Any:
        """This package's config for a PEFT config of this ``peft_type``."""
        raise NotImplementedError

    def tensors(self, host: HFModel, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's live tensors in ``host``, keyed ``<module path>.<PEFT name>``."""
        raise NotImplementedError

    def unsupported(self, fields: dict[str, Any]) -> list[str]:
        """``key=value`` for each option in ``fields`` this package does not implement."""
        return []

    def scaling_fields(self, config: Any) -> dict[str, Any]:
        """The config fields that decide what the tensors compute, beyond their shapes."""
        return {}

    def saved(self, host: HFModel, config: Any, tensors: dict[str, torch.Tensor]) -> None:
        """Turn the live tensors into what the file holds, in place (default: as they are)."""

    def loaded(self, host: HFModel, config: Any, tensors: dict[str, torch.Tensor]) -> None:
        """Turn a file's tensors into the live ones, in place (default: as they are)."""

    def warn(self, host: HFModel, config: Any, adapter_name: str) -> None:
        """Warn where the same file computes something else here than in PEFT."""


class LoRAMapping(PeftMapping):
    peft_type = "LORA"

    def fields(self, host: HFModel, config: LoRA) -> dict[str, Any]:
        return {
            "r": config.rank,
            "lora_alpha": config.alpha,
            "lora_dropout": config.dropout,
            "target_modules": peft_patterns(config.target_modules),
            "exclude_modules": peft_patterns(config.exclude_modules) or None,
            "use_rslora": config.use_rslora,
            "use_dora": config.use_dora,
            # LoftQ's values are in the file; PEFT's own LoftQ recipe saves True as well, so
            # that loading does not run LoftQ again.
            "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
            "bias": "none",
            "fan_in_fan_out": uses_conv1d(host),
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    def unsupported(self, fields: dict[str, Any]) -> list[str]:
        found = []
        if fields.get("bias", "none") != "none":
            found.append(f"bias={fields['bias']!r}")
        if fields.get("init_lora_weights", True) not in (True, False, "gaussian"):
            # PiSSA, OLoRA, LoftQ, CorDA, EVA...: the adapter was trained against a base
            # PEFT rewrote, so on the original base it computes something else.
            found.append(f"init_lora_weights={fields['init_lora_weights']!r}")
        return found

    def config(self, fields: dict[str, Any]) -> LoRA:
        return LoRA(
            rank=fields["r"],
            alpha=fields.get("lora_alpha", 8),
            dropout=fields.get("lora_dropout", 0.0),
            target_modules=our_patterns(fields.get("target_modules")) or "all-linear",
            exclude_modules=our_patterns(fields.get("exclude_modules")),
            use_rslora=fields.get("use_rslora", False),
            use_dora=fields.get("use_dora", False),
            init="gaussian" if fields.get("init_lora_weights", True) == "gaussian" else "kaiming",
        )

    def tensors(self, host: HFModel, adapter_name: str) -> dict[str, torch.Tensor]:
        return {
            f"{path}.{name}": tensor
            for path, module in host.named_modules()
            if isinstance(module, LoRALinear) and adapter_name in module.configs
            for name, tensor in module.peft_tensors(adapter_name).items()
        }

    def scaling_fields(self, config: LoRA) -> dict[str, Any]:
        return {f: getattr(config, f) for f in ("rank", "alpha", "use_rslora", "use_dora")}

    def warn(self, host: HFModel, config: LoRA, adapter_name: str) -> None:
        if config.init == "loftq" and config.loftq_iterations > 1:
            warnings.warn(
                f"adapter {adapter_name!r} was initialised by LoftQ with "
                f"{config.loftq_iterations} alternations, which move the 4-bit base away from "
                "the plain NF4 base: the saved adapter computes its trained outputs only on "
                "that LoftQ base. Export the merged model (merge_and_export) to use it "
                "elsewhere, or train with loftq_iterations=1",
                stacklevel=3,
            )
        # PEFT 0.21 adds the out_proj update of an nn.MultiheadAttention twice (its merge
        # adds it, then merges out_proj again): a file means W + 2 dW there, W + dW here.
        if any(
            isinstance(m, LoRAMultiheadAttention) and adapter_name in m.configs
            for m in host.modules()
        ):
            warnings.warn(
                "adapter with LoRA on nn.MultiheadAttention: Hugging Face PEFT 0.21 applies "
                "the out_proj update of such a layer twice, so the same file computes other "
                "outputs there than here (in_proj and every other layer agree)",
                stacklevel=3,
            )


class IA3Mapping(PeftMapping):
    peft_type = "IA3"

    def fields(self, host: HFModel, config: IA3) -> dict[str, Any]:
        return {
            "target_modules": peft_patterns(config.target_modules),
            "feedforward_modules": peft_patterns(config.feedforward_modules),
            "exclude_modules": peft_patterns(config.exclude_modules) or None,
            "init_ia3_weights": True,
            "fan_in_fan_out": uses_conv1d(host),
        }

    def config(self, fields: dict[str, Any]) -> IA3:
        return IA3(
            target_modules=our_patterns(fields.get("target_modules")),
            feedforward_modules=our_patterns(fields.get("feedforward_modules")),
            exclude_modules=our_patterns(fields.get("exclude_modules")),
        )

    def tensors(self, host: HFModel, adapter_name: str) -> dict[str, torch.Tensor]:
        return {
            f"{path}.ia3_l": module.ia3_l[adapter_name]
            for path, module in host.named_modules()
            if isinstance(module, IA3Linear) and adapter_name in module.configs
        }


class _PromptLearningMapping(PeftMapping):
    """Prompt and prefix tuning: PEFT's prompt-learning configs share their first fields."""

    prompt_learning = True

    def fields(self, host: HFModel, config: Any) -> dict[str, Any]:
        # The prefix is the decoder's in an encoder-decoder model; the prompt, the encoder's.
        return {
            "num_virtual_tokens": config.num_virtual_tokens,
            "num_transformer_submodules": 2 if is_encoder_decoder(host) else 1,
            "num_layers": cache_shape(host)[0],
            **self.own_fields(host, config),
        }

    def own_fields(self, host: HFModel, config: Any) -> dict[str, Any]:
        raise NotImplementedError


class PromptTuningMapping(_PromptLearningMapping):
    peft_type = "PROMPT_TUNING"

    def own_fields(self, host: HFModel, config: PromptTuning) -> dict[str, Any]:
        return {
            "token_dim": cache_shape(host)[3],
            "num_attention_heads": host.config.num_attention_heads,
            "prompt_tuning_init": config.init.upper(),
            "prompt_tuning_init_text": config.init_text,
            "tokenizer_name_or_path": config.tokenizer_name_or_path,
        }

    def config(self, fields: dict[str, Any]) -> PromptTuning:
        return PromptTuning(num_virtual_tokens=fields["num_virtual_tokens"])

    def tensors(self, host: HFModel, adapter_name: str) -> dict[str, torch.Tensor]:
        return _prompt_tensor(host, SoftPrompt, adapter_name)

    # PEFT's encoder-decoder file holds encoder rows, then decoder rows its forward never
    # reads: zeros when saving, cut off when loading.
    def saved(self, host: HFModel, config: Any, tensors: dict[str, torch.Tensor]) -> None:
        if is_encoder_decoder(host):
            prompt = tensors[PROMPT].detach()
            tensors[PROMPT] = torch.cat([prompt, torch.zeros_like(prompt)])

    def loaded(self, host: HFModel, config: Any, tensors: dict[str, torch.Tensor]) -> None:
        if is_encoder_decoder(host) and PROMPT in tensors:
            tensors[PROMPT] = tensors[PROMPT][: config.num_virtual_tokens]


class PrefixTuningMapping(_PromptLearningMapping):
    peft_type = "PREFIX_TUNING"

    def own_fields(self, host: HFModel, config: PrefixTuning) -> dict[str, Any]:
        _, kv_heads, head_dim, _ = cache_shape(host)
        return {
            "token_dim": kv_heads * head_dim,
            "num_attention_heads": kv_heads,
            "encoder_hidden_size": config.encoder_hidden_size or kv_heads * head_dim,
            "prefix_projection": config.reparametrize,
        }

    def config(self, fields: dict[str, Any]) -> PrefixTuning:  # the file holds the prefix
        return PrefixTuning(num_virtual_tokens=fields["num_virtual_tokens"], reparametrize=False)

    def tensors(self, host: HFModel, adapter_name: str) -> dict[str, torch.Tensor]:
        return _prompt_tensor(host, PrefixKV, adapter_name)


def _prompt_tensor(host: HFModel, kind: type[Any], adapter_name: str) -> dict[str, torch.Tensor]:
    """``{"prompt_embeddings": tensor}`` of the ``kind`` module (``SoftPrompt`` or ``PrefixKV``)
    holding ``adapter_name`` in ``host``, or nothing."""
    for module in host.modules():
        if not (isinstance(module, kind) and module.adapter_name == adapter_name):
            continue
        if isinstance(module, PrefixKV):
            module.fold()  # PEFT stores the prefix itself, not the MLP that makes it
            return {PROMPT: module.prefix[adapter_name]}
        return {PROMPT: module.prompt[adapter_name]}
    return {}


def peft_patterns(value: Patterns | None) -> str | list[str]:
    if value is None:
        return []
    return value if isinstance(value, str) else list(value)


def our_patterns(value: Any) -> str | tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return value
    return tuple(sorted(value))  # PEFT may write a set as a list in any order


def uses_conv1d(host: HFModel) -> bool:
    """GPT-2's Conv1D stores weights transposed: PEFT's ``fan_in_fan_out``."""
    return any(type(m).__name__ == "Conv1D" and is_linear_layer(m) for m in host.modules())
