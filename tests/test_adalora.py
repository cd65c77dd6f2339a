"""LoRA Dropout on PEFT AdaLoRA (SVDLinear) and the AdaLoRA rank-allocation driver (callback, step, schedule).

Mask semantics, p = 0 parity, gradients, samples and save/load of the SVDLinear handler are in test_matrix.py (one
row of its handler table); this file covers what is AdaLoRA-specific."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

import loradrop
from loradrop import LoraDropoutConfig
from loradrop.adalora import (
    AdaLoraCallback,
    adalora_schedule,
    adalora_step,
    adalora_tuner,
    effective_ranks,
    validate_adalora_config,
)

BATCH = {"input_ids": torch.randint(0, 120, (5, 9), generator=torch.Generator().manual_seed(0)),
         "labels": torch.tensor([0, 1, 2, 1, 0])}
SCHEDULE = dict(init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=1, total_step=12)


def bert_config() -> BertConfig:
    return BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)


def randomise_lambda(model: nn.Module) -> None:
    """PEFT initialises Λ (lora_E) to zero, which would make every update (and A/B gradient) zero; P and Q are
    scaled up too, so that masks visibly change the outputs."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_E" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
            elif "lora_A" in name or "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))


@pytest.fixture(scope="module")
def bert_base():
    torch.manual_seed(0)
    return BertForSequenceClassification(bert_config())


@pytest.fixture
def ada_bert(bert_base):
    """Factory: a tiny BERT classifier with AdaLoRA on query/value (4 adapted matrices) and non-zero Λ."""

    def make(**overrides) -> PeftModel:
        kwargs = dict(task_type="SEQ_CLS", target_modules=["query", "value"], lora_alpha=8, lora_dropout=0.0,
                      **SCHEDULE)
        kwargs.update(overrides)
        torch.manual_seed(1)
        model = get_peft_model(copy.deepcopy(bert_base), AdaLoraConfig(**kwargs))
        randomise_lambda(model)
        return model

    return make


class OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(24, 20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def one_layer(p: float = 0.5, **cfg):
    """One AdaLoRA SVDLinear(24 -> 20), r=4, with LoRA Dropout applied; returns (model, layer, controller)."""
    torch.manual_seed(0)
    model = get_peft_model(OneLinear(), AdaLoraConfig(target_modules=["proj"], init_r=4, target_r=2, total_step=10,
                                                      lora_alpha=8, lora_dropout=0.0))
    randomise_lambda(model)
    loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=p, seed=3, **cfg))
    return model, model.base_model.model.proj, loradrop.get_controller(model)


def plain_delta(layer, x: torch.Tensor) -> torch.Tensor:
    """Plain AdaLoRA's update of `x`: P diag(Λ) Q x * s / ranknum."""
    a, b, e = layer.lora_A["default"], layer.lora_B["default"], layer.lora_E["default"]
    return (x @ (a * e).T @ b.T) * layer.scaling["default"] / (layer.ranknum["default"] + 1e-5)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ================================================================================================ parity
def test_p0_parity_on_llama():
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    ref = get_peft_model(base, AdaLoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "up_proj"],
                                             lora_dropout=0.0, **SCHEDULE))
    randomise_lambda(ref)
    ours = copy.deepcopy(ref)
    loradrop.apply_lora_dropout(ours, LoraDropoutConfig(p=0.0, seed=1))
    ids = torch.randint(0, 96, (3, 7), generator=torch.Generator().manual_seed(2))
    losses = []
    for model in (ref, ours):
        model.train()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        losses.append(out.loss)
    assert torch.equal(*losses)
    g_ref, g_ours = grads(ref), grads(ours)
    assert len(g_ref) > 0 and all(torch.equal(g_ref[n], g_ours[n]) for n in g_ref)


# ========================================================================================= ensembles, eval, merge
def test_ensemble_members_follow_the_plan(ada_bert):
    model = ada_bert()
    loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.5, seed=2))
    whole = loradrop.ensemble_predict(model, BATCH, n=4, seed=9)
    chunked = loradrop.ensemble_predict(model, BATCH, n=4, seed=9, chunk_size=3)
    torch.testing.assert_close(whole.member_probs, chunked.member_probs)
    assert not torch.allclose(whole.member_probs[0], whole.member_probs[1])


# (every strategy's expected update without rescaling is checked in test_matrix.py)
@pytest.mark.parametrize(("strategy", "rescale", "mode", "factor"), [
    ("ab", True, "expected", 1.0), ("ab", False, "raw", 1.0), ("rank", False, "raw", 1.0),
])
def test_eval_with_rescaling_or_raw_mode_uses_the_full_update(strategy, rescale, mode, factor):
    model, layer, _ = one_layer(p=0.5, strategy=strategy, rescale=rescale, eval_mode=mode)
    model.eval()
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(layer(x) - layer.base_layer(x), plain_delta(layer, x) * factor)


def test_merge_folds_the_expected_update_and_unmerge_restores():
    model, layer, ctl = one_layer(p=0.5)
    model.eval()
    x = torch.randn(2, 5, 24)
    expected = model(x)
    weight = layer.base_layer.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(model(x), expected)
    loradrop.set_eval_mode(model, "raw")  # a mode change while merged must not change what unmerge removes
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, weight)
    # Removing LoRA Dropout from a merged layer leaves plain AdaLoRA's merged weight W + dW.
    loradrop.set_eval_mode(model, "expected")
    layer.merge()
    loradrop.remove_lora_dropout(model)
    assert "forward" not in layer.__dict__
    torch.testing.assert_close(layer.base_layer.weight, weight + layer.get_delta_weight("default"))
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, weight)


def test_remove_and_deepcopy(ada_bert):
    ref = ada_bert()
    ours = copy.deepcopy(ref)
    loradrop.apply_lora_dropout(ours, LoraDropoutConfig(p=0.5, seed=1))
    clone = copy.deepcopy(ours)
    loradrop.remove_lora_dropout(clone)  # must not strip the original
    layer = ours.base_model.model.bert.encoder.layer[0].attention.self.query
    assert "forward" in layer.__dict__
    loradrop.remove_lora_dropout(ours)
    for model in (ref, ours, clone):
        model.eval()
    assert "forward" not in layer.__dict__ and "_loradrop_adalora" not in layer.__dict__
    assert torch.equal(ref(**BATCH).logits, ours(**BATCH).logits)
    assert torch.equal(ref(**BATCH).logits, clone(**BATCH).logits)


@pytest.mark.parametrize("merge", [False, True])
def test_export_serves_the_expectation(ada_bert, bert_base, tmp_path, merge):
    model = ada_bert()
    loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.3, seed=1))
    model.eval()
    expected = model(**BATCH).logits
    loradrop.export_adapter(model, tmp_path / "export", merge=merge)
    if merge:
        plain = BertForSequenceClassification.from_pretrained(str(tmp_path / "export")).eval()
    else:
        plain = PeftModel.from_pretrained(copy.deepcopy(bert_base), str(tmp_path / "export")).eval()
    # No labels: PEFT's AdaLoraModel.forward crashes on a loss when no adapter is trainable (inference mode).
    torch.testing.assert_close(plain(input_ids=BATCH["input_ids"]).logits, expected)
    torch.testing.assert_close(model(**BATCH).logits, expected)  # the model itself is unchanged


# ================================================================================================ Trainer
class TinyData(torch.utils.data.Dataset):
    def __init__(self, n: int = 16) -> None:
        gen = torch.Generator().manual_seed(7)
        self.ids = torch.randint(0, 120, (n, 8), generator=gen)
        self.labels = self.ids[:, 0] % 3  # learnable from the first token

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def trainer_for(model: nn.Module, tmp_path, max_steps: int) -> Trainer:
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=5e-3, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1000,
                             disable_tqdm=True, dataloader_num_workers=0)
    return Trainer(model=model, args=args, train_dataset=TinyData(), callbacks=[AdaLoraCallback()])


# PEFT warns about a rank-0 layer as if it were an ungathered ZeRO-3 shard, and reads AdaLoRA's rank_pattern keys as
# LoRA's per-module ranks on load; both are harmless here.
@pytest.mark.filterwarnings("ignore:.*invalid shape", "ignore:.*rank_pattern keys did not match")
def test_trainer_reaches_target_rank_and_save_load_keeps_it(ada_bert, bert_base, tmp_path):
    model = ada_bert()
    loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.1, seed=1))
    assert sum(effective_ranks(model).values()) == 6 * 4
    trainer = trainer_for(model, tmp_path, max_steps=SCHEDULE["total_step"])
    trainer.train()

    ranks = effective_ranks(model)
    assert len(ranks) == 4 and sum(ranks.values()) == 2 * 4  # target_r x adapted matrices
    nonzero = sum(int((p != 0).sum()) for n, p in model.named_parameters() if "lora_E" in n)
    assert nonzero == 2 * 4  # the pruned Λ entries are really zero
    logged = [e for e in trainer.state.log_history if "adalora_total_rank" in e]
    assert logged and logged[-1]["adalora_total_rank"] == 8 and logged[-1]["adalora_ranks"] == ranks
    assert logged[0]["adalora_total_rank"] == 24  # first entry: before any pruning

    model.eval()
    expected = model(**BATCH).logits
    model.save_pretrained(str(tmp_path / "adapter"))
    loaded = loradrop.from_pretrained(copy.deepcopy(bert_base), tmp_path / "adapter").eval()
    assert effective_ranks(loaded) == ranks
    tuner = adalora_tuner(loaded)
    for name, rank in ranks.items():
        assert tuner.model.get_submodule(name).lora_E["default"].shape[0] == rank  # physically resized
    torch.testing.assert_close(loaded(input_ids=BATCH["input_ids"]).logits, expected)  # no labels: see export test


def test_trainer_with_mismatched_total_step_fails_early(ada_bert, tmp_path):
    trainer = trainer_for(ada_bert(), tmp_path, max_steps=5)
    with pytest.raises(ValueError, match="max_steps=5"):
        trainer.train()
    assert trainer.state.global_step == 0


# ================================================================================================ guards
def call_begin(model: nn.Module, max_steps: int = 12) -> AdaLoraCallback:
    callback = AdaLoraCallback()
    args = TrainingArguments(output_dir="unused", report_to=[], use_cpu=True)
    callback.on_train_begin(args, TrainerState(max_steps=max_steps), TrainerControl(), model=model)
    return callback


@pytest.mark.parametrize(("change", "match"), [
    ({"total_step": None}, "total_step must be"),
    ({"tinit": 9}, "no budgeting phase"),
    ({"deltaT": 0}, "deltaT"),
    ({"target_r": 8}, "exceeds init_r"),
])
def test_callback_rejects_bad_configs(ada_bert, change, match):
    model = ada_bert()
    config = model.peft_config["default"]
    for key, value in change.items():  # AdaLoraConfig validates at creation; configs are mutable afterwards
        setattr(config, key, value)
    with pytest.raises(ValueError, match=match):
        call_begin(model)


def test_callback_rejects_total_step_mismatch(ada_bert):
    with pytest.raises(ValueError, match="total_step=12 but the Trainer runs max_steps=30"):
        call_begin(ada_bert(), max_steps=30)


def run_steps(model: nn.Module, steps, *, drop_grad: str | None = None) -> None:
    """Backward once, then call adalora_step for each step as a loop would (gradients kept between calls)."""
    model.train()
    model(**BATCH).loss.backward()
    for step in steps:
        if drop_grad is not None:
            model.get_parameter(drop_grad).grad = None
        adalora_step(model, step)


def test_parameters_without_grad_are_skipped(ada_bert):
    model = ada_bert()
    name = "base_model.model.bert.encoder.layer.1.attention.self.value.lora_A.default"
    run_steps(model, range(1, 13), drop_grad=name)  # PEFT alone raises TypeError on p * None (peft#1721)
    assert model.get_parameter(name).grad is None  # the temporary zero gradient is gone again
    assert sum(effective_ranks(model).values()) == 8


def test_kthvalue_edge_when_nothing_is_pruned(ada_bert):
    model = ada_bert(init_r=4, target_r=4)  # budget never drops below the initial one: k=0 (peft#2337)
    run_steps(model, range(1, 13))
    assert effective_ranks(model) == {name: 4 for name in effective_ranks(model)}
    assert all(all(v) for v in model.peft_config["default"].rank_pattern.values())


def test_final_phase_without_pattern_is_finalised(ada_bert):
    model = ada_bert()
    with pytest.warns(UserWarning, match="without a rank pattern"):
        run_steps(model, [11, 12])  # e.g. a resumed run that never saw step total_step - tfinal
    assert sum(effective_ranks(model).values()) == 8


def test_warns_once_when_the_output_has_no_loss(ada_bert):
    model = ada_bert()
    callback = call_begin(model)
    model.train()
    with pytest.warns(UserWarning, match="no loss"):
        model(input_ids=BATCH["input_ids"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=BATCH["input_ids"])  # only once
        model.eval()
        model(input_ids=BATCH["input_ids"])
    callback.on_train_end(None, None, None)


def test_warns_when_peft_bypasses_the_regulariser():
    torch.manual_seed(0)
    model = get_peft_model(OneLinear(), AdaLoraConfig(target_modules=["proj"], init_r=4, target_r=2, total_step=10))
    callback = call_begin(model, max_steps=10)
    model.train()
    with pytest.warns(UserWarning, match="no task_type"):
        model(torch.randn(2, 24))
    callback.on_train_end(None, None, None)


# ================================================================================================ schedule
def test_schedule_scales_with_run_length():
    schedule = adalora_schedule(1000)
    assert schedule == {"init_r": 12, "target_r": 8, "tinit": 100, "tfinal": 250, "deltaT": 10, "total_step": 1000}
    config = AdaLoraConfig(target_modules=["proj"], **schedule)
    validate_adalora_config(config, max_steps=1000)
    for steps in (1, 2, 3, 7, 50):
        validate_adalora_config(AdaLoraConfig(target_modules=["proj"], **adalora_schedule(steps, target_r=4)), steps)
    with pytest.raises(ValueError):
        adalora_schedule(0)
    with pytest.raises(ValueError):
        adalora_schedule(100, target_r=8, init_r=4)
