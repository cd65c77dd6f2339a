"""LoraDropoutTrainer under DeepSpeed (the Trainer's own ``deepspeed=`` TrainingArguments path, ZeRO-2 and ZeRO-3, 2
processes, gloo on CPU): ``samples=3`` in member chunks of one trains exactly like the one-call ``samples=3`` (same
losses, same LoRA weights after the steps, one DeepSpeed optimizer step per Trainer step, same mask stream position),
with and without gradient accumulation.

Why: under DeepSpeed, accelerate's ``backward`` steps the engine whenever ``sync_gradients`` is set, so a Trainer
calling it once per member chunk updated the weights once per chunk (3 engine steps per Trainer step here). The
Trainer now marks only the step's last chunk as the accumulation boundary.

On CPU, accelerate engages DeepSpeed only without ``use_cpu`` (its state.py: ``ACCELERATE_USE_DEEPSPEED ... and not
cpu``); here the state is built with ``use_cpu=False`` and the gloo backend, and the test asserts that DeepSpeed is
engaged (the Trainer's model is a
``DeepSpeedEngine``, accelerate's distributed type is DEEPSPEED, 2 processes). Skipped where deepspeed is not
installed (it is no dependency of loradrop; docs/SCALING.md says how it was run here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("deepspeed", reason="deepspeed is not installed (optional; see docs/SCALING.md)")

from test_distributed import WORLD, close, free_port  # noqa: E402

STEPS, BATCH, SAMPLES = 3, 2, 3
RUNS = {  # run -> (ZeRO stage, gradient accumulation steps, member_chunk)
    "zero3": (3, 1, None),
    "zero3-chunk1": (3, 1, 1),
    "zero3-ga2": (3, 2, None),
    "zero3-ga2-chunk1": (3, 2, 1),
    "zero2": (2, 1, None),
    "zero2-chunk1": (2, 1, 1),
}


def train_one(run: str, folder: Path, record: dict[str, torch.Tensor]) -> None:
    import deepspeed
    from accelerate.state import AcceleratorState, PartialState
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import loradrop
    from loradrop.training import build_training_args, make_trainer

    stage, accumulation, chunk = RUNS[run]
    # a fresh accelerate state per run, for DeepSpeed on gloo: the Trainer's own deepspeed= path would leave the
    # backend unset on a machine without GPUs (accelerate then counts 1 process and does not shard the data)
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState(cpu=False, backend="gloo")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                               target_modules=["q_proj", "v_proj", "up_proj"]))
    loradrop.apply_lora_dropout(model, loradrop.LoraDropoutConfig(p=0.5, samples=SAMPLES, seed=3,
                                                                  member_chunk=chunk))
    rows = STEPS * BATCH * WORLD * accumulation
    ids = torch.randint(0, 64, (rows, 8), generator=torch.Generator().manual_seed(1))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    ds_config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                 "zero_allow_untested_optimizer": True,
                 "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
    args = build_training_args(
        folder / run, max_steps=STEPS, batch_size=BATCH, lr=0.5, logging_steps=1, progress=False,
        extra={"deepspeed": ds_config, "use_cpu": False, "optim": "sgd", "gradient_accumulation_steps": accumulation,
               "lr_scheduler_type": "constant", "accelerator_config": {"use_configured_state": True}})
    for name, p in model.named_parameters():
        if p.requires_grad:
            record[f"{run}/initial/{name}"] = p.detach().clone()
    trainer = make_trainer(model, args, data)
    trainer.train()
    engine = trainer.model_wrapped
    record[f"{run}/engaged"] = torch.tensor([isinstance(engine, deepspeed.DeepSpeedEngine),
                                             str(trainer.accelerator.distributed_type) == "DistributedType.DEEPSPEED",
                                             trainer.accelerator.num_processes == WORLD])
    record[f"{run}/losses"] = torch.tensor([e["loss"] for e in trainer.state.log_history if "loss" in e])
    record[f"{run}/steps"] = torch.tensor([trainer.state.global_step, engine.global_steps])
    controller = loradrop.get_controller(trainer.accelerator.unwrap_model(trainer.model))
    record[f"{run}/stream"] = torch.tensor([controller.seed, controller.step])
    params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in params]):  # ZeRO-3: the full weights (a collective)
        for name, p in params:
            record[f"{run}/weight/{name}"] = p.detach().cpu().clone()
    del trainer, engine, model


def worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu",
                      ACCELERATE_USE_DEEPSPEED="true", HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    record: dict[str, torch.Tensor] = {}
    for run in RUNS:
        train_one(run, Path(folder), record)
    torch.distributed.destroy_process_group()
    save_file(record, os.path.join(folder, f"trainer-rank{rank}.safetensors"))


def test_trainer_member_chunks_under_deepspeed_equal_one_call(tmp_path) -> None:
    torch.multiprocessing.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [load_file(str(tmp_path / f"trainer-rank{r}.safetensors")) for r in range(WORLD)]
    for run, (_, accumulation, chunk) in RUNS.items():
        for record in ranks:
            assert record[f"{run}/engaged"].all(), (run, record[f"{run}/engaged"])  # DeepSpeed really ran
            # one DeepSpeed optimizer step per Trainer step, chunks or not
            assert record[f"{run}/steps"].tolist() == [STEPS, STEPS], run
            assert record[f"{run}/stream"][1] == STEPS * accumulation  # one stream step per micro-batch
        if chunk is None:
            continue
        reference = run.replace("-chunk1", "")
        for record in ranks:
            assert torch.equal(record[f"{run}/stream"], record[f"{reference}/stream"])
            assert close(record[f"{run}/losses"], record[f"{reference}/losses"]), (run, record[f"{run}/losses"])
            weights = [key for key in record if key.startswith(f"{reference}/weight/")]
            assert len(weights) == 2 * 3 * 2  # lora_A and lora_B of q, v and up in 2 layers
            for key in weights:
                assert close(record[key.replace(reference, run, 1)], record[key]), (run, key)
            moved = [key for key in weights if not close(record[key], record[key.replace("/weight/", "/initial/")])]
            assert len(moved) == len(weights)  # the steps did train every LoRA weight
        assert torch.equal(ranks[0][f"{run}/losses"], ranks[1][f"{run}/losses"])
