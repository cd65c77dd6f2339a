"""Typed settings: validation reports every problem at once, records round-trip, the CLI maps onto them."""

from __future__ import annotations

import dataclasses

import pytest

from loradrop.app import DemoSettings, EvalSettings, TrainSettings
from loradrop.app.settings import RESUME_KEYS
from loradrop.cli import build_parser, settings_from_args
from loradrop.errors import SettingsError, UsageError


def test_defaults_match_the_command_line() -> None:
    parsed = settings_from_args(build_parser().parse_args(["train", "--task", "rte", "--output", "x"]))
    assert parsed == TrainSettings(task="rte", output="x")
    demo = settings_from_args(build_parser().parse_args(["demo"]))
    assert demo == DemoSettings()
    ev = settings_from_args(build_parser().parse_args(["eval", "--adapter", "a"]))
    assert ev == EvalSettings(adapter="a")


def test_every_settings_field_is_a_flag() -> None:
    parser = build_parser()
    for command, cls in (("train", TrainSettings), ("eval", EvalSettings), ("demo", DemoSettings)):
        sub = parser._subparsers._group_actions[0].choices[command]
        dests = {a.dest for a in sub._actions}
        assert {f.name for f in dataclasses.fields(cls)} <= dests, command


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(SettingsError) as info:
        TrainSettings(task="nope", output="x", lr=-1.0, p=1.5, batch_size=0, epochs=float("inf"), resume=True,
                      overwrite=True)
    problems = info.value.problems
    assert len(problems) == 6, problems
    text = str(info.value)
    for fragment in ("task must be one of", "lr must be > 0, got -1.0", "p must be", "batch_size must be >= 1",
                     "epochs must be a finite number", "resume and overwrite exclude each other"):
        assert fragment in text
    assert isinstance(info.value, UsageError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("changes, fragment", [
    ({"epochs": 0.0, "max_steps": -1}, "epochs > 0 or max_steps > 0"),
    ({"ensemble": -1}, "ensemble must be >= 0"),
    ({"chunk_size": 0}, "chunk_size must be >= 1"),
    ({"method": "dora"}, "method must be one of ['lora', 'adalora']"),
    ({"strategy": "rows"}, "strategy"),
    ({"mask_scope": "token"}, "mask_scope"),
    ({"samples": True}, "samples"),
    ({"target_modules": " , "}, "target_modules must be module names"),
    ({"seed": -3}, "seed must be >= 0"),
    ({"max_train_samples": 0}, "max_train_samples must be >= 1"),
    ({"rescale": "yes"}, "rescale must be True or False"),
    ({"no_lora_dropout": True, "test_ensemble": "mc_dropout"}, "needs peft_dropout > 0"),
    ({"test_ensemble": "masks"}, "is a baseline's ensemble: it needs no_lora_dropout=True"),
    ({"holdout_fraction": 1.5}, "holdout_fraction must be in (0, 1)"),
    ({"peft_dropout": 1.0}, "peft_dropout must be in [0, 1)"),
    ({"test_ensemble": "deep"}, "test_ensemble must be one of"),
])
def test_one_bad_value_names_itself(changes: dict, fragment: str) -> None:
    with pytest.raises(SettingsError) as info:
        TrainSettings(task="rte", output="x", **changes)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_target_modules_as_a_list_and_the_plain_baseline() -> None:
    s = TrainSettings(task="rte", output="x", target_modules=["query", " value"])
    assert s.target_modules == "query,value" and s.target_module_list == ["query", "value"]
    assert TrainSettings(task="rte", output="x", no_lora_dropout=True).lora_dropout_config() is None
    cfg = TrainSettings(task="rte", output="x", p=0.3, samples=4, chunk_size=2, seed=5).lora_dropout_config()
    assert (cfg.p, cfg.samples, cfg.member_chunk, cfg.seed) == (0.3, 4, 2, 5)
    # member chunks are a batch-scope notion: example scope draws one member per row
    assert TrainSettings(task="rte", output="x", mask_scope="example", chunk_size=2).lora_dropout_config(
    ).member_chunk is None


def test_record_round_trip_and_unknown_keys() -> None:
    s = TrainSettings(task="mrpc", output="runs/m", samples=4, lr=1e-3)
    record = s.to_dict()
    assert record["command"] == "train" and record["samples"] == 4
    assert TrainSettings.from_dict(record) == s
    with pytest.raises(SettingsError, match=r"unknown TrainSettings setting\(s\) \['learning_rate'\]"):
        TrainSettings.from_dict({"task": "mrpc", "output": "x", "learning_rate": 1e-3})
    assert s.replace(lr=2e-3).lr == 2e-3
    with pytest.raises(SettingsError):
        s.replace(lr=0.0)


def test_resume_differences_name_the_flags() -> None:
    stored = TrainSettings(task="rte", output="x", lr=0.02).to_dict()
    assert TrainSettings(task="rte", output="x", lr=0.02, resume=True).resume_differences(stored) == []
    changed = TrainSettings(task="rte", output="x", lr=0.5, resume=True).resume_differences(stored)
    assert changed == ["--lr 0.02 -> 0.5"]
    assert set(RESUME_KEYS) <= {f.name for f in dataclasses.fields(TrainSettings)}


def test_instruct_alias_and_registry_tasks() -> None:
    from loradrop.tasks import TASKS, resolve_task, trainable_task_names

    names = trainable_task_names()
    assert "instruct" in names and "mmlu" not in names and {"rte", "squad", "alpaca", "tweets"} <= set(names)
    assert set(names) - {"instruct"} == {n for n, spec in TASKS.items() if spec.trainable}
    assert resolve_task("instruct").name == "alpaca" and resolve_task("rte").name == "rte"
    with pytest.raises(SettingsError, match="task must be one of"):
        EvalSettings(adapter="a", task="mmlu")
