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


# ------------------------------------------------------------------------------------------------ non-finite steps
def diverging_trainer(tiny_bert, tmp_path, **kwargs):
    """lr=1e30: Adam moves every LoRA weight by ~1e30 in step 1, so step 2's activations overflow (NaN loss)."""
    from loradrop.training import build_training_args, make_trainer

    rows = [{"input_ids": BATCH["input_ids"][i % 4], "attention_mask": BATCH["attention_mask"][i % 4],
             "labels": BATCH["labels"][i % 4]} for i in range(8)]
    model = loradrop.apply_lora_dropout(tiny_bert(), LoraDropoutConfig(p=0.5, samples=2, seed=1))
    args = build_training_args(tmp_path, max_steps=4, batch_size=2, logging_steps=1, progress=False, lr=1e30)
    return model, make_trainer(model, args, rows, **kwargs)


def lora_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_nonfinite_loss_stops_training_with_a_clear_error(tiny_bert, tmp_path):
    from loradrop.errors import LoradropError, TrainingDivergedError

    model, trainer = diverging_trainer(tiny_bert, tmp_path)
    with pytest.raises(TrainingDivergedError) as err:
        trainer.train()
    assert str(err.value) == (
        "training diverged at step 2: the loss is nan (not finite). The likely cause is a learning rate too high for "
        "this model (learning_rate=1e+30, 7.5e+29 at this step): lower it, or warm it up; or pass "
        "skip_nonfinite_steps=True to skip such steps")
    assert isinstance(err.value, LoradropError) and isinstance(err.value, RuntimeError)
    assert trainer.state.global_step == 1  # step 2's update never happened


def test_skip_nonfinite_steps_skips_and_counts_them(tiny_bert, tmp_path, caplog):
    model, trainer = diverging_trainer(tiny_bert, tmp_path, skip_nonfinite_steps=True)
    after_first: dict = {}

    from transformers import TrainerCallback

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                after_first.update(lora_weights(model))

    trainer.add_callback(Snapshot())
    with caplog.at_level("WARNING", logger="loradrop"):
        trainer.train()
    assert trainer.state.global_step == 4 and trainer.nonfinite_steps == [2, 3, 4]
    final = lora_weights(model)
    assert all(torch.isfinite(w).all() for w in final.values())
    for name, weight in after_first.items():  # skipped steps changed no weight (nor Adam's state)
        assert torch.equal(final[name], weight), name
    assert "loradrop: step 2: the loss is nan (not finite); its update is skipped (1 step(s) skipped so far)" in (
        caplog.text)
    logged = [e for e in trainer.state.log_history if "nonfinite_steps_skipped" in e]
    assert logged and logged[-1]["nonfinite_steps_skipped"] == 3


def test_nonfinite_gradient_with_a_finite_loss_is_caught(tiny_bert, tmp_path):
    from loradrop.errors import TrainingDivergedError
    from loradrop.training import build_training_args, make_trainer

    rows = [{"input_ids": BATCH["input_ids"][i], "attention_mask": BATCH["attention_mask"][i],
             "labels": BATCH["labels"][i]} for i in range(4)]
    model = loradrop.apply_lora_dropout(tiny_bert(), LoraDropoutConfig(p=0.5, seed=1))
    weight = next(p for n, p in model.named_parameters() if "lora_A" in n)
    weight.register_hook(lambda grad: grad * float("inf"))
    args = build_training_args(tmp_path, max_steps=1, batch_size=4, progress=False, lr=1e-3)
    with pytest.raises(TrainingDivergedError, match=r"training diverged at step 1: the gradient norm is (nan|inf) "
                                                    r"\(not finite\) while the loss is \d+\.\d+\. ") as err:
        make_trainer(model, args, rows).train()
    assert "attention" not in str(err.value)  # full precision: no hint at the attention kernel


def test_a_nonfinite_gradient_in_bf16_with_sdpa_names_the_attention_kernel(tiny_bert, tmp_path):
    from loradrop.errors import TrainingDivergedError
    from loradrop.training import build_training_args, make_trainer

    rows = [{"input_ids": BATCH["input_ids"][i], "attention_mask": BATCH["attention_mask"][i],
             "labels": BATCH["labels"][i]} for i in range(4)]
    model = loradrop.apply_lora_dropout(tiny_bert(), LoraDropoutConfig(p=0.5, seed=1))
    assert model.config._attn_implementation == "sdpa"
    weight = next(p for n, p in model.named_parameters() if "lora_A" in n)
    weight.register_hook(lambda grad: grad * float("inf"))
    args = build_training_args(tmp_path, max_steps=1, batch_size=4, progress=False, lr=1e-3, extra={"bf16": True})
    with pytest.raises(TrainingDivergedError, match=r"try attn_implementation='eager' \(--attn-implementation eager\)"
                                                    r" or full precision$"):
        make_trainer(model, args, rows).train()


def test_member_chunks_under_deepspeed_refuse_an_accelerate_that_would_step_per_chunk(monkeypatch) -> None:
    """accelerate versions whose DeepSpeedEngineWrapper.backward has no `sync_gradients` step the engine after every
    backward: member chunks would then update the weights once per chunk, so they are refused in one line."""
    from accelerate.utils import deepspeed as accelerate_deepspeed

    from loradrop.errors import UsageError
    from loradrop.training import _require_deepspeed_sync_flag

    _require_deepspeed_sync_flag()  # the installed accelerate takes the flag

    def old_backward(self, loss, **kwargs):  # the signature before the flag existed
        return None

    monkeypatch.setattr(accelerate_deepspeed.DeepSpeedEngineWrapper, "backward", old_backward)
    with pytest.raises(UsageError, match=r"^member_chunk under DeepSpeed needs an accelerate whose "
                                         r"DeepSpeedEngineWrapper\.backward takes sync_gradients"):
        _require_deepspeed_sync_flag()
