"""Training with samples=N in member chunks: the memory knob equals the one-call step in loss and gradients."""

import pytest
import torch

import loradrop
from loradrop import LoraDropoutConfig

BATCH = {"input_ids": torch.randint(0, 120, (4, 10), generator=torch.Generator().manual_seed(0)),
         "attention_mask": torch.ones(4, 10, dtype=torch.long), "labels": torch.tensor([0, 2, 1, 1])}


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_chunked_backward_equals_one_call(tiny_bert, chunk):
    ref, ours = tiny_bert(), tiny_bert()
    loradrop.apply_lora_dropout(ref, LoraDropoutConfig(p=0.5, samples=4, seed=3))
    loradrop.apply_lora_dropout(ours, LoraDropoutConfig(p=0.5, samples=4, seed=3, member_chunk=chunk))
    ref.train()
    ours.train()
    for _ in range(2):  # two steps: the step counter must advance once per step, not per chunk
        for model in (ref, ours):
            model.zero_grad()
        ref_loss = ref(**BATCH).loss
        ref_loss.backward()
        loss = loradrop.chunked_backward(ours, BATCH)
        torch.testing.assert_close(loss, ref_loss.detach())
        expected = grads(ref)
        got = grads(ours)
        assert got.keys() == expected.keys() and any("lora_A" in n for n in got)
        for name in got:
            torch.testing.assert_close(got[name], expected[name])
    assert loradrop.get_controller(ours).step == loradrop.get_controller(ref).step == 2


def test_member_chunk_validation():
    with pytest.raises(ValueError, match="member_chunk must be None or an integer >= 1, got 0"):
        LoraDropoutConfig(samples=4, member_chunk=0)
    with pytest.raises(ValueError, match="mask_scope='example'"):
        LoraDropoutConfig(samples=1, mask_scope="example", member_chunk=2)
    assert LoraDropoutConfig(samples=5, member_chunk=2).chunks == [(0, 2), (2, 2), (4, 1)]
    assert LoraDropoutConfig(samples=3).chunks == [(0, 3)]


def test_chunked_backward_refuses_eval_mode(tiny_bert):
    model = loradrop.apply_lora_dropout(tiny_bert(), LoraDropoutConfig(p=0.5, samples=2, member_chunk=1, seed=0))
    model.eval()
    with pytest.raises(ValueError, match="call model.train\\(\\) first"):
        loradrop.chunked_backward(model, BATCH)
    assert loradrop.get_controller(model).step == 0  # nothing was consumed


def test_trainer_runs_member_chunks_with_the_same_result(tiny_bert, tmp_path):
    """LoraDropoutTrainer with member_chunk=2 trains to the same weights and losses as the one-call samples=4."""
    from loradrop.training import build_training_args, loss_history, make_trainer

    rows = [{"input_ids": BATCH["input_ids"][i % 4], "attention_mask": BATCH["attention_mask"][i % 4],
             "labels": BATCH["labels"][i % 4]} for i in range(8)]
    results = []
    for chunk in (None, 2):
        model = tiny_bert()
        loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.5, samples=4, seed=1, member_chunk=chunk))
        args = build_training_args(tmp_path / str(chunk), max_steps=3, batch_size=4, logging_steps=1,
                                   progress=False, lr=1e-2)
        trainer = make_trainer(model, args, rows)
        calls: list[int] = []

        def count(mod, args, out, calls=calls):
            calls.append(out.logits.shape[0])

        hook = model.get_base_model().register_forward_hook(count)
        trainer.train()
        hook.remove()
        # one call of 4 members x 4 rows per step, or two calls of 2 members
        assert calls == ([16] * 3 if chunk is None else [8] * 6)
        assert loradrop.get_controller(model).step == 3
        lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        results.append((lora, [e["loss"] for e in loss_history(trainer)["train"]]))
    (ref_params, ref_losses), (params, losses) = results
    assert len(losses) == 3
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    for name in ref_params:
        torch.testing.assert_close(params[name], ref_params[name], rtol=1e-4, atol=1e-6)
