"""Training controls through transformers' TrainingArguments: first-class settings and flags (warmup, scheduler,
weight decay, gradient accumulation, mixed precision, gradient checkpointing, report_to), ``--trainer-arg`` pass-
through validated against TrainingArguments' fields, TensorBoard logs in the run folder, and early stopping on the
per-epoch validation score."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from loradrop.app import TrainSettings
from loradrop.app.epochs import EpochEvaluation
from loradrop.app.settings import ATTN_IMPLEMENTATIONS, LR_SCHEDULERS, OWNED_TRAINER_ARGS, training_argument_names
from loradrop.cli import build_parser, main, settings_from_args
from loradrop.errors import SettingsError

BASE = dict(task="rte", output="runs/x")


def parse(*flags: str) -> TrainSettings:
    return settings_from_args(build_parser().parse_args(["train", "--task", "rte", "--output", "out", *flags]))


def test_flags_become_training_arguments() -> None:
    s = parse("--warmup-ratio", "0.1", "--lr-scheduler", "cosine", "--weight-decay", "0.01",
              "--gradient-accumulation-steps", "4", "--bf16", "--gradient-checkpointing", "--report-to",
              "tensorboard", "--trainer-arg", "max_grad_norm=0.5", "--trainer-arg", "adam_epsilon=1e-6",
              "--trainer-arg", "lr_scheduler_kwargs={num_cycles: 2}", "--trainer-arg", "optim=adamw_torch")
    args = s.training_arguments()
    assert args == {**args, "warmup_steps": 0.1, "lr_scheduler_type": "cosine", "weight_decay": 0.01,
                    "gradient_accumulation_steps": 4, "bf16": True, "fp16": False, "gradient_checkpointing": True,
                    "report_to": ["tensorboard"], "max_grad_norm": 0.5, "adam_epsilon": 1e-6,
                    "lr_scheduler_kwargs": {"num_cycles": 2}, "optim": "adamw_torch"}
    assert TrainSettings.from_dict(s.to_dict()) == s  # the record round-trips (sweeps, resume)
    assert parse().training_arguments()["report_to"] == "none"
    assert parse("--warmup-steps", "7").training_arguments()["warmup_steps"] == 7


def test_the_settings_lists_match_transformers() -> None:
    from transformers.trainer_utils import SchedulerType

    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType}
    assert set(OWNED_TRAINER_ARGS) <= training_argument_names()


def test_attention_backends_are_transformers_own() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert set(ATTN_IMPLEMENTATIONS) <= {"eager", *ALL_ATTENTION_FUNCTIONS}
    s = parse("--attn-implementation", "eager")
    assert s.attn_implementation == "eager" and parse().attn_implementation is None
    assert TrainSettings.from_dict(s.to_dict()) == s


def test_unknown_and_owned_trainer_args_are_one_clear_error() -> None:
    with pytest.raises(SettingsError) as err:
        TrainSettings(**BASE, trainer_args={"max_grad_norm": 1.0, "no_such_field": 1, "another_typo": 2,
                                            "output_dir": "x", "learning_rate": 1e-3})
    text = str(err.value)
    assert "['another_typo', 'no_such_field']" in text and "max_grad_norm" not in text
    assert "output_dir (use --output)" in text and "learning_rate (use --lr)" in text


@pytest.mark.parametrize("changes, problem", [
    (dict(warmup_steps=3, warmup_ratio=0.1), "not both"),
    (dict(warmup_ratio=1.5), "warmup_ratio must be in [0, 1)"),
    (dict(bf16=True, fp16=True), "exclude each other"),
    (dict(lr_scheduler="cosine_annealing"), "lr_scheduler must be one of"),
    (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps must be >= 1"),
    (dict(early_stopping_patience=2), "needs epoch_eval=True"),
    (dict(weight_decay=-1.0), "weight_decay must be >= 0"),
    (dict(attn_implementation="flash"), "attn_implementation must be one of"),
])
def test_bad_training_controls_are_refused(changes: dict, problem: str) -> None:
    with pytest.raises(SettingsError, match=problem.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        TrainSettings(**BASE, **changes)


def test_cli_refuses_both_warmups_and_bad_trainer_arg(capsys) -> None:
    for argv in (["--warmup-steps", "2", "--warmup-ratio", "0.1"], ["--bf16", "--fp16"], ["--trainer-arg", "x"]):
        with pytest.raises(SystemExit) as exit_:
            parse(*argv)
        assert exit_.value.code == 2
    assert main(["train", "--task", "rte", "--output", "o", "--trainer-arg", "bogus=1"]) == 2
    assert "unknown TrainingArguments field(s) ['bogus']" in capsys.readouterr().err


def test_early_stopping_stops_and_restores_the_best_epoch() -> None:
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.9])
    model = torch.nn.Linear(2, 1)

    def evaluate(split):
        return SimpleNamespace(single={"accuracy": next(scores)}, ensemble=None, rows=[])

    callback = EpochEvaluation(evaluate, ("validation",), "validation", "accuracy", patience=2)
    state = SimpleNamespace(is_world_process_zero=True, log_history=[], epoch=0, global_step=0)
    control = SimpleNamespace(should_training_stop=False)
    weights_at = {}
    for epoch in range(1, 6):
        with torch.no_grad():
            model.weight.fill_(float(epoch))
        state.epoch, state.global_step = float(epoch), 10 * epoch
        callback.on_epoch_end(None, state, control, model=model)
        weights_at[epoch] = model.weight.detach().clone()
        if control.should_training_stop:
            break
    assert epoch == 4 and callback.best["epoch"] == 2.0
    assert callback.stopped == {"epoch": 4.0, "step": 40, "patience": 2, "best_epoch": 2.0, "best_step": 20}
    callback.on_train_end(None, state, control, model=model)
    assert torch.equal(model.weight, weights_at[2])


def _rte(bert_dir: Path, output: Path, *extra: str) -> list[str]:
    return ["train", "--task", "rte", "--model", str(bert_dir), "--max-train-samples", "32", "--max-eval-samples",
            "16", "--batch-size", "8", "--max-seq-len", "48", "--ensemble", "2", "--seed", "0", "--output",
            str(output), *extra]


@pytest.mark.slow
def test_a_run_with_training_controls(data_root, bert_dir, tmp_path) -> None:
    output = tmp_path / "run"
    extra = ["--report-to", "tensorboard"] if importlib.util.find_spec("tensorboard") else []
    assert main(_rte(bert_dir, output, "--max-steps", "4", "--warmup-ratio", "0.5", "--lr-scheduler", "cosine",
                     "--weight-decay", "0.01", "--gradient-accumulation-steps", "2", "--gradient-checkpointing",
                     "--trainer-arg", "max_grad_norm=0.5", *extra)) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["train"]["global_step"] == 4
    recorded = metrics["config"]["training_arguments"]
    assert recorded["gradient_accumulation_steps"] == 2 and recorded["max_grad_norm"] == 0.5
    state = json.loads((output / "run_config.json").read_text())["args"]
    assert state["lr_scheduler"] == "cosine" and state["warmup_ratio"] == 0.5
    log = (output / "train.log").read_text()
    rates = [json.loads("{" + line.split(": {", 1)[1])["learning_rate"] for line in log.splitlines()
             if '"learning_rate"' in line]
    assert rates and rates[0] < 5e-4  # warming up: below the peak learning rate at the first logged step


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="tensorboard is not installed (pip install tensorboard)")
def test_report_to_tensorboard_writes_event_files_in_the_run_folder(data_root, bert_dir, tmp_path, monkeypatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    output = tmp_path / "run"
    assert main(_rte(bert_dir, output, "--max-steps", "3", "--report-to", "tensorboard", "--ensemble", "0")) == 0
    events = sorted(output.glob("runs/*/events.out.tfevents.*"))
    assert events, sorted(p.relative_to(output) for p in output.rglob("*"))
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert "train/loss" in accumulator.Tags()["scalars"]


@pytest.mark.slow
def test_the_attention_backend_reaches_the_model_in_train_and_eval(data_root, bert_dir, tmp_path, monkeypatch) -> None:
    """--attn-implementation is what from_pretrained gets in train, and eval re-uses the run's unless told otherwise
    (on CUDA, bf16 with sdpa gave NaN gradients on left-padded batches where eager did not: studies/gpu/call.sh)."""
    import loradrop.pretrained as pretrained

    seen: list = []
    real = pretrained.load_model

    def load_model(*args, **kwargs):
        model = real(*args, **kwargs)
        seen.append(model.config._attn_implementation)
        return model

    monkeypatch.setattr(pretrained, "load_model", load_model)
    output = tmp_path / "run"
    assert main(_rte(bert_dir, output, "--max-steps", "2", "--ensemble", "0", "--attn-implementation", "eager")) == 0
    assert main(["eval", "--adapter", str(output), "--ensemble", "0", "--max-eval-samples", "8"]) == 0
    assert main(["eval", "--adapter", str(output), "--ensemble", "0", "--max-eval-samples", "8",
                 "--attn-implementation", "sdpa", "--output", str(tmp_path / "e2.json")]) == 0
    assert seen == ["eager", "eager", "sdpa"]
    assert main(_rte(bert_dir, tmp_path / "run2", "--max-steps", "1", "--ensemble", "0")) == 0
    assert seen[-1] == "sdpa"  # transformers' default when the flag is not given


@pytest.mark.slow
def test_early_stopping_in_a_run(data_root, bert_dir, tmp_path) -> None:
    output = tmp_path / "run"
    assert main(_rte(bert_dir, output, "--epochs", "3", "--epoch-eval", "--early-stopping-patience", "1",
                     "--lr", "1e-9")) == 0  # a learning rate this small cannot improve validation: stop after 2
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["early_stopping"]["stopped"]["epoch"] == 2.0
    assert len(metrics["epochs"]) == 2 and metrics["best_epoch"]["epoch"] == 1.0


def test_settings_fields_have_flags() -> None:
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    assert {f.name for f in dataclasses.fields(TrainSettings)} <= {a.dest for a in train._actions}
