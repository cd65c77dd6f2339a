"""``loradrop eval`` as a Python function: reload a run's adapter on its base model, evaluate the single pass and the
ensemble again, and write ``eval_metrics.json`` and ``eval_predictions.jsonl``."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch

from ..config import CONFIG_FILE_NAME
from ..errors import ModelLoadError, UsageError
from .acting import ood_names, prepare_ood, uncertainty_section
from .integrity import verify_manifest
from .outputs import data_caveats, print_metrics, write_run_outputs
from .provenance import autocast_label, hardware, jsonable, versions
from .runfolder import (
    ADAPTER_DIR,
    EVAL_METRICS_FILE,
    METRICS_FILE,
    RUN_CONFIG_FILE,
    read_json,
    write_json,
    write_jsonl,
)
from .settings import EvalSettings, ood_task_choices
from .train_run import RunResult


def eval_device() -> torch.device:
    """Where `evaluate` runs the model: the first visible CUDA GPU when there is one (a sweep worker's
    ``CUDA_VISIBLE_DEVICES`` names its own), else the CPU. A model left where it was loaded stays on the CPU: every
    ``loradrop eval`` and Laplace-LoRA fit of a GPU sweep then runs on one CPU core."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def find_run(adapter: Path) -> tuple[Path, Path, dict[str, Any] | None]:
    """(adapter folder, run folder, the run's metrics) for an adapter folder or a run folder."""
    if not adapter.exists():
        raise UsageError(f"--adapter {str(adapter)!r} does not exist")
    if (adapter / ADAPTER_DIR / "adapter_config.json").is_file():
        adapter_dir, run_dir = adapter / ADAPTER_DIR, adapter
    elif (adapter / "adapter_config.json").is_file():
        adapter_dir, run_dir = adapter, adapter.parent
    else:
        raise UsageError(f"--adapter {str(adapter)!r} holds no adapter_config.json (nor {ADAPTER_DIR}/ of a run)")
    for candidate in (run_dir / METRICS_FILE, adapter_dir / METRICS_FILE):
        if candidate.is_file():
            return adapter_dir, run_dir, read_json(candidate)
    if (run_dir / RUN_CONFIG_FILE).is_file():  # a trained run whose evaluation failed: its settings are here
        stored = read_json(run_dir / RUN_CONFIG_FILE)
        args = stored.get("args", {})
        return adapter_dir, run_dir, {"task": args.get("task"), "model": stored.get("model"),
                                      "config": {"args": args, "eval_batch_size": args.get("batch_size", 32)}}
    return adapter_dir, run_dir, None


def check_adapter(adapter_dir: Path) -> Path:
    """The adapter's weights file, after checking it exists and matches the folder's manifest (if any)."""
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        found = sorted(p.name for p in adapter_dir.iterdir())
        raise UsageError(f"{str(adapter_dir)!r} has no adapter_model.safetensors (found {found}); loradrop loads "
                         "adapter weights only from safetensors files")
    verify_manifest(adapter_dir)
    return weights


def load_adapter(base: Any, adapter_dir: Path, model_name: str, has_loradrop: bool) -> Any:
    """The adapter on its base model, checked first (manifest, weights file); a damaged file or an adapter made for
    another base model is one clear error naming the folder."""
    from peft import PeftModel
    from safetensors import SafetensorError

    from ..model import from_pretrained

    weights = check_adapter(adapter_dir)
    try:
        if has_loradrop:
            return from_pretrained(base, adapter_dir)
        return PeftModel.from_pretrained(base, str(adapter_dir))
    except SafetensorError as err:
        raise ModelLoadError(f"{str(weights)!r} is not a readable safetensors file ({err}); it is truncated or "
                             "damaged: restore it or train again") from err
    except RuntimeError as err:
        if "size mismatch" not in str(err):
            raise
        lines = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        raise ModelLoadError(f"the adapter in {str(adapter_dir)!r} does not fit model {model_name!r} ("
                             f"{lines[0] if lines else 'weight shapes differ'}); pass the --model it was trained "
                             "on") from err


def evaluate(settings: EvalSettings) -> RunResult:
    """Evaluate a saved adapter as `settings` describe; unset values come from the run that trained it."""
    from ..pretrained import check_model_fits, load_model, load_tokenizer, model_id, prepare_base
    from ..tasks import prepare_task, resolve_task
    from ..tasks.cloze_scoring import with_choice_scoring

    adapter_dir, run_dir, run = find_run(Path(settings.adapter).expanduser())
    check_adapter(adapter_dir)  # before any model is loaded
    run_args = (run or {}).get("config", {}).get("args", {})
    task = settings.task or (run or {}).get("task")
    if task is None:
        raise UsageError(f"no {METRICS_FILE} next to {str(adapter_dir)!r}; pass --task and --model")
    model_name = settings.model or (run or {}).get("model")
    if model_name is None:
        raise UsageError(f"no {METRICS_FILE} next to {str(adapter_dir)!r} records the base model; pass --model")
    same_task = run is not None and task == run.get("task")
    data_dir = settings.data_dir if settings.data_dir is not None else (run_args.get("data_dir") if same_task else None)
    seed = settings.seed if settings.seed is not None else int(run_args.get("seed", 0))
    data_seed = int(run_args.get("seed", seed)) if same_task else seed  # the run's splits, never its train rows
    max_seq_len = settings.max_seq_len or int(run_args.get("max_seq_len", 128))
    max_eval = settings.max_eval_samples if settings.max_eval_samples is not None else (
        run_args.get("max_eval_samples") if same_task else None)
    batch_size = settings.batch_size or int((run or {}).get("config", {}).get("eval_batch_size", 32))
    choice_scoring = settings.choice_scoring or run_args.get("choice_scoring")  # as the run was trained
    spec = with_choice_scoring(resolve_task(task, data_dir), choice_scoring)
    check_model_fits(model_name, spec.kind)
    acting = settings.ood_task is not None or settings.conformal_alpha is not None
    if acting and not spec.classifies:
        raise UsageError(f"--ood-task and --conformal-alpha need a task that predicts classes; {task} is {spec.kind}")
    allowed = ood_task_choices(spec.name)
    misfit = [name for name in ood_names(settings.ood_task) if name not in allowed]
    if misfit:
        raise UsageError(f"--ood-task {','.join(misfit)}: a {spec.name} model scores as out-of-distribution sets "
                         f"only {allowed}")
    # conformal sets are calibrated on the run's validation split when it carved one out of train (holdout)
    laplace = settings.laplace is not None  # the Laplace-LoRA baseline fits on train, tunes on a held-out split
    holdout = run_args.get("holdout_fraction") if same_task and (settings.conformal_alpha is not None
                                                                 or laplace) else None
    has_loradrop = (adapter_dir / CONFIG_FILE_NAME).is_file()
    if laplace:
        from .laplace_baseline import check_request, evaluate_laplace

        check_request(settings.laplace, spec, has_loradrop=has_loradrop, ood=settings.ood_task is not None,
                      conformal=settings.conformal_alpha is not None)
    ensemble = settings.ensemble if has_loradrop else 0

    tokenizer = load_tokenizer(model_name)
    data = prepare_task(spec, data_dir, tokenizer, max_seq_len=max_seq_len, seed=data_seed,
                        max_eval_samples=max_eval, need_train=laplace, holdout_fraction=holdout,
                        max_train_samples=run_args.get("max_train_samples") if holdout or laplace else None)
    for caveat in data_caveats(data.metadata):  # once, before the evaluation starts (as train does)
        print(f"data caveat: {caveat}", flush=True)
    ood_data = prepare_ood(settings.ood_task, settings.data_dir, tokenizer, max_seq_len=max_seq_len, seed=seed,
                           max_eval_samples=max_eval, choice_scoring=choice_scoring)
    torch.manual_seed(seed)
    attn_implementation = settings.attn_implementation or run_args.get("attn_implementation")
    base = prepare_base(load_model(model_name, spec.kind, num_labels=spec.num_labels or None,
                                   attn_implementation=attn_implementation), tokenizer)
    model = load_adapter(base, adapter_dir, model_name, has_loradrop)
    device = eval_device()
    model.to(device).eval()  # training runs on the GPU through the Trainer; evaluation must move it itself
    autocast = training_autocast(run_args)
    as_trained = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    start = time.perf_counter()
    score_ood_set = None  # OOD sets are scored by the Laplace predictive too under --laplace
    if laplace:
        from .laplace_baseline import score_laplace

        result, laplace_section, fit = evaluate_laplace(model, data, prior=settings.laplace, batch_size=batch_size,
                                                        seed=seed, map_autocast=autocast)  # (fit in float32)

        def score_ood_set(ood: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
            scored = score_laplace(fit, ood, batch_size=batch_size, seed=seed)
            return scored.rows, {"single": scored.single, "ensemble": scored.ensemble}
    else:
        with as_trained:
            result = spec.evaluate(model, data, tokenizer, batch_size=batch_size, ensemble=ensemble,
                                   chunk_size=settings.chunk_size, seed=seed)
    eval_s = time.perf_counter() - start
    out_dir = Path(settings.output).expanduser() if settings.output else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "eval_predictions.jsonl", result.rows)
    metrics = {
        "task": task, "registry_task": spec.name, "kind": spec.kind, "model": model_id(model_name),
        "adapter": str(adapter_dir.resolve()), "seed": seed,
        "config": {"args": settings.to_dict(), "ensemble": ensemble, "batch_size": batch_size,
                   "max_seq_len": max_seq_len, "max_eval_samples": max_eval, "data_seed": data_seed,
                   "data_dir": data_dir,
                   "autocast": autocast_label(autocast, device.type)},
        "versions": versions(), "hardware": hardware(), "wall_time": {"eval_s": eval_s}, "data": data.metadata,
        "eval_split": data.eval_split,
        "eval": {"single": result.single, "ensemble": result.ensemble},
        "files": {"predictions": "eval_predictions.jsonl"},
    }
    if laplace:
        metrics["laplace"] = laplace_section
    if acting:
        with contextlib.nullcontext() if laplace else as_trained:  # (Laplace scores its OOD sets itself)
            metrics["uncertainty"] = _act_on_uncertainty(
                settings, model, data, ood_data, result.rows, out_dir, tokenizer=tokenizer, batch_size=batch_size,
                ensemble=ensemble, seed=seed, holdout=holdout, max_seq_len=max_seq_len, score=score_ood_set)
        if ood_data is not None:
            metrics["files"]["ood_predictions"] = metrics["uncertainty"]["ood"]["predictions"]
    write_json(out_dir / EVAL_METRICS_FILE, metrics)
    written = write_run_outputs(out_dir, jsonable(metrics), predictions="eval_predictions.jsonl", history=None,
                                masked=has_loradrop, prefix="eval_", title=f"loradrop eval: {task}")
    print_metrics(spec.name, data.eval_split, result.single, result.ensemble)
    section = metrics.get("uncertainty") or {}
    parts = (section.get("selective"), *section.get("ood_sets", []))
    written += [part["plot"] for part in parts if part and "plot" in part]
    print(f"wrote {out_dir / EVAL_METRICS_FILE}, {', '.join(written)}", flush=True)
    return RunResult(out_dir, out_dir / EVAL_METRICS_FILE, jsonable(metrics))


def training_autocast(run_args: dict[str, Any]) -> torch.dtype | None:
    """The autocast dtype under which a trained run's own evaluation scored it: the Trainer's mixed precision
    (accelerate) leaves the trained model's forward under autocast, so with ``bf16`` (``fp16``) the numbers `train`
    reports come from bfloat16 (float16) autocast, and `evaluate` scores the same way to reproduce them (on the same
    kind of device: CPU autocast keeps softmax in the low precision, where CUDA's runs it in float32); None for a
    full-precision run (or one whose settings are unknown)."""
    return torch.bfloat16 if run_args.get("bf16") else torch.float16 if run_args.get("fp16") else None


def _act_on_uncertainty(settings: EvalSettings, model: Any, data: Any, ood_data: Any, rows: list[dict[str, Any]],
                        out_dir: Path, *, tokenizer: Any, batch_size: int, ensemble: int, seed: int,
                        holdout: float | None, max_seq_len: int, score: Any = None) -> dict[str, Any]:
    """The ``uncertainty`` section (`loradrop.app.acting.uncertainty_section`); with --conformal-alpha on a run that
    carved a validation split out of train, that split is scored again to calibrate the conformal sets (its rows in
    ``eval_calibration_predictions.jsonl``)."""
    calibration_rows = None
    if settings.conformal_alpha is not None and holdout and "validation" in data.raw:
        from datasets import DatasetDict

        encoded = data.spec.preprocessor(data.spec, DatasetDict({"validation": data.raw["validation"]}),
                                         tokenizer, max_seq_len)
        data.extras["encoded"]["validation"] = encoded["validation"]
        calibration_rows = data.spec.evaluate(model, data, tokenizer, batch_size=batch_size, ensemble=ensemble,
                                              chunk_size=settings.chunk_size, seed=seed, split="validation").rows
        write_jsonl(out_dir / "eval_calibration_predictions.jsonl", calibration_rows)
    section = uncertainty_section(model, rows, out_dir, ood_data=ood_data, ood_task=settings.ood_task,
                                  alpha=settings.conformal_alpha, calibration_rows=calibration_rows,
                                  batch_size=batch_size, ensemble=ensemble, chunk_size=settings.chunk_size, seed=seed,
                                  score=score)
    if calibration_rows:
        section["conformal"]["calibration"]["predictions"] = "eval_calibration_predictions.jsonl"
    return section
