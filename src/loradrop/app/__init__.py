"""loradrop's application layer: typed settings, run folders, and the train / evaluate / demo / sweep / report
commands built on the library (`loradrop.model`, `loradrop.ensemble`, ...) and the task registry
(`loradrop.tasks`). The library never imports this package.

Python entry points (no argparse needed)::

    from loradrop.app import TrainSettings, EvalSettings, train, evaluate

    run = train(TrainSettings(task="mrpc", output="runs/mrpc", epochs=10, samples=4))
    again = evaluate(EvalSettings(adapter=run.output, ensemble=16))
"""

from __future__ import annotations

from typing import Any

from .settings import DemoSettings, EvalSettings, TrainSettings

__all__ = ["DemoSettings", "EvalSettings", "RunResult", "TrainSettings", "evaluate", "run_demo", "train"]

# The entry points import torch, transformers and PEFT: load them on first use, so that building settings (and the
# command line's argument errors) stays fast.
_LAZY = {"evaluate": "eval_run", "RunResult": "train_run", "train": "train_run", "run_demo": "demo"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'loradrop.app' has no attribute {name!r}")
