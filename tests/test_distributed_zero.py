"""DeepSpeed ZeRO-3 on 2 processes (gloo on CPU; ``LORADROP_DISTRIBUTED_DEVICE=cuda``: NCCL on 2 GPUs, one per rank,
the single-process reference on GPU 0): LoRA Dropout trains exactly like one process with the global batch (same
masks, same loss), the all-layer precompute steps aside for the partitioned weights, and the layers mask the weights
ZeRO-3 gathered for their forward. samples=3 in member chunks of one (benchmarks/sharded_step.py's DeepSpeed step:
``engine.backward`` per chunk, one ``engine.step``) trains like the one-call step. Skipped where deepspeed is not
installed (it is no dependency of loradrop; docs/SCALING.md says how it was run here)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("deepspeed", reason="deepspeed is not installed (optional; see docs/SCALING.md)")

from loradrop.distributed import global_member_ids  # noqa: E402
from loradrop.model import get_controller  # noqa: E402
from test_distributed import (  # noqa: E402
    DEVICE,
    GLOBAL_BATCH,
    LOCAL,
    STEPS,
    WORLD,
    build,
    close,
    data,
    device_of,
    free_port,
)

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "sharded_step.py"
RUNS = {  # run -> (test_distributed case, extra LoraDropoutConfig settings)
    "batch-s3": ("batch-s3", {}),
    "example-s2": ("example-s2", {}),
    "batch-s3-chunk1": ("batch-s3", {"member_chunk": 1}),
}


def chunked_step():
    spec = importlib.util.spec_from_file_location("sharded_step", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.deepspeed_chunked_step


def worker(rank: int, port: int, folder: str) -> None:
    cuda = DEVICE == "cuda"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cuda" if cuda else "cpu")
    torch.set_num_threads(1)
    if cuda:
        torch.cuda.set_device(rank)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    step_in_chunks = chunked_step()
    record: dict[str, torch.Tensor] = {}
    batches = data()
    for run, (case, settings) in RUNS.items():
        model = build(case, stream_seed=10 + rank, rank=rank, **settings)
        params = [p for p in model.parameters() if p.requires_grad]
        config = {"train_micro_batch_size_per_gpu": LOCAL, "zero_allow_untested_optimizer": True,
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(params, lr=0.5), config=config)
        for step in range(STEPS):
            ids = batches[step][rank * LOCAL:(rank + 1) * LOCAL].to(device_of(rank))
            if settings.get("member_chunk"):
                loss = step_in_chunks(engine, {"input_ids": ids, "labels": ids})
                plan = get_controller(model)._plan  # the last chunk's
            else:
                loss = engine(input_ids=ids, labels=ids).loss
                plan = get_controller(model)._plan
                engine.backward(loss)
                engine.step()
            record[f"{run}/mask/{step}"] = plan.mask.cpu().clone()
            record[f"{run}/precomputed/{step}"] = torch.tensor(plan.weights is not None)
            total = loss.detach().clone()
            torch.distributed.all_reduce(total)
            record[f"{run}/loss/{step}"] = total.cpu() / WORLD
            record[f"{run}/step/{step}"] = torch.tensor(get_controller(model).step)
    torch.distributed.destroy_process_group()
    save_file(record, os.path.join(folder, f"zero-rank{rank}.safetensors"))


def test_zero3_k_ranks_equal_one_rank(tmp_path) -> None:
    from test_distributed import train

    if DEVICE == "cuda" and torch.cuda.device_count() < WORLD:
        pytest.skip(f"LORADROP_DISTRIBUTED_DEVICE=cuda needs {WORLD} GPUs, found {torch.cuda.device_count()}")
    single: dict[str, torch.Tensor] = {}
    for case in sorted({case for case, _ in RUNS.values()}):
        model = build(case, stream_seed=10)
        train(model, model, slice(None), range(STEPS), single, case)
    torch.multiprocessing.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [load_file(str(tmp_path / f"zero-rank{r}.safetensors")) for r in range(WORLD)]
    assert GLOBAL_BATCH == WORLD * LOCAL
    for run, (case, settings) in RUNS.items():
        for step in range(STEPS):
            reference = single[f"{case}/mask/{step}"]
            for rank, record in enumerate(ranks):
                mask = record[f"{run}/mask/{step}"]
                if case.startswith("example"):
                    ids = global_member_ids(2 * LOCAL, 2, rank, WORLD, torch.device("cpu"))
                    assert torch.equal(mask, reference[ids])
                elif settings.get("member_chunk"):  # the last chunk ran the step's last member
                    assert torch.equal(mask, reference[-1:])
                else:
                    assert torch.equal(mask, reference)
                assert not bool(record[f"{run}/precomputed/{step}"])  # partitioned: every layer masks its own
                assert int(record[f"{run}/step/{step}"]) == step + 1  # one stream step per optimizer step
            assert close(ranks[0][f"{run}/loss/{step}"], single[f"{case}/loss/{step}"]), (run, step)
