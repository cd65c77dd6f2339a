"""loradrop's application layer: typed settings, run folders, and the train / evaluate / demo / sweep / report
commands built on the library (`loradrop.model`, `loradrop.ensemble`, ...) and the task registry
(`loradrop.tasks`). The library never imports this package.

Python entry points (no argparse needed)::

    from loradrop.app import TrainSettings, EvalSettings, train, evaluate

    run = train(TrainSettings(task="mrpc", output="runs/mrpc", epochs=10, samples=4))
    again = evaluate(EvalSettings(adapter=run.output, ensemble=16))
"""

from __future__ import annotations

from .eval_run import evaluate
from .settings import DemoSettings, EvalSettings, TrainSettings
from .train_run import RunResult, train

__all__ = ["DemoSettings", "EvalSettings", "RunResult", "TrainSettings", "evaluate", "run_demo", "train"]


def __getattr__(name: str):
    if name == "run_demo":  # the demo imports PEFT and transformers: load it on first use
        from .demo import run_demo

        return run_demo
    raise AttributeError(f"module 'loradrop.app' has no attribute {name!r}")
