"""Model-level API: `apply_lora_dropout`, eval modes, save/load and export."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
import types
import warnings
from collections.abc import Iterator
from importlib.metadata import version as _pkg_version
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from .adalora_layer import AdaLoraSVDHandler  # noqa: F401 - importing it registers the AdaLoRA layer handler
from .config import CONFIG_FILE_NAME, EVAL_MODES, LoraDropoutConfig, read_config_file
from .dora import DoraLinearHandler  # noqa: F401 - importing it registers the DoRA layer handler
from .errors import UsageError
from .layer_types import unsupported_reason
from .layers import LAYER_HANDLERS, handler_for
from .masks import plan_slices
from .members import DETACHED_LAYER, MemberController
from .quantised import LoraBnbHandler  # noqa: F401 - importing it registers the bitsandbytes (QLoRA) handler

_ATTR = "_loradrop_controller"
_DETACHED = "_loradrop_detached"  # on a PeftModel whose LoRA Dropout was detached: the reason
_OWNERS = "_loradrop_owners"  # on an adapted LoRA layer: {adapter: controller}, read by the update_layer guard
_TUNER_OWNER = "_loradrop_owner"  # on the PEFT tuner (LoraModel): the controller whose inject_adapter is wrapped


def get_controller(model: nn.Module) -> MemberController:
    """The `MemberController` of a model that `apply_lora_dropout` was applied to."""
    controller = _find_controller(model)
    if controller is None:
        reason = getattr(model, "__dict__", {}).get(_DETACHED)
        if reason is not None:
            raise ValueError(f"LoRA Dropout no longer runs in this {type(model).__name__}: {reason}")
        raise ValueError(
            f"LoRA Dropout is not applied to this {type(model).__name__}: call "
            "loradrop.apply_lora_dropout(model, LoraDropoutConfig(...)) first"
        )
    return controller


def inactive_reason(controller: MemberController) -> str | None:
    """Why no layer of the model runs LoRA Dropout's masks now, or None when some layer does.

    Masks act only where the adapter LoRA Dropout was applied to is active, unmerged and enabled: after
    ``model.set_adapter(other)``, ``merge_adapter()`` or inside ``disable_adapter()`` every member is the same model.
    """
    if controller.detached is not None:
        return controller.detached
    if not controller.layers:
        return None
    for module, adapter, _ in controller.layers:
        if (adapter in module.active_adapters and adapter not in module.merged_adapters
                and not module.disable_adapters):
            return None
    module, adapter, _ = controller.layers[0]
    adapters = controller.adapters
    if module.disable_adapters:
        return ("the adapters are disabled (inside model.disable_adapter()), so no LoRA update runs and there are "
                "no masks")
    if adapter in module.merged_adapters:
        return (f"adapter {adapter!r} is merged into the base weights (merge_adapter()): merged layers run the "
                "expected update without masks; call model.unmerge_adapter() first")
    return (f"the active adapter is {list(module.active_adapters)} while LoRA Dropout was applied to {adapters}: the "
            f"active adapter's layers have no masks; call model.set_adapter({adapters[0]!r}) first, or "
            f"loradrop.remove_lora_dropout(model) and apply_lora_dropout(model, config, "
            f"adapter_name={module.active_adapters[0] if module.active_adapters else '...'!r})")


def get_active_controller(model: nn.Module, what: str = "this") -> MemberController:
    """`get_controller`, raising `UsageError` when LoRA Dropout's masks do not run in the model now (see
    `inactive_reason`): an ensemble of identical members would silently report zero uncertainty."""
    controller = get_controller(model)
    reason = inactive_reason(controller)
    if reason is not None:
        raise UsageError(f"loradrop: {what} needs LoRA Dropout's masks, but {reason}")
    return controller


def _find_controller(model: nn.Module) -> MemberController | None:
    # DDP / accelerate wrap the model in `.module`, torch.compile in `._orig_mod` (in either order)
    candidate: nn.Module | None = model
    for _ in range(4):  # a few wrapper levels at most
        if candidate is None:
            break
        if _ATTR in getattr(candidate, "__dict__", {}):
            return candidate.__dict__[_ATTR]
        candidate = getattr(candidate, "_orig_mod", None) or getattr(candidate, "module", None)
    return None


def _lora_layers(model: PeftModel, adapters: list[str]) -> Iterator[tuple[str, nn.Module, str]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in adapters:
                if adapter in module.lora_A or adapter in getattr(module, "lora_embedding_A", ()):
                    yield name, module, adapter


def apply_lora_dropout(model: PeftModel, config: LoraDropoutConfig, *, adapter_name: str | None = None) -> PeftModel:
    """Add LoRA Dropout to a PEFT LoRA model, in place, and return it.

    Every `peft.tuners.lora.Linear` layer of the active adapter (or `adapter_name`) gets a per-instance
    `LoraDropoutVariant`; the model gets forward pre-hooks that plan members (``samples``, ensembles) per call.
    PEFT's classes and the adapter weights are not touched, so ``save_pretrained`` still writes a standard adapter.
    Nothing is changed if any check fails.
    """
    if not isinstance(config, LoraDropoutConfig):
        raise TypeError(f"config must be a loradrop.LoraDropoutConfig, got {type(config).__name__}")
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"apply_lora_dropout needs a peft.PeftModel (from peft.get_peft_model or PeftModel.from_pretrained), "
            f"got {type(model).__name__}"
        )
    if _find_controller(model) is not None:
        raise ValueError("LoRA Dropout is already applied to this model; apply it once (see remove_lora_dropout)")
    adapters = [adapter_name] if adapter_name is not None else list(model.active_adapters)
    for adapter in adapters:
        if adapter not in model.peft_config:
            raise ValueError(f"adapter {adapter!r} not found; the model has {sorted(model.peft_config)}")

    allowed = {t for handler in LAYER_HANDLERS for t in handler.peft_types}
    for adapter in adapters:
        peft_type = str(getattr(model.peft_config[adapter].peft_type, "value", model.peft_config[adapter].peft_type))
        if peft_type not in allowed:
            raise ValueError(f"adapter {adapter!r} is {peft_type}; apply_lora_dropout supports {sorted(allowed)}")

    found = list(_lora_layers(model, adapters))
    supported = [(n, m, a, h) for n, m, a in found if (h := handler_for(m, a)) is not None]
    refused = [(n, m) for n, m, a in found if handler_for(m, a) is None]
    if refused or not supported:
        detail = "; ".join(f"{n!r} is {unsupported_reason(m)}" for n, m in refused[:3])
        raise ValueError(
            f"LoRA Dropout cannot run on {len(refused)} LoRA layer(s) of adapter(s) {adapters}: {detail}. "
            "Supported: lora.Linear (incl. GPT-2 Conv1D, DoRA), lora.Embedding, lora.Conv1d/2d/3d, AdaLoRA SVDLinear "
            "(docs/COVERAGE.md); "
            "leave the other layers out of target_modules" if refused else
            f"the model has no LoRA layers for adapter(s) {adapters}"
        )
    for name, module, adapter, handler in supported:
        if getattr(module, "merged", False):
            raise ValueError(
                f"layer {name!r} has adapter(s) {list(module.merged_adapters)} merged into its base weights "
                "(merge_adapter()); LoRA Dropout masks the unmerged A and B: call model.unmerge_adapter() before "
                "apply_lora_dropout"
            )
        handler.check(name, module, adapter)
    if config.strategy != "input" and any(
        a in m.lora_A and not isinstance(m.lora_dropout[a], nn.Identity) for _, m, a, _ in supported
    ):
        warnings.warn(
            "loradrop: the PEFT adapter also has lora_dropout > 0; it is kept and applied before LoRA Dropout. "
            "Set lora_dropout=0 in the PEFT config to avoid its activation-sized copy.",
            stacklevel=2,
        )

    # ---- all checks passed: mutate
    offset = 0
    slices_list = []
    for index, (_, module, adapter, handler) in enumerate(supported):
        in_features, out_features, rank = handler.dims(module, adapter)
        slices, offset = plan_slices(config.strategy, index, offset, in_features, out_features, rank)
        slices_list.append(slices)
    layers = [(module, adapter, handler) for _, module, adapter, handler in supported]
    controller = MemberController(config, layers, slices_list, adapters, num_features=offset)
    for (_, module, adapter, handler), slices in zip(supported, slices_list):
        handler.install(module, adapter, controller, slices)
        _guard_layer(module, adapter, controller)
    for hooked in _hook_targets(model):
        hooked.register_forward_pre_hook(controller.pre_hook, with_kwargs=True)
        hooked.register_forward_hook(controller.post_hook, with_kwargs=True, always_call=True)
    controller.owner = model
    model.base_model.__dict__[_TUNER_OWNER] = controller
    model.base_model.__dict__["inject_adapter"] = types.MethodType(_inject_adapter_as_owner, model.base_model)
    controller.bind(model.get_base_model(), model.base_model.peft_config, _detach_model)
    model.__dict__.pop(_DETACHED, None)
    model.__dict__[_ATTR] = controller
    # Per instance, so that `model.save_pretrained` also writes loradrop_config.json, and switching or adding
    # adapters says when LoRA Dropout stops acting; PEFT's class is untouched.
    for name, method in _WRAPPED.items():
        model.__dict__[name] = types.MethodType(method, model)
    reason = inactive_reason(controller)
    if reason is not None:
        warnings.warn(f"loradrop: LoRA Dropout is applied but does not act now: {reason}", UserWarning, stacklevel=2)
    return model


def _set_adapter_with_loradrop(self: PeftModel, *args: Any, **kwargs: Any) -> None:
    type(self).set_adapter(self, *args, **kwargs)
    reason = inactive_reason(get_controller(self))
    if reason is not None:
        warnings.warn(f"loradrop: LoRA Dropout stops acting: {reason}. Forward passes run plain LoRA and ensembles "
                      "refuse to run until you switch back", UserWarning, stacklevel=2)


def _add_adapter_with_loradrop(self: PeftModel, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
    out = type(self).add_adapter(self, adapter_name, *args, **kwargs)
    adapters = get_controller(self).adapters
    warnings.warn(
        f"loradrop: adapter {adapter_name!r} was added after apply_lora_dropout and has no LoRA Dropout masks (they "
        f"act on {adapters} only). To use LoRA Dropout with {adapter_name!r}, call loradrop.remove_lora_dropout(model) "
        f"and apply_lora_dropout(model, config, adapter_name={adapter_name!r})", UserWarning, stacklevel=2)
    return out


def _hook_targets(model: PeftModel) -> list[nn.Module]:
    # PeftModel.forward calls the transformers model as a module, but PeftModelFor* task classes call
    # `self.base_model(...)` (LoraModel), which calls `self.model.forward` directly (bypassing its hooks).
    # Hooking the PeftModel, the tuner and the transformers model covers every entry point; a depth guard makes
    # only the outermost act.
    targets = [model, model.base_model, model.get_base_model()]
    unique: list[nn.Module] = []
    for target in targets:
        if all(target is not t for t in unique):
            unique.append(target)
    return unique


def remove_lora_dropout(model: PeftModel) -> PeftModel:
    """Undo `apply_lora_dropout`: the model becomes the plain PEFT LoRA model it was.

    On a model whose LoRA Dropout was already detached (another PeftModel built on its base, or unloaded) this only
    forgets the reason; it never touches layers or hooks that another model's LoRA Dropout now uses."""
    if _find_controller(model) is None and model.__dict__.pop(_DETACHED, None) is not None:
        return model
    _release(model, get_controller(model))
    return model


def _release(model: PeftModel, controller: MemberController) -> None:
    """Remove `controller`'s hooks, per-layer state and per-instance methods from `model` (and nothing else)."""
    # Found through the model, not through stored handles or closures, so that this also works on deep copies.
    targets = _hook_targets(model)
    base = controller._base
    if base is not None and all(base is not t for t in targets):
        targets.append(base)  # unload(): the tuner may no longer reach the base it was applied to
    for hooked in targets:
        for registry in (hooked._forward_pre_hooks, hooked._forward_hooks):
            for hook_id in [i for i, hook in registry.items() if getattr(hook, "__self__", None) is controller]:
                del registry[hook_id]
                for kwargs_ids in (hooked._forward_pre_hooks_with_kwargs, hooked._forward_hooks_with_kwargs,
                                   hooked._forward_hooks_always_called):
                    kwargs_ids.pop(hook_id, None)
    for module, adapter, handler in controller.layers:
        handler.uninstall(module, adapter, controller)
        _unguard_layer(module, adapter, controller)
    tuner = model.base_model
    if tuner.__dict__.get(_TUNER_OWNER) is controller:
        del tuner.__dict__[_TUNER_OWNER]
        tuner.__dict__.pop("inject_adapter", None)
    if model.__dict__.get(_ATTR) is controller:
        del model.__dict__[_ATTR]
        for name in _WRAPPED:
            model.__dict__.pop(name, None)


def _detach_model(controller: MemberController, reason: str) -> None:
    """`MemberController.detach`'s cleanup: the owning PeftModel keeps only the reason (for error messages)."""
    model = getattr(controller, "owner", None)
    if model is None:
        return
    _release(model, controller)
    model.__dict__[_DETACHED] = reason


def _guard_layer(module: nn.Module, adapter: str, controller: MemberController) -> None:
    """Record `controller` as the owner of (module, adapter) and guard PEFT's ``update_layer`` on the instance.

    PEFT builds a new PeftModel on a base that already holds LoRA layers by calling ``update_layer`` on them (same
    objects, fresh adapter weights). For an adapter LoRA Dropout runs on, that call means the layer now belongs to
    another model: the guard detaches the old controller first, so its per-layer state never leaks into the new
    model. The hot path is untouched (``update_layer`` runs only when adapters are created)."""
    owners = module.__dict__.get(_OWNERS)
    if owners is None:
        owners = module.__dict__[_OWNERS] = {}
        # A bound method in the instance __dict__ shadows the class's; copy.deepcopy rebinds it to the copy.
        module.__dict__["update_layer"] = types.MethodType(_guarded_update_layer, module)
    owners[adapter] = controller


def _unguard_layer(module: nn.Module, adapter: str, controller: MemberController) -> None:
    owners = module.__dict__.get(_OWNERS)
    if owners is None or owners.get(adapter) is not controller:
        return
    del owners[adapter]
    if not owners:
        del module.__dict__[_OWNERS]
        module.__dict__.pop("update_layer", None)


def _guarded_update_layer(self: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
    """PEFT's ``update_layer``, after detaching every controller whose model is not the one injecting: the same
    adapter created again always means a new model; another adapter is the owner's own (``add_adapter``,
    ``load_adapter``, ``add_weighted_adapter``: its tuner's ``inject_adapter`` is running) or a new model's."""
    owners = self.__dict__.get(_OWNERS, {})
    name = kwargs.get("target_name") or type(self).__name__
    for adapter, owner in list(owners.items()):
        if adapter == adapter_name or not owner.injecting:
            owner.detach(DETACHED_LAYER.format(name=name, adapter=adapter_name))
    return type(self).update_layer(self, adapter_name, *args, **kwargs)


def _inject_adapter_as_owner(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The tuner's ``inject_adapter`` (per instance), marking its controller as the injecting owner meanwhile."""
    owner = self.__dict__[_TUNER_OWNER]
    owner.injecting += 1
    try:
        return type(self).inject_adapter(self, *args, **kwargs)
    finally:
        owner.injecting -= 1


def set_eval_mode(model: nn.Module, mode: str) -> None:
    """What a plain forward in ``model.eval()`` uses: ``"expected"`` (the expected update, default) or ``"raw"``
    (the unscaled update: the paper's "dropout only in training" ablation)."""
    if mode not in EVAL_MODES:
        raise ValueError(f"eval mode must be one of {list(EVAL_MODES)}, got {mode!r}")
    get_controller(model).eval_mode = mode


def get_mask_state(model: nn.Module) -> dict[str, int]:
    """The mask stream's position (seed and step counter), to store with a training checkpoint."""
    return get_controller(model).state_dict()


def set_mask_state(model: nn.Module, state: dict[str, int]) -> None:
    """Restore a position saved by `get_mask_state`: the following steps draw the same masks as before."""
    get_controller(model).load_state_dict(state)


# ---------------------------------------------------------------------------------------------- save / load / export
def _metadata(controller: MemberController) -> dict[str, Any]:
    return {
        "adapters": list(controller.adapters),
        "mask_state": controller.state_dict(),
        "eval_mode": controller.eval_mode,
        "loradrop_version": _version("loradrop"),
        "peft_version": _version("peft"),
    }


def _version(name: str) -> str:
    try:
        return _pkg_version(name)
    except Exception:  # pragma: no cover - not installed as a distribution
        return "unknown"


def _save_pretrained_with_loradrop(self: PeftModel, save_directory: str, *args: Any, **kwargs: Any) -> None:
    type(self).save_pretrained(self, save_directory, *args, **kwargs)
    if kwargs.get("is_main_process", True):
        controller = get_controller(self)
        controller.config.save(save_directory, **_metadata(controller))


_WRAPPED = {"save_pretrained": _save_pretrained_with_loradrop, "set_adapter": _set_adapter_with_loradrop,
            "add_adapter": _add_adapter_with_loradrop}


def from_pretrained(
    base_model: nn.Module,
    adapter_path: str | os.PathLike[str],
    *,
    config: LoraDropoutConfig | None = None,
    is_trainable: bool = False,
    **peft_kwargs: Any,
) -> PeftModel:
    """Load a PEFT adapter onto `base_model` and restore its LoRA Dropout settings and mask state in one call.

    `config` overrides the stored settings; without it, ``loradrop_config.json`` must be in `adapter_path`.
    """
    path = Path(adapter_path)
    if config is None and not (path / CONFIG_FILE_NAME).is_file():
        raise FileNotFoundError(
            f"{str(path)!r} has no {CONFIG_FILE_NAME}; pass config=LoraDropoutConfig(...) to add LoRA Dropout to a "
            "plain PEFT adapter"
        )
    stored_state = None
    eval_mode = None
    if config is None:
        payload = read_config_file(path)
        config = LoraDropoutConfig.from_payload(payload)
        stored_state = payload.get("mask_state")
        eval_mode = payload.get("eval_mode")
    model = PeftModel.from_pretrained(base_model, str(path), is_trainable=is_trainable, **peft_kwargs)
    apply_lora_dropout(model, config)
    if stored_state:
        set_mask_state(model, stored_state)
    if eval_mode:
        set_eval_mode(model, eval_mode)
    return model


@contextlib.contextmanager
def staged_folder(output_dir: Path) -> Iterator[Path]:
    """A temporary folder beside `output_dir`, renamed into place when the block completes and removed when it fails:
    an export appears whole or not at all. A non-empty `output_dir` is refused before anything is written."""
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"export target {str(output_dir)!r} exists and is not empty; choose a new folder")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        yield tmp
        if output_dir.exists():
            output_dir.rmdir()
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_adapter(model: PeftModel, output_dir: str | os.PathLike[str], *, merge: bool = False) -> Path:
    """Write a plain PEFT adapter (or, with ``merge=True``, a merged transformers model) whose single forward equals
    LoRA Dropout's expected update, so it serves unchanged in PEFT, transformers or vLLM.

    The adapter form folds the expected factor into ``lora_B``; the model itself is left as it was. The output is
    written to a temporary folder and moved into place only when complete.
    """
    controller = get_controller(model)
    # an export always serves the expectation (lora_B's bias, PEFT's lora_bias, has its own factor)
    factor, bias_factor = controller.config.expected_factor, controller.config.expected_bias_factor
    output_dir = Path(output_dir)
    with staged_folder(output_dir) as tmp:
        if merge:
            plain = copy.deepcopy(model)
            _scale_lora_b(plain, get_controller(plain), factor, bias_factor)
            remove_lora_dropout(plain)
            merged = plain.merge_and_unload()
            merged.save_pretrained(tmp, safe_serialization=True)
        else:
            originals = _scale_lora_b(model, controller, factor, bias_factor)
            try:
                type(model).save_pretrained(model, str(tmp), safe_serialization=True)
            finally:
                with torch.no_grad():
                    for weight, original in originals:
                        weight.copy_(original)
    return output_dir


def _scale_lora_b(
    model: PeftModel, controller: MemberController, factor: float, bias_factor: float
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Multiply every adapted layer's lora_B by `factor` and its bias by `bias_factor` in place; return (weight,
    original) pairs."""
    originals = []
    with torch.no_grad():
        for _, module, adapter in _lora_layers(model, controller.adapters):
            handler = handler_for(module, adapter)
            if handler is None:
                continue
            bias = handler.b_bias(module, adapter)
            scaled = [(w, factor) for w in handler.b_tensors(module, adapter)]
            for weight, value in scaled + ([(bias, bias_factor)] if bias is not None else []):
                originals.append((weight, weight.detach().clone()))
                weight.mul_(value)
    return originals
