"""apply_lora_dropout on PEFT models: parity, members, eval modes, save/load/export, determinism, bad input."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model
from safetensors.torch import load_file
from torch import nn

import loradrop
from loradrop import LoraDropoutConfig, split_members
from loradrop.masks import STREAM_TRAIN, derive_key

BATCH = {"input_ids": torch.randint(0, 120, (5, 9), generator=torch.Generator().manual_seed(0)),
         "labels": torch.tensor([0, 1, 2, 1, 0])}


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("strategy", loradrop.STRATEGIES)
def test_p0_is_bit_for_bit_plain_lora(tiny_bert, strategy):
    ref, ours = tiny_bert(), tiny_bert()
    loradrop.apply_lora_dropout(ours, LoraDropoutConfig(p=0.0, strategy=strategy, seed=1))
    for model in (ref, ours):
        model.train()
        model(**BATCH).loss.backward()
    out_ref, out_ours = ref(**BATCH), ours(**BATCH)
    assert torch.equal(out_ref.logits, out_ours.logits)
    g_ref, g_ours = grads(ref), grads(ours)
    assert g_ref.keys() == g_ours.keys() and len(g_ref) > 0
    for name in g_ref:
        assert torch.equal(g_ref[name], g_ours[name]), name


@pytest.mark.parametrize("scope", ["batch", "example"])
def test_p0_with_members_matches_plain_lora(tiny_bert, scope):
    ref, ours = tiny_bert(), tiny_bert()
    loradrop.apply_lora_dropout(ours, LoraDropoutConfig(p=0.0, samples=3, mask_scope=scope, seed=1))
    ref.train(), ours.train()
    out_ref, out_ours = ref(**BATCH), ours(**BATCH)
    torch.testing.assert_close(out_ours.loss, out_ref.loss)
    for member in split_members(out_ours.logits, 3):
        torch.testing.assert_close(member, out_ref.logits)
    out_ref.loss.backward(), out_ours.loss.backward()
    g_ref, g_ours = grads(ref), grads(ours)
    for name in g_ref:
        torch.testing.assert_close(g_ours[name], g_ref[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["ab", "rank", "input"])
@pytest.mark.parametrize("scope", ["batch", "example"])
def test_samples_loss_is_mean_of_member_losses(tiny_bert, strategy, scope):
    model = tiny_bert()
    loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.5, samples=4, strategy=strategy, mask_scope=scope,
                                                         seed=11))
    ctl = loradrop.get_controller(model)
    model.train()
    key = derive_key(ctl.seed, STREAM_TRAIN, ctl.step)
    out = model(**BATCH)
    members = split_members(out.logits, 4)
    batch = BATCH["input_ids"].shape[0]
    losses = []
    for m in range(4):
        # replay member m alone: same key, member ids m (batch scope) or its rows (example scope)
        count, offset = (1, m) if scope == "batch" else (None, m * batch)
        with ctl.ensemble(key, count, offset):
            single = model(**BATCH)
        torch.testing.assert_close(single.logits, members[m], atol=1e-5, rtol=1e-5)
        losses.append(single.loss)
    torch.testing.assert_close(out.loss, torch.stack(losses).mean(), atol=1e-6, rtol=1e-5)
    assert len({round(float(v.detach()), 6) for v in losses}) > 1  # members really differ


def test_eval_uses_the_expected_update_and_raw_mode(tiny_bert):
    p = 0.4
    ref, ours = tiny_bert(), tiny_bert()
    loradrop.apply_lora_dropout(ours, LoraDropoutConfig(p=p, seed=0))
    ref.eval(), ours.eval()
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if "lora_B" in name:
                param.mul_((1 - p) ** 2)
        torch.testing.assert_close(ours(**BATCH).logits, ref(**BATCH).logits)
        assert torch.equal(ours(**BATCH).logits, ours(**BATCH).logits)  # deterministic
        loradrop.set_eval_mode(ours, "raw")
        plain = tiny_bert().eval()
        assert torch.equal(ours(**BATCH).logits, plain(**BATCH).logits)
        loradrop.set_eval_mode(ours, "expected")
        torch.testing.assert_close(ours(**BATCH).logits, ref(**BATCH).logits)
    with pytest.raises(ValueError, match="eval mode must be one of \\['expected', 'raw'\\], got 'mc'"):
        loradrop.set_eval_mode(ours, "mc")


def test_expected_update_is_the_mean_of_masked_updates(one_linear):
    loradrop.apply_lora_dropout(one_linear, LoraDropoutConfig(p=0.5, samples=1, seed=0))
    layer = one_linear.base_model.model.proj
    x = torch.randn(3, 48)
    base = layer.base_layer(x)
    one_linear.train()
    with torch.no_grad():
        draws = torch.stack([one_linear(x) - base for _ in range(4000)])
        one_linear.eval()
        expected = one_linear(x) - base
    standard_error = draws.std(0) / draws.shape[0] ** 0.5
    assert torch.all((draws.mean(0) - expected).abs() <= 5 * standard_error + 1e-6)
    # and it is not the raw update: (1-p)^2 = 0.25 of it
    loradrop.set_eval_mode(one_linear, "raw")
    with torch.no_grad():
        torch.testing.assert_close(expected, 0.25 * (one_linear(x) - base))


def test_same_seed_same_masks_and_resumable_state(tiny_bert):
    a, b, c = tiny_bert(), tiny_bert(), tiny_bert()
    for model, seed in ((a, 5), (b, 5), (c, 6)):
        loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.5, seed=seed))
        model.train()
    out_a = [a(**BATCH).logits for _ in range(3)]
    assert all(torch.equal(x, b(**BATCH).logits) for x in out_a)
    assert not torch.equal(out_a[0], c(**BATCH).logits)
    assert not torch.equal(out_a[0], out_a[1])  # fresh masks on every forward
    state = loradrop.get_mask_state(a)
    nxt = a(**BATCH).logits
    loradrop.set_mask_state(a, state)
    assert torch.equal(a(**BATCH).logits, nxt)
    with pytest.raises(ValueError, match="non-negative integer 'step'"):
        loradrop.set_mask_state(a, {"seed": 1, "step": -1})


def test_seed_none_follows_torch_manual_seed(tiny_bert):
    torch.manual_seed(123)
    a = loradrop.apply_lora_dropout(tiny_bert(), LoraDropoutConfig(p=0.5))
    torch.manual_seed(123)
    b = loradrop.apply_lora_dropout(tiny_bert(), LoraDropoutConfig(p=0.5))
    assert loradrop.get_controller(a).seed == loradrop.get_controller(b).seed


def test_trainer_style_causal_lm_loss_with_num_items(tiny_llama):
    model = tiny_llama()
    loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.0, samples=3, seed=0))
    ref = tiny_llama()
    ids = torch.randint(3, 96, (2, 7))
    model.train(), ref.train()
    items = torch.tensor(12)  # tokens with labels in this batch: 2 * (7 - 1)
    ours = model(input_ids=ids, labels=ids, num_items_in_batch=items).loss
    theirs = ref(input_ids=ids, labels=ids, num_items_in_batch=items).loss
    torch.testing.assert_close(ours, theirs)


def test_save_load_round_trip_vanilla_peft_and_loradrop(tiny_bert, tmp_path):
    from transformers import BertForSequenceClassification

    model = tiny_bert()
    loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.3, samples=2, strategy="a", seed=9))
    model.train()
    model(**BATCH)
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "loradrop_config.json"} <= files
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert any(k.endswith("lora_A.weight") for k in keys) and any(k.endswith("lora_B.weight") for k in keys)
    stored = json.loads((tmp_path / "loradrop_config.json").read_text())
    assert stored["loradrop_config"]["strategy"] == "a" and stored["mask_state"]["step"] == 1

    base_sd = {k.replace("base_model.model.", ""): v for k, v in model.get_base_model().state_dict().items()}
    def fresh_base():
        torch.manual_seed(0)
        from helpers import tiny_bert_config
        base = BertForSequenceClassification(tiny_bert_config())
        base.load_state_dict({k: v for k, v in base_sd.items() if "lora" not in k}, strict=False)
        return base

    model.eval()
    loradrop.set_eval_mode(model, "raw")
    vanilla = PeftModel.from_pretrained(fresh_base(), tmp_path).eval()
    torch.testing.assert_close(vanilla(**BATCH).logits, model(**BATCH).logits)

    loradrop.set_eval_mode(model, "expected")
    restored = loradrop.from_pretrained(fresh_base(), tmp_path).eval()
    assert loradrop.get_controller(restored).config == loradrop.get_controller(model).config
    assert loradrop.get_mask_state(restored) == loradrop.get_mask_state(model)
    torch.testing.assert_close(restored(**BATCH).logits, model(**BATCH).logits)
    with pytest.raises(FileNotFoundError, match="has no loradrop_config.json"):
        loradrop.from_pretrained(fresh_base(), tmp_path / "nowhere")


def test_export_adapter_and_merged_model_serve_the_expected_update(tiny_bert, tmp_path):
    from transformers import BertForSequenceClassification

    model = tiny_bert()
    loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.5, seed=9))
    model.train()
    model(**BATCH).loss.backward()  # exported after training: the model (and its last plan) is deep-copied
    model.eval()
    expected = model(**BATCH).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loradrop.export_adapter(model, tmp_path / "adapter")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is left as it was
    assert not (tmp_path / "adapter" / "loradrop_config.json").exists()
    base = copy.deepcopy(model.get_base_model())  # base weights; the LoRA layers are swapped by PEFT on load
    plain = PeftModel.from_pretrained(tiny_bert().get_base_model(), tmp_path / "adapter")
    del base
    torch.testing.assert_close(plain.eval()(**BATCH).logits, expected)

    loradrop.export_adapter(model, tmp_path / "merged", merge=True)
    merged = BertForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(merged(**BATCH).logits, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        loradrop.export_adapter(model, tmp_path / "merged")


def test_bad_input_leaves_the_model_unchanged(tiny_bert):
    model = tiny_bert()
    with pytest.raises(TypeError, match="needs a peft.PeftModel .* got BertForSequenceClassification"):
        loradrop.apply_lora_dropout(model.get_base_model(), LoraDropoutConfig())
    with pytest.raises(TypeError, match="config must be a loradrop.LoraDropoutConfig, got dict"):
        loradrop.apply_lora_dropout(model, {"p": 0.5})
    with pytest.raises(ValueError, match="adapter 'other' not found"):
        loradrop.apply_lora_dropout(model, LoraDropoutConfig(), adapter_name="other")
    loradrop.apply_lora_dropout(model, LoraDropoutConfig(seed=0))
    hooks = len(model._forward_pre_hooks)
    with pytest.raises(ValueError, match="already applied"):
        loradrop.apply_lora_dropout(model, LoraDropoutConfig())
    assert len(model._forward_pre_hooks) == hooks
    loradrop.remove_lora_dropout(model)
    assert len(model._forward_pre_hooks) == 0
    assert all(not m.lora_variant for m in model.modules() if hasattr(m, "lora_variant"))


def test_unsupported_models_are_refused_cleanly(tiny_bert):
    from transformers import BertForSequenceClassification

    from helpers import tiny_bert_config

    prefix = get_peft_model(BertForSequenceClassification(tiny_bert_config()),
                            PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2))
    with pytest.raises(ValueError, match="is PREFIX_TUNING; apply_lora_dropout supports"):
        loradrop.apply_lora_dropout(prefix, LoraDropoutConfig())
    dora = get_peft_model(BertForSequenceClassification(tiny_bert_config()),
                          LoraConfig(r=2, target_modules=["query"], use_dora=True))
    variants_before = [dict(m.lora_variant) for m in dora.modules() if hasattr(m, "lora_variant")]
    loradrop.apply_lora_dropout(dora, LoraDropoutConfig())  # DoRA on lora.Linear is composed (loradrop.dora) ...
    assert [type(v).__name__ for m in dora.modules() if hasattr(m, "lora_variant") for v in m.lora_variant.values()
            ] == ["LoraDropoutDoraVariant"] * 2
    loradrop.remove_lora_dropout(dora)  # ... and removal puts PEFT's own DoRA variant objects back
    assert [dict(m.lora_variant) for m in dora.modules() if hasattr(m, "lora_variant")] == variants_before
    mha = get_peft_model(Attention(), LoraConfig(r=2, target_modules=["attn", "proj"]))
    with pytest.raises(ValueError, match=r"'base_model.model.attn' is peft.tuners.lora.layer.MultiheadAttention: PEFT"):
        loradrop.apply_lora_dropout(mha, LoraDropoutConfig())  # one unsupported layer refuses the whole model
    assert loradrop.model._find_controller(mha) is None and not mha.base_model.model.proj.lora_variant


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attn(x, x, x)[0])


def test_activation_checkpointing_recomputes_the_same_masks(tiny_llama):
    ids = torch.randint(3, 96, (2, 6))
    grads_by_mode = []
    for checkpointing in (False, True):
        model = tiny_llama()
        loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.5, samples=2, seed=3))
        if checkpointing:
            model.get_base_model().gradient_checkpointing_enable({"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads_by_mode.append(grads(model))
    for name, g in grads_by_mode[0].items():
        torch.testing.assert_close(grads_by_mode[1][name], g, atol=1e-6, rtol=1e-5)
