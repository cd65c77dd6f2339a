"""Bad input and damaged files through the command line: one line on stderr, exit status 2, nothing lost or left
half-written (issue #12). Each test names the defect it guards in docs/RELIABILITY.md."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

from loradrop.app.integrity import MANIFEST, verify_manifest, write_manifest
from loradrop.app.runfolder import lock_path, run_lock
from loradrop.cli import main
from loradrop.errors import UsageError

pytestmark = pytest.mark.slow


def train_args(bert_dir: Path, output: Path, *extra: str) -> list[str]:
    return ["train", "--task", "rte", "--model", str(bert_dir), "--max-train-samples", "32", "--max-eval-samples",
            "16", "--max-steps", "2", "--batch-size", "8", "--max-seq-len", "32", "--ensemble", "2",
            "--output", str(output), *extra]


def one_error_line(capsys, command: str = "train") -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"loradrop {command}: error:"), err
    return err[0]


@pytest.fixture(scope="module")
def run_dir(data_root: Path, bert_dir: Path, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("runs") / "rte"
    assert main(train_args(bert_dir, output)) == 0
    return output


def test_adapter_has_a_manifest_that_verifies(run_dir: Path) -> None:
    adapter = run_dir / "adapter"
    files = json.loads((adapter / MANIFEST).read_text())["files"]
    assert {"adapter_model.safetensors", "adapter_config.json", "loradrop_config.json"} <= files.keys()
    assert verify_manifest(adapter) is True


@pytest.mark.parametrize("damage, message", [
    ("flip", "does not match its sha256"),
    ("truncate_no_manifest", "is not a readable safetensors file"),
    ("missing_weights", "has no adapter_model.safetensors"),
])
def test_damaged_adapter_is_one_line(damage: str, message: str, run_dir: Path, tmp_path: Path, capsys) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(run_dir / "adapter", adapter)
    shutil.copy(run_dir / "metrics.json", tmp_path / "metrics.json")
    weights = adapter / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "flip":  # 64 flipped bytes in the middle of the tensor data
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
        weights.write_bytes(bytes(data))
    elif damage == "truncate_no_manifest":
        (adapter / MANIFEST).unlink()
        weights.write_bytes(bytes(data[:40]))
    else:
        weights.unlink()
        (adapter / MANIFEST).unlink()
    capsys.readouterr()
    assert main(["eval", "--adapter", str(adapter), "--output", str(tmp_path / "out")]) == 2
    assert message in one_error_line(capsys, "eval")
    assert not (tmp_path / "out" / "eval_metrics.json").exists()


def test_adapter_for_another_base_model(run_dir: Path, tmp_path: Path, capsys) -> None:
    import transformers

    from helpers import make_tiny_bert

    other = tmp_path / "wider"
    make_tiny_bert(other)
    config = transformers.AutoConfig.from_pretrained(other)
    config.hidden_size, config.intermediate_size = 48, 96
    transformers.BertModel(config).save_pretrained(other)
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run_dir), "--model", str(other), "--output", str(tmp_path / "o")]) == 2
    line = one_error_line(capsys, "eval")
    assert "does not fit model" in line and "size mismatch" in line


def test_max_seq_len_is_capped_at_the_model_positions(data_root: Path, bert_dir: Path, tmp_path: Path,
                                                       capsys) -> None:
    capsys.readouterr()
    out = tmp_path / "run"
    assert main([*train_args(bert_dir, out)[:-2], "--max-seq-len", "4096", "--output", str(out)]) == 2
    assert "exceeds the 512 positions" in one_error_line(capsys)
    assert not out.exists() and not lock_path(out).exists()


def test_output_under_a_file(data_root: Path, bert_dir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "afile").write_text("x")
    capsys.readouterr()
    assert main(train_args(bert_dir, tmp_path / "afile" / "run")) == 2
    assert "is a file, not a folder" in one_error_line(capsys)


def test_a_busy_run_folder_is_refused_and_a_stale_lock_taken_over(data_root: Path, bert_dir: Path,
                                                                  tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    with run_lock(out):  # this process owns it, alive
        capsys.readouterr()
        assert main(train_args(bert_dir, out)) == 2
        line = one_error_line(capsys)
        assert f"is in use by pid {os.getpid()} on host {socket.gethostname()}" in line
    assert not lock_path(out).exists()
    with pytest.raises(UsageError, match="is in use"), run_lock(out), run_lock(out):
        pass
    # a crashed owner (a pid that no longer runs) leaves a stale lock: the next run takes it over
    dead = 2 ** 22 + 12345
    lock_path(out).write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "since": "earlier"}))
    assert main(train_args(bert_dir, out)) == 0
    assert (out / "metrics.json").is_file() and not lock_path(out).exists()


def test_corrupted_checkpoint_is_refused_on_resume(data_root: Path, bert_dir: Path, tmp_path: Path,
                                                    capsys) -> None:
    out = tmp_path / "run"
    assert main([*train_args(bert_dir, out), "--save-steps", "1"]) == 0
    checkpoint = out / "checkpoint-2"
    assert verify_manifest(checkpoint)
    shutil.rmtree(out / "adapter")
    (checkpoint / "adapter_model.safetensors").write_bytes(b"garbage")
    capsys.readouterr()
    assert main([*train_args(bert_dir, out), "--save-steps", "1", "--resume"]) == 2
    assert "checkpoint-2/adapter_model.safetensors does not match its sha256" in one_error_line(capsys)


def test_manifest_round_trip(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("b")
    assert verify_manifest(tmp_path) is False  # no manifest: a plain folder still loads
    write_manifest(tmp_path)
    assert verify_manifest(tmp_path)
    (tmp_path / "sub" / "b.txt").unlink()
    with pytest.raises(UsageError, match="b.txt is missing"):
        verify_manifest(tmp_path)


def test_a_diverged_run_fails_and_reports_no_success(data_root: Path, bert_dir: Path, tmp_path: Path,
                                                      capsys) -> None:
    out = tmp_path / "run"
    capsys.readouterr()
    assert main([*train_args(bert_dir, out), "--lr", "1e30"]) == 2
    err = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()  # the progress bar precedes the error
    errors = [line for line in err if line.startswith("loradrop train: error:")]
    assert len(errors) == 1 and errors[0] == err[-1]
    assert "training diverged at step" in errors[0] and "learning rate" in errors[0]
    assert not out.exists() and not (tmp_path / ".run.partial").exists() and not lock_path(out).exists()
    # opting in skips the bad steps, counts them, and the run completes
    assert main([*train_args(bert_dir, out), "--lr", "1e30", "--skip-nonfinite-steps"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["nonfinite_steps_skipped"] and metrics["config"]["args"]["skip_nonfinite_steps"]


def test_sigkill_during_training_then_resume_equals_an_uninterrupted_run(data_root: Path, bert_dir: Path,
                                                                         tmp_path: Path) -> None:
    """SIGKILL at an arbitrary moment (here: right after the third checkpoint appears, while training goes on):
    no run folder appears, the lock is stale, and --resume continues to exactly the uninterrupted result."""
    import signal
    import subprocess
    import sys
    import time

    import torch
    from safetensors.torch import load_file

    args = ["--max-steps", "8", "--save-steps", "2"]
    reference = tmp_path / "reference"
    assert main([*train_args(bert_dir, reference), *args]) == 0
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "loradrop", *train_args(bert_dir, out), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    staging = tmp_path / ".killed.partial"
    deadline = time.time() + 180
    while time.time() < deadline and not (staging / "checkpoint-4").exists() and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and lock_path(out).exists()  # the killed run left its lock and its staging folder
    assert main([*train_args(bert_dir, out), *args, "--resume"]) == 0  # the stale lock is taken over
    a, b = (json.loads((run / "metrics.json").read_text()) for run in (reference, out))
    assert b["train"]["resumed_from"].startswith("checkpoint-")  # where the kill landed depends on the machine
    assert a["eval"] == b["eval"]
    assert a["train"]["train_loss"] == pytest.approx(b["train"]["train_loss"], rel=1e-6)
    wa, wb = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (reference, out))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_an_evaluation_failure_keeps_the_trained_run(data_root: Path, bert_dir: Path, tmp_path: Path,
                                                     monkeypatch, capsys) -> None:
    from loradrop.tasks import classification

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(classification, "predict_classification", out_of_memory)
        with pytest.raises(RuntimeError, match="simulated"):  # an internal failure keeps its traceback
            main(train_args(bert_dir, out))
    status = json.loads((out / "run_status.json").read_text())
    assert status["status"] == "trained, not evaluated" and "simulated" in status["error"]
    assert verify_manifest(out / "adapter") and not (out / "metrics.json").exists()
    assert not list(out.glob(".*.tmp")) and not lock_path(out).exists()
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out), "--ensemble", "2"]) == 0  # evaluation alone, no retraining
    assert json.loads((out / "eval_metrics.json").read_text())["eval"]["ensemble"]["ensemble_size"] == 2


def test_a_full_disk_is_one_line_and_leaves_no_partial_run(data_root: Path, bert_dir: Path, tmp_path: Path,
                                                           monkeypatch, capsys) -> None:
    import errno

    from loradrop.app import train_run

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    out = tmp_path / "run"
    monkeypatch.setattr(train_run, "write_json", full)  # the first write of the run folder
    capsys.readouterr()
    assert main(train_args(bert_dir, out)) == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line and "free space or choose another --output" in line
    assert not out.exists() and not (tmp_path / ".run.partial").exists() and not lock_path(out).exists()


def test_resuming_at_the_last_step_keeps_the_train_loss(data_root: Path, bert_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    from safetensors.torch import load_file

    assert main([*train_args(bert_dir, out), "--save-steps", "1"]) == 0
    before = json.loads((out / "metrics.json").read_text())
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    for name in ("metrics.json", "predictions.jsonl"):
        (out / name).unlink()
    assert main([*train_args(bert_dir, out), "--save-steps", "1", "--resume"]) == 0  # nothing left to train
    after = json.loads((out / "metrics.json").read_text())
    assert after["train"]["resumed_from"] == "checkpoint-2" and after["train"]["train_loss"] > 0
    assert after["train"]["train_loss"] == pytest.approx(before["train"]["train_loss"], rel=1e-9)
    assert after["eval"] == before["eval"] and after["train"]["global_step"] == 2  # no step beyond max_steps
    again = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    stored = json.loads((out / "adapter" / "loradrop_config.json").read_text())
    assert stored["mask_state"]["step"] == 2
