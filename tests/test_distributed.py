"""Several processes (torch.multiprocessing + gloo on CPU, 2 ranks): k ranks train exactly like one rank with the
global batch, under DDP and FSDP2 (``fully_shard``), for samples=1, samples=N and example scope: the same masks
(batch scope: every rank draws the members the single process draws; example scope: every row draws the mask of its
index in the global batch), the same loss and the same gradients up to reduction order. Checkpoints saved under FSDP2
(gathered PEFT adapter + loradrop_config.json) resume on one rank, and one rank's checkpoint resumes on two FSDP2
ranks, continuing the same mask stream.

One spawn of 2 workers runs every case (process start-up is what costs time here); the single-process references
run in the test process. ``LORADROP_DISTRIBUTED_DEVICE=cuda`` runs the same test on 2 GPUs with NCCL (one per rank;
the single-process reference on GPU 0).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import loradrop
from loradrop import LoraDropoutConfig, apply_lora_dropout
from loradrop.distributed import global_member_ids, is_sharded
from loradrop.distributed_save import save_adapter
from loradrop.model import get_controller

WORLD, GLOBAL_BATCH, SEQ, STEPS, LR = 2, 4, 8, 3, 0.5
DEVICE = os.environ.get("LORADROP_DISTRIBUTED_DEVICE", "cpu")  # "cuda": NCCL on 2 GPUs
LOCAL = GLOBAL_BATCH // WORLD
CASES = {  # name -> LoraDropoutConfig settings (seed=None: drawn per process, then rank 0's is broadcast)
    "batch-s1": dict(samples=1),
    "batch-s3": dict(samples=3),
    "example-s1": dict(mask_scope="example"),
    "example-s2": dict(mask_scope="example", samples=2),
}
RESUME_CASE = "batch-s3"
ENSEMBLE_CASE = "batch-s1"


def ensemble(model, rows: slice) -> torch.Tensor:
    """Member probabilities of a 3-member test-time ensemble on the rows `rows` of a batch (a fixed seed, and one
    chunk: under FSDP every rank must run the same number of forward calls)."""
    ids = data()[0][rows]
    out = loradrop.ensemble_predict(model, {"input_ids": ids}, n=3, chunk_size=3, seed=5)
    return out.member_probs.cpu()


def data() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (STEPS, GLOBAL_BATCH, SEQ), generator=generator)


def device_of(rank: int) -> torch.device:
    return torch.device(f"cuda:{rank}") if DEVICE == "cuda" else torch.device("cpu")


def build(case: str, stream_seed: int, adapter: Path | None = None, rank: int = 0, **settings):
    """The same tiny Llama + LoRA in every process; the mask seed is drawn from torch's generator seeded with
    `stream_seed` (ranks differ on purpose: the broadcast must make them agree). `settings`: LoraDropoutConfig
    fields on top of the case's."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    base = LlamaForCausalLM(config)
    base.to(device_of(rank))
    if adapter is not None:
        return loradrop.from_pretrained(base, adapter, is_trainable=True)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                      target_modules=["q_proj", "v_proj", "up_proj"])
    model = get_peft_model(base, lora)
    torch.manual_seed(stream_seed)
    return apply_lora_dropout(model, LoraDropoutConfig(p=0.5, **{**CASES[case], **settings}))


def full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if is_sharded(tensor) else tensor).detach().cpu().clone()


def train(model, wrapped, rows: slice, steps: range, record: dict[str, torch.Tensor], tag: str) -> None:
    """SGD steps on rows `rows` of each global batch; records loss (mean over ranks), mask, step-0 gradients and the
    final trainable weights under `tag`."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.SGD([p for _, p in params], lr=LR)
    batches = data()
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    for step in steps:
        ids = batches[step][rows].to(model.device)
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        plan = get_controller(model)._plan
        record[f"{tag}/mask/{step}"] = plan.mask.cpu().clone()
        record[f"{tag}/precomputed/{step}"] = torch.tensor(plan.weights is not None)
        if step == steps[0]:
            for name, p in params:
                record[f"{tag}/grad/{name}"] = full(p.grad)
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(total)
        record[f"{tag}/loss/{step}"] = total.cpu() / world
    for name, p in params:
        record[f"{tag}/weight/{name}"] = full(p)
    record[f"{tag}/step"] = torch.tensor(get_controller(model).step)
    record[f"{tag}/seed"] = torch.tensor(get_controller(model).seed)


def shard(model) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if DEVICE == "cuda":
        torch.cuda.set_device(rank)
    torch.distributed.init_process_group("nccl" if DEVICE == "cuda" else "gloo", rank=rank, world_size=WORLD)
    rows, record, out = slice(rank * LOCAL, (rank + 1) * LOCAL), {}, Path(folder)
    try:
        for case in CASES:
            model = build(case, stream_seed=10 + rank, rank=rank)
            record[f"{case}/seed_before"] = torch.tensor(get_controller(model).seed)
            ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if DEVICE == "cuda" else None)
            train(model, ddp, rows, range(STEPS), record, f"{case}/ddp")
            model = build(case, stream_seed=10 + rank, rank=rank)
            shard(model)
            train(model, model, rows, range(STEPS), record, f"{case}/fsdp")
            if case == ENSEMBLE_CASE:
                record["ensemble/fsdp"] = ensemble(model, rows)
        # the whole model as ONE FSDP unit: FSDP gathers it before loradrop's pre-hook, which then precomputes
        model = build(RESUME_CASE, stream_seed=10 + rank, rank=rank)
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        train(model, model, rows, range(STEPS), record, f"{RESUME_CASE}/fsdp-root")
        # a checkpoint under FSDP2 after 2 steps (resumed on one rank by the test), and the test's one-rank
        # checkpoint after 2 steps resumed here on two FSDP2 ranks
        model = build(RESUME_CASE, stream_seed=10 + rank, rank=rank)
        shard(model)
        train(model, model, rows, range(2), record, "save")
        save_adapter(model, out / "fsdp-checkpoint")
        model = build(RESUME_CASE, stream_seed=10 + rank, adapter=out / "single-checkpoint", rank=rank)
        shard(model)
        train(model, model, rows, range(2, STEPS), record, "resumed-on-2")
    finally:
        torch.distributed.destroy_process_group()
    save_file({k: v.contiguous() for k, v in record.items()}, str(out / f"rank{rank}.safetensors"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, list[dict], Path]:
    if DEVICE == "cuda" and torch.cuda.device_count() < WORLD:
        pytest.skip(f"LORADROP_DISTRIBUTED_DEVICE=cuda needs {WORLD} GPUs, found {torch.cuda.device_count()}")
    folder = tmp_path_factory.mktemp("distributed")
    single: dict[str, torch.Tensor] = {}
    for case in CASES:
        model = build(case, stream_seed=10)
        train(model, model, slice(None), range(STEPS), single, f"{case}/single")
        if case == ENSEMBLE_CASE:
            single["ensemble/single"] = ensemble(model, slice(None))
    model = build(RESUME_CASE, stream_seed=10)
    train(model, model, slice(None), range(2), single, "single-save")
    model.save_pretrained(str(folder / "single-checkpoint"))
    torch.multiprocessing.spawn(worker, args=(free_port(), str(folder)), nprocs=WORLD, join=True)
    ranks = [load_file(str(folder / f"rank{r}.safetensors")) for r in range(WORLD)]
    return single, ranks, folder


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-6)  # reduction order only


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("case", list(CASES))
def test_k_ranks_equal_one_rank_with_the_global_batch(runs, case: str, mode: str) -> None:
    single, ranks, _ = runs
    samples = CASES[case].get("samples", 1)
    # the seeds drawn per process differed: only the broadcast of rank 0's stream makes the ranks agree
    assert int(ranks[0][f"{case}/seed_before"]) != int(ranks[1][f"{case}/seed_before"])
    for step in range(STEPS):
        reference = single[f"{case}/single/mask/{step}"]
        for rank, record in enumerate(ranks):
            mask = record[f"{case}/{mode}/mask/{step}"]
            if "example" in case:  # row m*b + i of rank r is row m*k*b + r*b + i of the global call
                ids = global_member_ids(samples * LOCAL, samples, rank, WORLD, torch.device("cpu"))
                assert torch.equal(mask, reference[ids])
            else:  # every rank draws the single process's members
                assert mask.shape[0] == samples and torch.equal(mask, reference)
            # FSDP2: the pre-hook saw DTensor shards, so every layer masked its own (gathered) weights
            assert bool(record[f"{case}/{mode}/precomputed/{step}"]) is (mode == "ddp")
        assert reference.shape[0] == 1 or (reference[0] != reference[-1]).any()  # members / rows really differ
        assert close(ranks[0][f"{case}/{mode}/loss/{step}"], single[f"{case}/single/loss/{step}"])
    grads = [k.split("/grad/")[1] for k in single if k.startswith(f"{case}/single/grad/")]
    assert len(grads) == 12  # A and B of 3 projections in 2 layers
    for name in grads:
        for record in ranks:
            assert close(record[f"{case}/{mode}/grad/{name}"], single[f"{case}/single/grad/{name}"]), name
            assert close(record[f"{case}/{mode}/weight/{name}"], single[f"{case}/single/weight/{name}"]), name


def test_example_scope_ranks_draw_different_masks(runs) -> None:
    _, ranks, _ = runs
    assert not torch.equal(ranks[0]["example-s1/ddp/mask/0"], ranks[1]["example-s1/ddp/mask/0"])


def test_fsdp_checkpoint_is_a_gathered_peft_adapter_and_resumes_on_another_rank_count(runs) -> None:
    single, ranks, folder = runs
    saved = folder / "fsdp-checkpoint"
    weights = load_file(str(saved / "adapter_model.safetensors"))
    assert len(weights) == 12 and all(not is_sharded(w) for w in weights.values())
    for name, value in weights.items():  # full (gathered) tensors equal the single-rank run's after 2 steps
        key = name.replace(".weight", ".default.weight")
        assert close(value, single[f"single-save/weight/{key}"]), name
    assert json.loads((saved / "adapter_config.json").read_text())["peft_type"] == "LORA"
    state = json.loads((saved / "loradrop_config.json").read_text())["mask_state"]
    assert state == {"seed": int(single["single-save/seed"]), "step": 2, "ensemble_calls": 0}
    # resume the 2-rank FSDP2 checkpoint on one rank: step 3 equals the uninterrupted run's step 3
    resumed: dict[str, torch.Tensor] = {}
    model = build(RESUME_CASE, stream_seed=99, adapter=saved)
    train(model, model, slice(None), range(2, STEPS), resumed, "r")
    assert torch.equal(resumed["r/mask/2"], single[f"{RESUME_CASE}/single/mask/2"])
    assert close(resumed["r/loss/2"], single[f"{RESUME_CASE}/single/loss/2"])
    # and the one-rank checkpoint resumed on two FSDP2 ranks
    for record in ranks:
        assert torch.equal(record["resumed-on-2/mask/2"], single[f"{RESUME_CASE}/single/mask/2"])
        assert int(record["resumed-on-2/step"]) == STEPS
    assert close(ranks[0]["resumed-on-2/loss/2"], single[f"{RESUME_CASE}/single/loss/2"])
    for name in [k.split("/weight/")[1] for k in resumed if "/weight/" in k]:
        final = single[f"{RESUME_CASE}/single/weight/{name}"]
        assert close(resumed[f"r/weight/{name}"], final) and close(ranks[1][f"resumed-on-2/weight/{name}"], final)


def test_ensemble_under_fsdp_equals_one_rank(runs) -> None:
    single, ranks, _ = runs
    reference = single["ensemble/single"]  # (members, global batch, seq, vocab)
    assert reference.shape[:2] == (3, GLOBAL_BATCH) and not torch.allclose(reference[0], reference[1])
    for rank, record in enumerate(ranks):
        assert close(record["ensemble/fsdp"], reference[:, rank * LOCAL:(rank + 1) * LOCAL])


def test_one_fsdp_unit_precomputes_on_the_gathered_weights(runs) -> None:
    single, ranks, _ = runs
    tag, ref = f"{RESUME_CASE}/fsdp-root", f"{RESUME_CASE}/single"
    for step in range(STEPS):
        assert all(bool(record[f"{tag}/precomputed/{step}"]) for record in ranks)
        assert all(torch.equal(record[f"{tag}/mask/{step}"], single[f"{ref}/mask/{step}"]) for record in ranks)
        assert close(ranks[0][f"{tag}/loss/{step}"], single[f"{ref}/loss/{step}"])
    for name in [k.split("/weight/")[1] for k in single if k.startswith(f"{ref}/weight/")]:
        assert close(ranks[1][f"{tag}/weight/{name}"], single[f"{ref}/weight/{name}"]), name
