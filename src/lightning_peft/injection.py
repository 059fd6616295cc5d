"""Attach adapters to a model in place, and find them again."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, TypeVar, Union

from torch import nn

from lightning_peft._compat import own_children
from lightning_peft.adapters.heads import head_to_train
from lightning_peft.adapters.init import initial_values_for
from lightning_peft.adapters.inputs import find_transformers_model
from lightning_peft.errors import AdapterConfigError, TargetModulesError, UnsupportedLayerError
from lightning_peft.protocol import (
    LayerAdapterConfig,
    ModelAdapterConfig,
    ModelDefaults,
    NamedAdapterModule,
    TrainsWholeModules,
    WrappingAdapter,
    is_adapter,
    module_configs,
    trained_marks,
)
from lightning_peft.quantization import keep_4bit_storage_exact_
from lightning_peft.targeting import find_targets
from lightning_peft.undo import restored_on_error

ModelT = TypeVar("ModelT", bound=nn.Module)


AdapterConfig = Union[LayerAdapterConfig, ModelAdapterConfig]  # noqa: UP007 (jsonargparse builds the CLI from it)


def apply_adapters(
    model: ModelT,
    config: AdapterConfig | Sequence[AdapterConfig],
    *,
    name: str = "default",
    train_head: bool = True,
) -> ModelT:
    """Attach the adapters of ``config`` (one config or a list of them), in place, and freeze
    everything else.

    Several methods combine when they touch different parameters, e.g.
    ``[LoRA(target_modules=["q_proj"]), BitFit()]``. Every config is checked and every
    target resolved before any module is replaced, so a bad config leaves the model untouched.
    Afterwards exactly the adapter tensors require grad.

    The head a transformers task class adds on top of its backbone (``classifier`` of
    ``BertForSequenceClassification``, ``score`` of ``LlamaForSequenceClassification``)
    starts random at ``from_pretrained``, so it trains too, as part of adapter ``name``
    (Hugging Face PEFT's ``modules_to_save``), unless ``train_head=False`` or a config
    already selects it. One head serves all of a model's adapters.

    Returns:
        ``model`` itself, for chaining.

    Raises:
        AdapterConfigError: ``name`` is not a usable adapter name, or ``config`` is not one.
        TargetModulesError: a pattern selects nothing, or only excluded / adapted modules, or
            two configs select the same layer.
        UnsupportedLayerError: a selected module is not a layer the method can wrap.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise AdapterConfigError(f"adapter name must be a Python identifier, got {name!r}")
    if any(type(m).__module__.startswith("peft.") for m in model.modules()):
        raise AdapterConfigError(
            f"{type(model).__name__} already carries Hugging Face PEFT adapters (a PeftModel or "
            "peft-injected layers); lightning_peft would wrap PEFT's own lora_A / base_layer. "
            "Use the base model, and bring a PEFT adapter in with load_peft(model, folder)"
        )
    if not isinstance(train_head, bool):
        raise AdapterConfigError(f"train_head must be True or False, got {train_head!r}")
    configs = as_config_list(config)
    if not configs:
        raise AdapterConfigError("apply_adapters got an empty list of adapter configs")
    plans: list[tuple[Any, list[str]]] = []
    claimed: dict[str, str] = {}
    selected: set[str] = set()  # modules some config wraps or unfreezes (heads among them)
    for item in configs:
        if isinstance(item, ModelDefaults):  # defaults by model type (IA3)
            item = item.for_model(model)
        if _is_layer_method(item):
            targets = find_targets(
                model,
                item.target_modules,
                item.exclude_modules,
                can_wrap=item.can_wrap,
                method=type(item).__name__,
                allow_adapted=True,
            )
            targets = _joinable(model, targets, item, name)
            _claim(claimed, targets, type(item).__name__)
            plans.append((item, targets))
            selected.update(targets)
        elif is_adapter_config(item):
            item.check(model)
            plans.append((item, []))
            if isinstance(item, TrainsWholeModules):
                selected.update(item.selected_names(model))
        else:
            raise AdapterConfigError(
                f"expected an adapter config (LoRA(...), IA3(...), BitFit(), ...), got {item!r}"
            )
    head = head_to_train(model, selected) if train_head else None
    if head is not None:
        plans.append((head, []))
    on_meta = [t for _, targets in plans for t in targets if _on_meta(model.get_submodule(t))]
    if on_meta:
        raise AdapterConfigError(
            f"{', '.join(on_meta[:3])}{' ...' if len(on_meta) > 3 else ''} is on the meta device "
            "(no values yet): adapters attached now would start uninitialised. Load the weights "
            "first (model.to_empty(device=...) and load_state_dict, or from_pretrained), then "
            "attach the adapters"
        )
    keep_4bit_storage_exact_(model)  # an eval pass must not repack a frozen 4-bit base
    host_prefix = transformers_model_prefix(model)
    # A layer that refuses late undoes the ones before it, their tensors included.
    with restored_on_error(model) as writes:
        for item, targets in plans:
            if not targets:
                with initial_values_for(type(item).__name__):
                    item.attach(model, name)
            for target in targets:
                parent_name, _, child_name = target.rpartition(".")
                parent = model.get_submodule(parent_name)
                layer = getattr(parent, child_name)
                with initial_values_for(target.removeprefix(host_prefix)), writes.watching(layer):
                    wrapped = item.wrap(layer, name, target)
                if not is_adapter(wrapped):
                    raise AdapterConfigError(
                        f"{type(item).__name__}.wrap returned a {type(wrapped).__name__}, which "
                        "is not an adapter module: it needs adapter_params() and a disabled "
                        "flag (lightning_peft.protocol.AdapterModule)"
                    )
                # New modules start in train mode; an adapter follows its layer's (a model
                # from from_pretrained is in eval mode: no LoRA dropout at inference).
                wrapped.train(layer.training)
                replace_module_(model, layer, wrapped)
        for module_name, module in adapter_modules(model):
            if not isinstance(module, WrappingAdapter):  # a prompt or prefix: its host's mode
                module.train(model.get_submodule(module_name.rpartition(".")[0]).training)
        freeze_base_(model)
        _keep_fused_layers_off_(model)
    return model


_UNFUSED = "_lightning_peft_unfused"


def _keep_fused_layers_off_(model: nn.Module) -> None:
    """Keep PyTorch's fused eval path of ``nn.TransformerEncoderLayer`` off where adapters
    sit inside: it reads its submodules' weights directly (``linear1.weight``, the attention's
    ``in_proj_weight``) and would skip them. A forward hook among its modules turns it off.
    ``nn.TransformerEncoder`` would turn padded batches into nested tensors for that path:
    off too."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
            is_adapter(inner) for inner in module.modules()
        ):
            module.use_nested_tensor = False
        if (
            isinstance(module, nn.TransformerEncoderLayer)
            and not module.__dict__.get(_UNFUSED, False)
            and any(is_adapter(inner) for inner in module.modules())
        ):
            module.register_forward_pre_hook(_run_unfused)
            module.__dict__[_UNFUSED] = True


def _run_unfused(module: nn.Module, args: Any) -> None:
    """A forward pre-hook that changes nothing: see ``_keep_fused_layers_off_``."""


def replace_module_(model: nn.Module, old: object, new: nn.Module) -> None:
    """Put ``new`` wherever ``model`` holds ``old``: a layer held by several modules (a
    shared embedding) is wrapped, and unwrapped, on every path, or an adapter would act on
    one path only. Finds holders by identity, so nested wrappers need no names."""
    holders = [
        (owner, attribute)
        for owner in model.modules()
        for attribute, child in own_children(owner).items()
        if child is old
    ]
    for owner, attribute in holders:
        setattr(owner, attribute, new)


def _on_meta(module: nn.Module) -> bool:
    return any(param.is_meta for param in module.parameters())


def transformers_model_prefix(model: nn.Module) -> str:
    """The name, with a trailing dot, of the transformers model inside ``model`` ("" when
    ``model`` is one or holds none): what a LightningModule adds to the names a PEFT file uses."""
    try:
        host = find_transformers_model(model, "")
    except UnsupportedLayerError:
        return ""
    name = next(n for n, m in model.named_modules() if m is host)
    return f"{name}." if name else ""


def is_adapter_config(config: Any) -> bool:
    """True for a method config ``apply_adapters`` accepts (``LoRA(...)``, ``BitFit()``, ...)."""
    return _is_layer_method(config) or isinstance(config, ModelAdapterConfig)


def _is_layer_method(config: Any) -> bool:
    return isinstance(config, LayerAdapterConfig)


def _joinable(model: nn.Module, targets: list[str], config: Any, name: str) -> list[str]:
    """``targets`` minus adapted layers that already hold ``name`` (when ``"all-linear"``
    selected them); raises for adapted layers the config cannot join."""
    kept = []
    for target in targets:
        module = model.get_submodule(target)
        if not is_adapter(module):
            kept.append(target)
            continue
        configs = module_configs(module)
        if not (isinstance(module, NamedAdapterModule) and configs) or not isinstance(
            config, type(next(iter(configs.values())))
        ):
            raise TargetModulesError(
                f"{target} already carries a {type(module).__name__}; a layer takes adapters of "
                f"one method, and {type(config).__name__} cannot join it. Leave it out with "
                "exclude_modules or target other layers."
            )
        if name not in configs:
            kept.append(target)
        elif config.target_modules != "all-linear":
            raise TargetModulesError(
                f"{target} already carries an adapter named {name!r}; attach this one under "
                "another name (apply_adapters(..., name='...')) or delete_adapter first"
            )
    if targets and not kept:
        raise TargetModulesError(
            f"every layer {type(config).__name__} selects already carries an adapter named "
            f"{name!r}; attach under another name"
        )
    return kept


def _claim(claimed: dict[str, str], targets: list[str], method: str) -> None:
    clashes = [t for t in targets if t in claimed]
    if clashes:
        raise TargetModulesError(
            f"{method} and {claimed[clashes[0]]} both select {', '.join(clashes[:5])}; a layer "
            "takes one wrapping adapter. Narrow target_modules or use exclude_modules."
        )
    claimed.update(dict.fromkeys(targets, method))


def as_config_list(config: Any) -> list[Any]:
    """One adapter config or a list / tuple of them, as a list."""
    return list(config) if isinstance(config, (list, tuple)) else [config]


def freeze_base_(model: nn.Module) -> None:
    """Set ``requires_grad`` on exactly the adapter tensors of ``model`` that can train: in
    a layer holding several named adapters, those of the active ones."""
    model.requires_grad_(False)
    for tensor in adapter_parameters(model).values():
        tensor.requires_grad_(True)
    for _, module in adapter_modules(model):
        if isinstance(module, NamedAdapterModule):
            train_active_adapters_only_(module)


def train_active_adapters_only_(module: Any) -> None:
    """In a layer holding named adapters (LoRA, IA3), the active ones' tensors require grad
    and the others' do not."""
    for tensor_name in module.adapter_params():  # "lora_A.<name>.weight", "ia3_l.<name>"
        owner = tensor_name.split(".")[1]
        module.get_parameter(tensor_name).requires_grad_(owner in module.active_adapters)


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, Any]]:
    """``(name, module)`` for each adapter module in ``model`` (an ``nn.Module`` that is an
    ``AdapterModule``), in module order."""
    for module_name, module in model.named_modules():
        if is_adapter(module):
            yield module_name, module


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trained tensors of ``model`` keyed by their ``model.state_dict()`` names, in module
    order: adapter modules' own tensors and base tensors a method marked as trained (BitFit)."""
    found: dict[int, tuple[str, nn.Parameter]] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        names = list(module.adapter_params()) if is_adapter(module) else []
        for _, tensor_names in trained_marks(module).values():
            names.extend(tensor_names)
        for param_name in names:
            param = module.get_parameter(param_name)
            found.setdefault(id(param), (prefix + param_name, param))
    if not found:
        return {}
    # A wrapper saves its base layer's tensors under the base's own names (q_proj.bias, not
    # q_proj.base_layer.bias): name each tensor as the state dict does.
    state_names: dict[int, str] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        state_names.setdefault(id(tensor), key)
    return {state_names.get(key, name): param for key, (name, param) in found.items()}


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Full names of the adapter tensors of ``model``: the keys of its adapter state dict."""
    return list(adapter_parameters(model))


def adapter_configs_attached(model: nn.Module) -> list[tuple[str, Any]]:
    """``(adapter name, config)`` of every method attached to ``model``, each pair once."""
    seen: dict[tuple[str, Any], tuple[str, Any]] = {}
    for _, module in model.named_modules():
        pairs = [(n, c) for n, (c, _) in trained_marks(module).items()]
        pairs.extend(module_configs(module).items())
        for adapter_name, item in pairs:
            seen.setdefault((adapter_name, item), (adapter_name, item))  # configs are frozen
    return list(seen.values())
