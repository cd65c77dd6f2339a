"""What docs/SECURITY.md promises: pickles are never executed, plans are parsed safely."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch


class _Payload:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (self.target, "pwned"))


def test_a_malicious_pickle_in_a_checkpoint_is_not_executed(tmp_path: Path) -> None:
    target = tmp_path / "pwned.txt"
    evil = tmp_path / "optimizer.pt"
    evil.write_bytes(pickle.dumps(_Payload(target)))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(evil, weights_only=True)  # how transformers' Trainer reads optimizer / scheduler / RNG state
    assert not target.exists()


def test_a_pickled_adapter_alone_is_refused(tmp_path: Path) -> None:
    from loradrop.app.eval_run import check_adapter
    from loradrop.errors import UsageError

    target = tmp_path / "pwned.txt"
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(target)))
    with pytest.raises(UsageError, match="only from safetensors"):
        check_adapter(tmp_path)
    assert not target.exists()


def test_sweep_plans_never_construct_python_objects(tmp_path: Path) -> None:
    from loradrop.app.sweep import SweepPlan
    from loradrop.errors import UsageError

    plan = tmp_path / "plan.yaml"
    plan.write_text("name: !!python/object/apply:os.system ['touch pwned']\nmethods: {a: {}}\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        SweepPlan.load(plan)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
