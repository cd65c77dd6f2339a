"""DeepSpeed ZeRO-3 on 2 CPU processes (gloo): LoRA Dropout trains exactly like one process with the global batch
(same masks, same loss), the all-layer precompute steps aside for the partitioned weights, and the layers mask the
weights ZeRO-3 gathered for their forward. Skipped where deepspeed is not installed (it is no dependency of
loradrop; docs/SCALING.md says how it was run here)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("deepspeed", reason="deepspeed is not installed (optional; see docs/SCALING.md)")

from loradrop.distributed import global_member_ids  # noqa: E402
from loradrop.model import get_controller  # noqa: E402
from test_distributed import GLOBAL_BATCH, LOCAL, STEPS, WORLD, build, close, data, free_port  # noqa: E402

CASES = ("batch-s3", "example-s2")


def worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    record: dict[str, torch.Tensor] = {}
    batches = data()
    for case in CASES:
        model = build(case, stream_seed=10 + rank)
        params = [p for p in model.parameters() if p.requires_grad]
        config = {"train_micro_batch_size_per_gpu": LOCAL, "zero_allow_untested_optimizer": True,
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(params, lr=0.5), config=config)
        for step in range(STEPS):
            ids = batches[step][rank * LOCAL:(rank + 1) * LOCAL]
            loss = engine(input_ids=ids, labels=ids).loss
            plan = get_controller(model)._plan
            record[f"{case}/mask/{step}"] = plan.mask.clone()
            record[f"{case}/precomputed/{step}"] = torch.tensor(plan.weights is not None)
            engine.backward(loss)
            engine.step()
            total = loss.detach().clone()
            torch.distributed.all_reduce(total)
            record[f"{case}/loss/{step}"] = total / WORLD
    torch.distributed.destroy_process_group()
    save_file(record, os.path.join(folder, f"zero-rank{rank}.safetensors"))


def test_zero3_k_ranks_equal_one_rank(tmp_path) -> None:
    from test_distributed import train

    single: dict[str, torch.Tensor] = {}
    for case in CASES:
        model = build(case, stream_seed=10)
        train(model, model, slice(None), range(STEPS), single, case)
    torch.multiprocessing.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [load_file(str(tmp_path / f"zero-rank{r}.safetensors")) for r in range(WORLD)]
    assert GLOBAL_BATCH == WORLD * LOCAL
    for case in CASES:
        for step in range(STEPS):
            reference = single[f"{case}/mask/{step}"]
            for rank, record in enumerate(ranks):
                mask = record[f"{case}/mask/{step}"]
                if case.startswith("example"):
                    ids = global_member_ids(2 * LOCAL, 2, rank, WORLD, torch.device("cpu"))
                    assert torch.equal(mask, reference[ids])
                else:
                    assert torch.equal(mask, reference)
                assert not bool(record[f"{case}/precomputed/{step}"])  # partitioned: every layer masks its own
            assert close(ranks[0][f"{case}/loss/{step}"], single[f"{case}/loss/{step}"]), (case, step)
