"""The sweep engine: plan expansion and validation, skipping finished runs, surviving a kill, failures recorded and
retried, and worker processes on a CPU, with tiny random models on a real RTE slice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from loradrop.app.sweep import SweepPlan, parse_overrides, pending, run_sweep
from loradrop.errors import SettingsError, UsageError

pytestmark = pytest.mark.slow

PLAN = """
name: tiny
results: res
base: {{model: {model}, max_train_samples: 48, max_eval_samples: 24, epochs: 2, batch_size: 16, max_seq_len: 40,
       ensemble: 2, holdout_fraction: 0.25, epoch_eval: true}}
grid: {{task: [rte], lr: [0.02], seed: [0, 1]}}
methods:
  lora: {{no_lora_dropout: true, test_ensemble: masks}}
  ld: {{p: [0.1, 0.5], samples: 2}}
"""


def write_plan(folder: Path, model: str, text: str = PLAN) -> Path:
    path = folder / "plan.yaml"
    path.write_text(text.format(model=model), encoding="utf-8")
    return path


def test_plan_expansion_ids_and_validation(tmp_path: Path) -> None:
    plan = SweepPlan.load(write_plan(tmp_path, "minilm"))
    runs = plan.runs()
    assert [r.run_id for r in runs] == ["rte__lora__lr-0.02_seed-0", "rte__lora__lr-0.02_seed-1",
                                        "rte__ld__lr-0.02_p-0.1_seed-0", "rte__ld__lr-0.02_p-0.5_seed-0",
                                        "rte__ld__lr-0.02_p-0.1_seed-1", "rte__ld__lr-0.02_p-0.5_seed-1"]
    assert runs[2].axes == {"task": "rte", "lr": 0.02, "seed": 0, "p": 0.1} and runs[2].settings["samples"] == 2
    assert plan.results == tmp_path / "res"
    # per task and per task/method settings, and overrides applied last
    plan.task_settings = {"rte": {"epochs": 3}, "rte/ld": {"lr": 0.5}}
    plan.overrides = parse_overrides(["model=/elsewhere", "ensemble=4"])
    by_id = {r.run_id: r for r in plan.runs()}
    assert by_id["rte__lora__lr-0.02_seed-0"].settings["epochs"] == 3
    assert by_id["rte__ld__lr-0.02_p-0.1_seed-0"].settings["lr"] == 0.02  # a grid axis beats task/method settings
    assert all(r.settings["model"] == "/elsewhere" and r.settings["ensemble"] == 4 for r in by_id.values())
    # a task's own values for a grid axis (a wider lr grid for one task); a list for another setting stays a setting
    plan.task_settings = {"rte": {"lr": [0.02, 0.05], "ood_task": ["mrpc", "cola"]}}
    plan.grid["task"] = ["rte", "mrpc"]
    ids = [r.run_id for r in plan.runs()]
    assert len(ids) == 18 and ids[:4] == ["rte__lora__lr-0.02_seed-0", "rte__lora__lr-0.02_seed-1",
                                          "rte__lora__lr-0.05_seed-0", "rte__lora__lr-0.05_seed-1"]
    assert "mrpc__lora__lr-0.02_seed-0" in ids and not [i for i in ids if i.startswith("mrpc") and "0.05" in i]
    by_id = {r.run_id: r for r in plan.runs()}
    assert by_id["rte__ld__lr-0.05_p-0.5_seed-1"].settings["ood_task"] == ["mrpc", "cola"]
    assert by_id["rte__ld__lr-0.05_p-0.5_seed-1"].settings["lr"] == 0.05
    plan.grid.pop("task")  # the task in base: its own lr list still applies
    plan.base["task"] = "rte"
    assert len(plan.runs()) == 12
    plan.task_settings = {"rte/ld": {"lr": [0.02, 0.05]}}  # a task/method's list for a grid axis is refused
    with pytest.raises(SettingsError, match="belongs to a task's own settings"):
        plan.runs()


@pytest.mark.parametrize("text, fragment", [
    ("name: x\nmethods: {a: {lr: -1}}\nbase: {task: rte}\n", "lr must be > 0"),
    ("name: x\nmethods: {a: {p: [0.1, 2.0]}}\nbase: {task: rte}\n", "p must be"),
    ("name: x\nmethods: {a: {}}\n", "a plan needs a task"),
    ("name: x\nbase: {task: rte}\n", "at least one method"),
    ("name: x\nbase: {task: rte, output: here}\nmethods: {a: {}}\n", "set by the sweep engine"),
    ("name: x\nbase: {task: rte}\nmethods: {a: {learning_rate: 1}}\n", "unknown TrainSettings setting"),
    ("name: x\nbasis: {}\n", "unknown key(s) ['basis']"),
    ("name: [unclosed\n", "not valid YAML"),
    ("- a list\n", "must be a mapping"),
])
def test_bad_plans_are_refused_before_any_run(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises((SettingsError, UsageError)) as info:
        SweepPlan.load(path)
    assert fragment in str(info.value)
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_overrides(["novalue"])


def test_sweep_runs_skips_and_retries(data_root: Path, bert_dir: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    plan = SweepPlan.load(write_plan(tmp_path, str(bert_dir)))
    plan.methods = {"lora": {**plan.methods["lora"], "ood_task": "mrpc", "conformal_alpha": 0.2}}
    plan.grid["seed"] = [0]
    summary = run_sweep(plan, progress=False)
    assert summary == {"planned": 1, "skipped": 0, "ok": 1, "failed": [], "deferred": []}
    result = json.loads((tmp_path / "res" / "rte__lora__lr-0.02_seed-0.json").read_text())
    assert result["schema"] == "loradrop.sweep.run/1" and result["status"] == "ok"
    assert result["axes"] == {"task": "rte", "lr": 0.02, "seed": 0} and result["method"] == "lora"
    metrics = result["metrics"]
    assert metrics["config"]["ensemble_kind"] == "masks" and len(metrics["epochs"]) == 2
    assert metrics["best_epoch"]["metric"] == "accuracy" and metrics["eval"]["validation"]["single"]["n"] == 12
    preds = result["predictions"]
    assert len(preds["test"]["label"]) == 24 and len(preds["validation"]["single_probs"]) == 12
    assert len(preds["best_epoch_test"]["single_probs"][0]) == 2
    # the plan asked for the uncertainty section: recorded, with the OOD predictions, and reported
    acting = metrics["uncertainty"]
    assert acting["ood"]["task"] == "mrpc" and len(preds["ood"]["ensemble_probs"]) == 24
    assert acting["conformal"]["alpha"] == 0.2 and acting["conformal"]["calibration"]["source"] == "validation"
    assert set(acting["selective"]["scores"]) == {"single_max_prob", "ensemble_max_prob", "ensemble_entropy",
                                                  "ensemble_mutual_information"}
    from loradrop.app.report import write_report

    md = write_report([tmp_path / "res"], tmp_path / "R.md").read_text(encoding="utf-8")
    auroc = acting["ood"]["scores"]["ensemble_entropy"]["auroc"]
    line = next(x for x in md[md.index("### OOD detection on rte"):].splitlines() if "ensemble_entropy" in x)
    assert [c.strip() for c in line.strip("|").split("|")][3:6] == ["mrpc", "ensemble_entropy", f"{auroc * 100:.2f}"]
    assert result["wall_time_s"] > 0 and {"cuda", "rss"} <= result["peak_memory_mib"].keys()
    assert {"torch", "peft", "transformers"} <= result["versions"].keys() and "cpu_count" in result["hardware"]
    assert not list((tmp_path / ".res.runs").glob("*")), "run folders are removed after their result is written"

    again = run_sweep(plan, progress=False)  # nothing left to do
    assert again == {"planned": 1, "skipped": 1, "ok": 0, "failed": [], "deferred": []}

    plan.grid["seed"] = [0, 1]
    plan.overrides = {"max_seq_len": 4}  # a setting that fails inside the run (tokenizer windows too short)
    released = []  # every run, failed ones too, hands its CUDA cache back (workers that share a GPU need it)
    monkeypatch.setattr("loradrop.app.provenance.release_memory", lambda: released.append(1))
    summary = run_sweep(plan, progress=False)
    assert summary["skipped"] == 1 and len(summary["failed"]) == 1 and released == [1]
    failed = json.loads((tmp_path / "res" / "rte__lora__lr-0.02_seed-1.failed.json").read_text())
    assert failed["status"] == "failed" and "max_seq_len" in failed["error"] and "Traceback" in failed["traceback"]
    assert failed["peak_memory_mib"]["rss"] > 0  # how far it got (on a GPU: the CUDA peak too)
    assert [r.run_id for r in pending(plan, tmp_path / "res")[0]] == ["rte__lora__lr-0.02_seed-1"]  # retried next


def test_killed_sweep_continues_where_it_stopped(data_root: Path, bert_dir: Path, tmp_path: Path) -> None:
    plan_path = write_plan(tmp_path, str(bert_dir))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "loradrop", "sweep", str(plan_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    results = tmp_path / "res"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(results.glob("*.json"))) < 2 and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.name for p in results.glob("*.json"))
    assert 2 <= len(done_before) < 6, done_before
    for path in results.glob("*.json"):
        json.loads(path.read_text())  # every result file that exists is complete (written atomically)
    # two workers behind the memory gate (on a CPU: no measured peaks, each run reserves an even share), with
    # checkpoints: the pool, its gate and the jobs cross into the worker processes
    proc = subprocess.run([*cmd, "--workers", "2", "--gpu-memory", "8", "--checkpoint-steps", "2"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{6 - len(done_before)} ran, {len(done_before)} done already, 0 failed, 0 deferred (of 6)" in proc.stdout
    assert len(list(results.glob("*.json"))) == 6 and not list(results.glob("*.failed.json"))
    assert not list(results.glob(".*.tmp"))
    dry = subprocess.run([*cmd, "--dry-run"], env=env, capture_output=True, text=True, timeout=120)
    assert "0 to run, 6 done already" in dry.stdout


def test_workers_are_spread_over_the_gpus(tmp_path: Path) -> None:
    """`--gpus`: pool worker k sees GPU gpus[(k-1) mod n] as its only CUDA device (set before torch is imported)."""
    import multiprocessing

    from loradrop.app.sweep import worker_gpu, worker_init

    assert [worker_gpu([2, 5], k) for k in (1, 2, 3, 4)] == [2, 5, 2, 5]
    import torch

    process = multiprocessing.current_process()
    saved = (process._identity, os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("TQDM_DISABLE"),
             torch.get_num_threads())
    try:
        for identity, gpu in (((3,), "2"), ((4,), "5")):  # consecutive pool workers land on different GPUs
            process._identity = identity
            worker_init([2, 5])
            assert os.environ["CUDA_VISIBLE_DEVICES"] == gpu
    finally:  # worker_init also sets this process's threads and TQDM_DISABLE: put everything back
        process._identity = saved[0]
        for name, value in (("CUDA_VISIBLE_DEVICES", saved[1]), ("TQDM_DISABLE", saved[2])):
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        torch.set_num_threads(saved[3])
    with multiprocessing.get_context("spawn").Pool(2, initializer=worker_init, initargs=([2, 5],)) as pool:
        seen = set(pool.map(os.getenv, ["CUDA_VISIBLE_DEVICES"] * 8, chunksize=1))
    assert seen and seen <= {"2", "5"}  # in real worker processes too
    with pytest.raises(UsageError, match="gpus must be"):
        run_sweep(SweepPlan.load(write_plan(tmp_path, "minilm")), tmp_path / "r", workers=2, gpus=[-1])
    from loradrop.cli import main

    with pytest.raises(SystemExit) as info:
        main(["sweep", str(write_plan(tmp_path, "minilm")), "--gpus", "0,x"])
    assert info.value.code == 2


def test_an_interrupted_run_continues_from_its_checkpoint(data_root: Path, bert_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """`checkpoint_steps`: a run stopped after step 2 (Ctrl-C in its worker) continues from checkpoint-2 on the next
    sweep, and ends with the same predictions as a run that was never stopped; its result counts both attempts'
    time and lists the first. Without a usable checkpoint (settings changed since) the run starts over."""
    from transformers import TrainerCallback

    import loradrop.app.train_run as train_run
    from loradrop.app.sweep import PlannedRun, RunJob, execute

    plan = SweepPlan.load(write_plan(tmp_path, str(bert_dir)))
    run = next(r for r in plan.runs() if r.run_id == "rte__ld__lr-0.02_p-0.5_seed-0")
    results, work = tmp_path / "res", tmp_path / "work"
    results.mkdir()
    job = RunJob(run, plan.name, results, work, checkpoint_steps=1)

    class Stop(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    real = train_run.train
    monkeypatch.setattr(train_run, "train", lambda settings, **kw: real(settings, callbacks=[Stop()]))
    with pytest.raises(KeyboardInterrupt):
        execute(job)
    monkeypatch.setattr(train_run, "train", real)
    staging = work / f".{run.run_id}.partial"
    assert (staging / "checkpoint-2").is_dir() and not (results / f"{run.run_id}.json").exists()
    record = json.loads((work / f"{run.run_id}.attempts.json").read_text())
    attempts = record["attempts"]
    assert record["settings"] == run.settings
    assert len(attempts) == 1 and attempts[0]["outcome"] == "interrupted" and attempts[0]["seconds"] > 0

    status = execute(job)
    assert status["status"] == "ok"
    resumed = json.loads((results / f"{run.run_id}.json").read_text())
    assert resumed["attempts"] == attempts
    assert resumed["wall_time_s"] == pytest.approx(status["seconds"] + attempts[0]["seconds"])
    assert resumed["metrics"]["train"]["resumed_from"] == "checkpoint-2"
    assert not (work / f"{run.run_id}.attempts.json").exists() and not staging.exists()

    fresh_results = tmp_path / "fresh"
    fresh_results.mkdir()
    assert execute(RunJob(run, plan.name, fresh_results, tmp_path / "work2"))["status"] == "ok"
    fresh = json.loads((fresh_results / f"{run.run_id}.json").read_text())
    assert "attempts" not in fresh and fresh["metrics"]["train"]["resumed_from"] is None
    for split in ("test", "validation"):
        for key in ("single_probs", "ensemble_probs"):
            np.testing.assert_allclose(resumed["predictions"][split][key], fresh["predictions"][split][key], atol=2e-6)

    # a checkpoint of other settings is not resumed, even of a setting --resume does not compare (epoch_eval): the
    # run starts over, says so, and its time leaves the interrupted attempt out
    restarts = []
    for other in (PlannedRun(run.run_id, run.method, run.axes, {**run.settings, "lr": 0.01}),
                  PlannedRun(run.run_id, run.method, run.axes, {**run.settings, "epoch_eval": False})):
        monkeypatch.setattr(train_run, "train", lambda settings, **kw: real(settings, callbacks=[Stop()]))
        with pytest.raises(KeyboardInterrupt):
            execute(job)
        monkeypatch.setattr(train_run, "train", real)
        (results / f"{run.run_id}.json").unlink()
        capsys.readouterr()
        status = execute(RunJob(other, plan.name, results, work, checkpoint_steps=1))
        assert status["status"] == "ok"
        assert "not resumed (its checkpoint was trained with other settings)" in capsys.readouterr().err
        restarted = json.loads((results / f"{run.run_id}.json").read_text())
        assert restarted["metrics"]["train"]["resumed_from"] is None and restarted["settings"] == other.settings
        assert "attempts" not in restarted and restarted["discarded_attempts"][0]["outcome"] == "interrupted"
        assert restarted["wall_time_s"] == pytest.approx(status["seconds"])
        restarts.append(restarted)
    # (the tolerance above tells runs apart: another lr moves the predictions by far more)
    gap = np.abs(np.array(restarts[0]["predictions"]["test"]["single_probs"])  # the run at lr 0.01
                 - np.array(fresh["predictions"]["test"]["single_probs"])).max()
    assert gap > 1e-4, gap


def test_a_killed_attempt_counts_until_its_last_write(tmp_path: Path) -> None:
    """An attempt killed outright (SIGKILL: no chance to record its end) is on record as started; the next attempt
    counts its time up to the last write to its run folder."""
    from loradrop.app.sweep import PlannedRun, RunJob
    from loradrop.app.sweep_run import _earlier_attempts

    job = RunJob(PlannedRun("r", "lora", {}, {}), "p", tmp_path / "res", tmp_path / "work")
    staging = tmp_path / "work" / ".r.partial" / "checkpoint-2"
    staging.mkdir(parents=True)
    (staging / "adapter.safetensors").write_bytes(b"x")
    os.utime(staging / "adapter.safetensors", (1000.0 + 42.0, 1000.0 + 42.0))
    for folder in (staging, staging.parent):
        os.utime(folder, (1000.0, 1000.0))
    (tmp_path / "work" / "r.attempts.json").write_text(json.dumps({"settings": {"lr": 1}, "attempts": [
        {"seconds": 5.0, "outcome": "interrupted"}, {"started": 1000.0, "outcome": "started"}]}))
    assert _earlier_attempts(job) == ([{"seconds": 5.0, "outcome": "interrupted"},
                                       {"seconds": 42.0, "outcome": "killed"}], {"lr": 1})


def test_laplace_in_the_worker_keeps_the_folder_only_when_its_fit_fails(data_root: Path, bert_dir: Path,
                                                                        tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`laplace`: right after a `lora` run, its Laplace fit gets the run's result and folder; a failed fit keeps the
    folder for the pass after the sweep, a successful one lets it go (the real fit: test_laplace_sweep.py)."""
    import loradrop.app.sweep_run as sweep_run
    from loradrop.app.sweep import RunJob

    plan = SweepPlan.load(write_plan(tmp_path, str(bert_dir)))
    run = next(r for r in plan.runs() if r.run_id == "rte__lora__lr-0.02_seed-0")
    calls = []

    def fit(job, results, work, *, prior, overrides):
        calls.append((job.run_id, job.source["run_id"], job.run_folder.is_dir(), prior))
        return {"run_id": job.run_id, "status": "failed", "error": "ValueError: no"} if len(calls) == 1 else \
            {"run_id": job.run_id, "status": "ok"}

    monkeypatch.setattr(sweep_run, "score_one", fit)
    for n, expected in ((1, "ValueError: no"), (2, "ok")):
        results, work = tmp_path / f"res{n}", tmp_path / f"work{n}"
        results.mkdir()
        status = sweep_run.execute(RunJob(run, plan.name, results, work, laplace="val_nll"))
        assert status["status"] == "ok" and status["laplace"] == expected
        assert calls[-1] == ("rte__laplace__lr-0.02_seed-0", run.run_id, True, "val_nll")
        assert (work / run.run_id).is_dir() == (expected != "ok")
    assert "laplace" not in sweep_run.execute(RunJob(next(r for r in plan.runs() if r.method == "ld"), plan.name,
                                                     tmp_path / "res1", tmp_path / "work1", laplace="auto"))
