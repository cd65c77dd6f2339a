"""pytest plugin: attach LoRA Dropout at p = 0 to every LoRA model PEFT's own tests build (issue #13).

Loaded by `run.py` with ``-p loradrop_plugin`` while pytest runs PEFT's test files (never copied into this repo).
It wraps the ways PEFT's tests create a PeftModel: ``peft.get_peft_model`` (also where a test module imported the
name) and ``PeftModel.from_pretrained`` (every task subclass goes through it). After PEFT built the model, every
adapter whose type loradrop handles (LoRA, AdaLoRA) gets ``apply_lora_dropout(model, LoraDropoutConfig(p=0.0))``.
A refusal is NOT swallowed: the test fails with loradrop's message, which `run.py` classifies.

Environment: ``LORADROP_PEFT_SUITE=off`` disables attaching (the baseline run, same tests, plain PEFT).
"""

from __future__ import annotations

import functools
import os
import sys
import types
import warnings

import pytest

ENABLED = os.environ.get("LORADROP_PEFT_SUITE", "on") != "off"
_STATS = {"attached": 0, "not_lora": 0}


def _attach(model):
    import peft

    from loradrop import LoraDropoutConfig, apply_lora_dropout
    from loradrop.layers import LAYER_HANDLERS

    if not isinstance(model, peft.PeftModel):  # PeftMixedModel etc.: loradrop takes PeftModels only
        _STATS["not_lora"] += 1
        return model
    allowed = {t for handler in LAYER_HANDLERS for t in handler.peft_types}
    active = list(model.active_adapters)
    types_ = {str(getattr(model.peft_config[a].peft_type, "value", model.peft_config[a].peft_type)) for a in active
              if a in model.peft_config}
    if not active or not types_ or not types_ <= allowed:
        _STATS["not_lora"] += 1
        return model
    with warnings.catch_warnings():
        # loradrop warns when PEFT's own lora_dropout > 0 or when the active adapter has no masks; PEFT's tests may
        # turn warnings into errors, and these are not PEFT's.
        warnings.simplefilter("ignore")
        apply_lora_dropout(model, LoraDropoutConfig(p=0.0, seed=0))
    _STATS["attached"] += 1
    return model


def _wrap_get_peft_model(original):
    @functools.wraps(original)
    def get_peft_model(*args, **kwargs):
        return _attach(original(*args, **kwargs))

    get_peft_model.__loradrop_wrapped__ = True
    return get_peft_model


def _wrap_from_pretrained(original):
    func = original.__func__

    @functools.wraps(func)
    def from_pretrained(cls, *args, **kwargs):
        return _attach(func(cls, *args, **kwargs))

    from_pretrained.__loradrop_wrapped__ = True
    return classmethod(from_pretrained)


_ORIGINAL_GET = None


def pytest_configure(config):
    global _ORIGINAL_GET
    try:
        import diffusers  # noqa: F401 - PEFT's testing_common imports it at module level
    except ImportError:
        # Only PEFT's Stable Diffusion tests use it; a stand-in module lets the other test files import.
        stub = types.ModuleType("diffusers")
        stub.StableDiffusionPipeline = None
        sys.modules["diffusers"] = stub
    if not ENABLED:
        return
    import peft
    import peft.mapping_func
    from peft import PeftModel

    _ORIGINAL_GET = peft.mapping_func.get_peft_model
    wrapped = _wrap_get_peft_model(_ORIGINAL_GET)
    peft.get_peft_model = peft.mapping_func.get_peft_model = wrapped
    if hasattr(peft, "mapping"):
        peft.mapping.__dict__["get_peft_model"] = wrapped
    if not getattr(PeftModel.__dict__["from_pretrained"].__func__, "__loradrop_wrapped__", False):
        PeftModel.from_pretrained = _wrap_from_pretrained(PeftModel.__dict__["from_pretrained"])


def pytest_collection_modifyitems(session, config, items):
    """Test modules did ``from peft import get_peft_model`` at import: rebind that name in each of them."""
    if not ENABLED:
        return
    import peft

    for module in list(sys.modules.values()):  # the test modules and their helpers (testing_common, ...)
        if getattr(module, "get_peft_model", None) is _ORIGINAL_GET:
            module.get_peft_model = peft.get_peft_model


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    before = _STATS["attached"]
    yield
    item.user_properties.append(("loradrop_attached", _STATS["attached"] - before))


_REPORT = os.environ.get("LORADROP_PEFT_SUITE_REPORT")


def pytest_runtest_logreport(report):
    """One JSON line per test phase that did not simply pass its setup/teardown (read by run.py)."""
    if _REPORT is None or (report.when != "call" and report.passed):
        return
    import json

    message = None
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        message = crash.message
    elif isinstance(report.longrepr, tuple):  # skips: (file, line, reason)
        message = report.longrepr[2]
    elif report.longrepr is not None:
        message = str(report.longrepr)[-2000:]
    attached = dict(report.user_properties).get("loradrop_attached")
    with open(_REPORT, "a") as handle:
        handle.write(json.dumps({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                                 "message": (message or "")[:2000], "attached": attached}) + "\n")
