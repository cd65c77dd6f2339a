"""LoRA Dropout on PEFT's lora.Embedding, with the contract of the Linear matrix (tests/test_matrix.py), and GPT-2
Conv1D merging. An embedding's input is token ids (the matrix feeds dense inputs), so its rows live here:

- p = 0 is bit-identical to plain PEFT (outputs and gradients, train and eval);
- the masked update is the written-out formula; its zero pattern is the union of dropped vocabulary entries (columns
  of A, "input features") and dropped embedding dimensions (rows of B, "output features"); "rank" drops rank
  components; "input" drops whole positions (the one non-zero element of the one-hot input);
- eval uses the expected update, and the mean of many members converges to it;
- gradients equal the formula's; ``samples=N`` loss is the mean of the members' losses; save/load and merge keep it.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import loradrop
from loradrop import MASK_SCOPES, STRATEGIES, LoraDropoutConfig
from loradrop.masks import STREAM_INPUT, STREAM_TRAIN, derive_key, keep_mask, uniform

VOCAB, DIM, RANK, P = 16, 10, 4, 0.5
FACTOR = {"ab": (1 - P) ** 2, "a": 1 - P, "b": 1 - P, "rank": 1 - P, "input": 1.0}
CASES = list(itertools.product(STRATEGIES, MASK_SCOPES))
matrix = pytest.mark.parametrize(("strategy", "scope"), CASES, ids=[f"{s}-{c}" for s, c in CASES])


class EmbHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        y = self.emb(input_ids)
        return y if labels is None else F.mse_loss(y, labels)


def base() -> EmbHead:
    torch.manual_seed(0)
    return EmbHead()


def plain() -> PeftModel:
    return get_peft_model(base(), LoraConfig(r=RANK, lora_alpha=8, target_modules=["emb"], init_lora_weights=False))


def ours(strategy: str, scope: str, **config) -> PeftModel:
    config = {"p": P, "seed": 3, **config}
    return loradrop.apply_lora_dropout(plain(), LoraDropoutConfig(strategy=strategy, mask_scope=scope, **config))


def layer(model: PeftModel) -> nn.Module:
    return model.base_model.model.emb


def parts(model: PeftModel) -> tuple[torch.Tensor, torch.Tensor, float]:
    emb = layer(model)
    return emb.lora_embedding_A["default"], emb.lora_embedding_B["default"], emb.scaling["default"]


def ids(batch: int = 3, seq: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def reference(model: PeftModel, x: torch.Tensor, key: int, members: int) -> torch.Tensor:
    """s * B_m A_m onehot(x) for every member-major row of x, from the mask functions, written out."""
    ctl = loradrop.get_controller(model)
    a, b, s = parts(model)
    sl, strategy = ctl.slices[0], ctl.config.strategy
    rows = x.shape[0]
    keep = keep_mask(key, torch.arange(members), torch.arange(ctl.num_features), P)
    member_of_row = torch.arange(rows) // (rows // members)
    out = []
    for i in range(rows):
        m = int(member_of_row[i])
        a_m = a * (keep[m, sl.a[0]:sl.a[1]][None, :] if sl.a else 1) * (keep[m, sl.rank[0]:sl.rank[1]][:, None]
                                                                          if sl.rank else 1)
        b_m = b * (keep[m, sl.b[0]:sl.b[1]][:, None] if sl.b else 1)
        row = s * (a_m[:, x[i]].T @ b_m.T)  # (seq, DIM)
        if strategy == "input":
            per_member = rows // members * x.shape[1]
            u = uniform(derive_key(key, STREAM_INPUT, 0), torch.arange(members), torch.arange(per_member))
            pos = (u[m] >= P).float().view(rows // members, x.shape[1])[i % (rows // members)] / (1 - P)
            row = row * pos[:, None]
        out.append(row)
    return torch.stack(out)


def train_key(model: PeftModel) -> int:
    ctl = loradrop.get_controller(model)
    return derive_key(ctl.seed, STREAM_TRAIN, ctl.step)


@matrix
def test_p0_is_bit_identical_to_plain_peft(strategy, scope):
    ref, mine = plain(), ours(strategy, scope, p=0.0)
    x, g = ids(), torch.randn(3, 7, DIM, generator=torch.Generator().manual_seed(2))
    for model in (ref, mine):
        model.train()
        (model(input_ids=x) * g).sum().backward()
    assert torch.equal(ref(input_ids=x), mine(input_ids=x))
    for (name, p_ref), (_, p_mine) in zip(ref.named_parameters(), mine.named_parameters()):
        if p_ref.requires_grad:
            assert torch.equal(p_ref.grad, p_mine.grad), name
    ref.eval(), mine.eval()
    assert torch.equal(ref(input_ids=x), mine(input_ids=x))


@matrix
def test_masked_update_and_its_zero_pattern(strategy, scope):
    model = ours(strategy, scope, samples=2)
    model.train()
    x = torch.arange(VOCAB).view(1, VOCAB)  # every vocabulary entry once
    key = train_key(model)
    delta = (model(input_ids=x) - layer(model).base_layer(x.repeat(2, 1))).detach()  # (2, VOCAB, DIM)
    want = reference(model, x.repeat(2, 1), key, 2)
    torch.testing.assert_close(delta, want)
    ctl = loradrop.get_controller(model)
    sl = ctl.slices[0]
    keep = keep_mask(key, torch.arange(2), torch.arange(ctl.num_features), P)
    dropped_tok = (keep[:, sl.a[0]:sl.a[1]] == 0) if sl.a else torch.zeros(2, VOCAB, dtype=torch.bool)
    dropped_dim = (keep[:, sl.b[0]:sl.b[1]] == 0) if sl.b else torch.zeros(2, DIM, dtype=torch.bool)
    if sl.rank:
        dropped_tok = dropped_tok | (keep[:, sl.rank[0]:sl.rank[1]] == 0).all(-1, keepdim=True)
    if strategy == "input":
        dropped_tok = (want == 0).all(-1)  # whole positions (checked against the formula above)
    expected_zero = dropped_tok[:, :, None] | dropped_dim[:, None, :]
    assert torch.equal(delta == 0, expected_zero)
    if strategy != "rank":
        assert expected_zero.any() and (~expected_zero).any()
    assert not torch.equal(delta[0], delta[1])


@matrix
def test_eval_is_the_expected_update_and_the_mean_of_members(strategy, scope):
    model = ours(strategy, scope)
    a, b, s = parts(model)
    x = ids()
    model.eval()
    with torch.no_grad():
        full = s * (a[:, x].permute(1, 2, 0) @ b.T)
        delta = model(input_ids=x) - layer(model).base_layer(x)
        torch.testing.assert_close(delta, FACTOR[strategy] * full)
        n = 4000
        ctl = loradrop.get_controller(model)
        with ctl.ensemble(derive_key(7), n if scope == "batch" else None, 0, n):
            members = model(input_ids=x) - layer(model).base_layer(x.repeat(n, 1))
        mean = members.view(n, *x.shape, DIM).mean(0)
    torch.testing.assert_close(mean, delta, atol=0.05 * float(full.abs().max()), rtol=0)


@matrix
def test_gradients_and_samples_loss(strategy, scope):
    model = ours(strategy, scope, samples=3)
    ctl = loradrop.get_controller(model)
    model.train()
    x = ids(2, 5)
    labels = torch.randn(2, 5, DIM, generator=torch.Generator().manual_seed(4))
    key = train_key(model)
    loss = model(input_ids=x, labels=labels)
    loss.backward()
    a, b, _ = parts(model)
    base_out = layer(model).base_layer(x.repeat(3, 1)).detach()
    want = F.mse_loss(base_out + reference(model, x.repeat(3, 1), key, 3 if scope == "batch" else 6),
                      labels.repeat(3, 1, 1))
    grad_a, grad_b = torch.autograd.grad(want, [a, b])
    torch.testing.assert_close(a.grad, grad_a)
    torch.testing.assert_close(b.grad, grad_b)
    torch.testing.assert_close(loss, want)
    replayed = []
    for m in range(3):
        count, offset = (1, m) if scope == "batch" else (None, m * x.shape[0])
        with ctl.ensemble(key, count, offset):
            replayed.append(model(input_ids=x, labels=labels))
    torch.testing.assert_close(loss, torch.stack(replayed).mean())


def test_save_load_merge_and_export(tmp_path):
    model = ours("ab", "batch", samples=2)
    x = ids()
    model.train()
    model(input_ids=x)
    model.save_pretrained(tmp_path / "a")
    restored = loradrop.from_pretrained(base(), tmp_path / "a")
    assert loradrop.get_mask_state(restored) == loradrop.get_mask_state(model)
    model.eval(), restored.eval()
    expected = model(input_ids=x).detach()
    assert torch.equal(restored(input_ids=x), expected)
    model.train(), restored.train()
    assert torch.equal(restored(input_ids=x), model(input_ids=x))
    loradrop.export_adapter(model, tmp_path / "export")
    served = PeftModel.from_pretrained(base(), str(tmp_path / "export")).eval()
    torch.testing.assert_close(served(input_ids=x), expected)
    merged = restored.eval().merge_and_unload()
    torch.testing.assert_close(merged(input_ids=x), expected)


def test_gpt2_conv1d_merge_serves_the_expectation():
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn = Conv1D(10, 12)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c_attn(x)

    torch.manual_seed(0)
    model = get_peft_model(Head(), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                              init_lora_weights=False))
    loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.3, samples=2, seed=0))
    x = torch.randn(3, 12)
    model.eval()
    expected = model(x).detach()
    model.merge_adapter()
    torch.testing.assert_close(model(x), expected)
    model.unmerge_adapter()
    torch.testing.assert_close(model(x), expected)  # W + dW - dW: equal up to rounding


def test_embedding_and_linear_layers_in_one_model():
    """A BERT with LoRA on word embeddings and attention projections: p=0 parity, batched training and ensembles."""
    from transformers import BertForSequenceClassification

    from helpers import tiny_bert_config

    def make() -> PeftModel:
        torch.manual_seed(0)
        return get_peft_model(BertForSequenceClassification(tiny_bert_config()),
                              LoraConfig(r=2, target_modules=["word_embeddings", "query", "value"],
                                         init_lora_weights=False, task_type="SEQ_CLS"))

    batch = {"input_ids": ids(4, 6), "labels": torch.tensor([0, 1, 2, 1])}
    ref, zero = make(), loradrop.apply_lora_dropout(make(), LoraDropoutConfig(p=0.0))
    assert torch.equal(ref(**batch).logits, zero(**batch).logits)
    model = loradrop.apply_lora_dropout(make(), LoraDropoutConfig(p=0.5, samples=2, seed=0))
    assert len(loradrop.get_controller(model).layers) == 5
    model.train()
    model(**batch).loss.backward()
    emb = model.base_model.model.bert.embeddings.word_embeddings
    assert emb.lora_embedding_A["default"].grad is not None
    out = loradrop.ensemble_predict(model, {"input_ids": batch["input_ids"]}, n=4, seed=0)
    assert out.probs.shape == (4, 3) and bool((out.mutual_information > 0).all())


# ------------------------------------------------------------------------------------------------ convolutions
CIN, COUT, GROUPS = 6, 8, 2
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
conv_matrix = pytest.mark.parametrize(("dims", "groups", "strategy", "scope"), [
    (d, g, s, c) for d in (1, 2) for g in (1, GROUPS) for s in STRATEGIES for c in MASK_SCOPES] + [
    (3, 1, "ab", "batch")])


class ConvHead(nn.Module):
    def __init__(self, dims: int, groups: int) -> None:
        super().__init__()
        self.conv = CONVS[dims](CIN, COUT, 3, padding=1, stride=1, groups=groups)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        y = self.conv(x)
        return y if labels is None else F.mse_loss(y, labels)


def conv_plain(dims: int, groups: int) -> PeftModel:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LoRA adapter added to ConvNd layer with groups > 1")
        return get_peft_model(ConvHead(dims, groups), LoraConfig(r=RANK, lora_alpha=8, target_modules=["conv"],
                                                             init_lora_weights=False))


def conv_ours(dims, groups, strategy, scope, **config) -> PeftModel:
    config = {"p": P, "seed": 3, **config}
    return loradrop.apply_lora_dropout(conv_plain(dims, groups),
                                       LoraDropoutConfig(strategy=strategy, mask_scope=scope, **config))


def conv_input(dims: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, CIN, *([5] * dims), generator=torch.Generator().manual_seed(seed))


def conv_reference(model: PeftModel, x: torch.Tensor, key: int, members: int) -> torch.Tensor:
    """Every row through PEFT's own lora_A / lora_B modules with the member's masks written into copies of the
    weights (input channels of A, rank rows of A, output channels of B), one row at a time."""
    ctl = loradrop.get_controller(model)
    layer_ = model.base_model.model.conv
    lora_a, lora_b, s = layer_.lora_A["default"], layer_.lora_B["default"], layer_.scaling["default"]
    sl, strategy = ctl.slices[0], ctl.config.strategy
    keep = keep_mask(key, torch.arange(members), torch.arange(ctl.num_features), P)
    rows, out = x.shape[0], []
    for i in range(rows):
        m = i // (rows // members)
        xi = x[i:i + 1]
        if strategy == "input":
            per_member = rows // members * xi.numel()
            u = uniform(derive_key(key, STREAM_INPUT, 0), torch.arange(members), torch.arange(per_member))
            j = i % (rows // members)
            xi = xi * (u[m, j * xi.numel():(j + 1) * xi.numel()] >= P).float().view_as(xi) / (1 - P)
        wa, wb = lora_a.weight, lora_b.weight
        ones = (1,) * (wa.dim() - 2)
        if sl.a:
            wa = wa * keep[m, sl.a[0]:sl.a[1]].view(1, -1, *ones)
        if sl.rank:
            wa = wa * keep[m, sl.rank[0]:sl.rank[1]].view(-1, 1, *ones)
        if sl.b:
            wb = wb * keep[m, sl.b[0]:sl.b[1]].view(-1, 1, *ones)
        h = lora_a._conv_forward(xi, wa, None)
        out.append(lora_b._conv_forward(h, wb, None) * s)
    return torch.cat(out)


@conv_matrix
def test_conv_p0_is_bit_identical_to_plain_peft(dims, groups, strategy, scope):
    ref, mine = conv_plain(dims, groups), conv_ours(dims, groups, strategy, scope, p=0.0)
    x = conv_input(dims)
    g = torch.randn_like(ref(x))
    for model in (ref, mine):
        model.train()
        (model(x) * g).sum().backward()
    assert torch.equal(ref(x), mine(x))
    for (name, p_ref), (_, p_mine) in zip(ref.named_parameters(), mine.named_parameters()):
        if p_ref.requires_grad:
            assert torch.equal(p_ref.grad, p_mine.grad), name
    ref.eval(), mine.eval()
    assert torch.equal(ref(x), mine(x))


@conv_matrix
def test_conv_masked_update_zero_pattern_gradients_and_expectation(dims, groups, strategy, scope):
    model = conv_ours(dims, groups, strategy, scope, samples=2)
    ctl = loradrop.get_controller(model)
    conv = model.base_model.model.conv
    model.train()
    x = conv_input(dims)
    labels = torch.randn(4, COUT, *([5] * dims), generator=torch.Generator().manual_seed(3))
    key = train_key(model)
    members = 2 if scope == "batch" else 4
    loss = model(x, labels=labels)
    loss.backward()
    base_out = conv.base_layer(x.repeat(2, *([1] * (dims + 1)))).detach()
    want_delta = conv_reference(model, x.repeat(2, *([1] * (dims + 1))), key, members)
    want = F.mse_loss(base_out + want_delta, labels)
    torch.testing.assert_close(loss, want)
    params = [conv.lora_A["default"].weight, conv.lora_B["default"].weight]
    for param, grad in zip(params, torch.autograd.grad(want, params)):
        torch.testing.assert_close(param.grad, grad)
    # zero pattern: a one-channel input gives a zero update iff that input channel (or every rank) or the output
    # channel is dropped for the member
    if strategy in ("ab", "a", "b", "rank"):
        sl = ctl.slices[0]
        keep = keep_mask(key, torch.arange(members), torch.arange(ctl.num_features), P)
        for c in range(CIN):
            probe = torch.zeros(members, CIN, *([5] * dims))
            probe[:, c] = 1.0
            with ctl.ensemble(key, None, 0), torch.no_grad():  # one member per row: rows 0..members-1
                delta = model(probe) - conv.base_layer(probe)
            drop_in = (keep[:, sl.a[0] + c] == 0) if sl.a else torch.zeros(members, dtype=torch.bool)
            if sl.rank:
                drop_in = drop_in | (keep[:, sl.rank[0]:sl.rank[1]] == 0).all(-1)
            drop_out = (keep[:, sl.b[0]:sl.b[1]] == 0) if sl.b else torch.zeros(members, COUT, dtype=torch.bool)
            zero = (delta == 0).flatten(2).all(-1)  # (members, COUT)
            assert torch.equal(zero, drop_in[:, None] | drop_out)
    # eval: the expected update, and the mean of many members converges to it
    model.eval()
    with torch.no_grad():
        delta = model(x) - conv.base_layer(x)
        n = 1000
        with ctl.ensemble(derive_key(9), n if scope == "batch" else None, 0, n):
            many = model(x) - conv.base_layer(x.repeat(n, *([1] * (dims + 1))))
        mean = many.view(n, *delta.shape).mean(0)
    full = delta / FACTOR[strategy]
    torch.testing.assert_close(mean, delta, atol=0.1 * float(full.abs().max()), rtol=0)


def test_conv_merge_serves_the_expectation():  # (PEFT itself refuses to merge grouped LoRA convolutions)
    model = conv_ours(2, 1, "ab", "batch", samples=2)
    x = conv_input(2)
    model.eval()
    expected = model(x).detach()
    model.merge_adapter()
    torch.testing.assert_close(model(x), expected)
    model.unmerge_adapter()
    torch.testing.assert_close(model(x), expected)


# ------------------------------------------------------------------------------------------------ refusals
class Experts(nn.Module):
    """A Linear plus MoE-style expert weights (a bare nn.Parameter, targeted through target_parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.moe = nn.Module()
        self.moe.weight = nn.Parameter(torch.randn(16, 16))
        self.emb = nn.Embedding(16, 16)
        self.conv = nn.Conv2d(4, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) @ self.moe.weight


def _variant_configs():
    from peft.tuners.lora import config as lora_cfg

    return {
        "dora-embedding": ({"use_dora": True, "target_modules": ["emb"]},
                           r"DoraEmbeddingVariant \(LoraConfig use_.*lora.Linear layers only"),
        "dora-conv": ({"use_dora": True, "target_modules": ["conv"]},
                      r"DoraConv2dVariant \(LoraConfig use_dora\).*Linear layers only"),
        "mica": ({"init_lora_weights": "mica"}, r"MiCALinearVariant \(LoraConfig mica\)"),
        "alora": ({"alora_invocation_tokens": [1, 2]}, r"ALoraLinearVariant \(LoraConfig alora_invocation_tokens\)"),
        "velora": ({"velora_config": lora_cfg.VeloraConfig()}, r"VeloraLinearVariant \(LoraConfig velora_config\)"),
        "monteclora": ({"monteclora_config": lora_cfg.MontecloraConfig()},
                       r"MontecloraLinearVariant \(LoraConfig monteclora_config\)"),
        "kasa": ({"kasa_config": lora_cfg.KasaConfig()}, r"KasaLinearVariant \(LoraConfig kasa_config\)"),
        "target_parameters": ({"target_modules": [], "target_parameters": ["moe.weight"]},
                              r"'base_model.model.moe' is peft.tuners.lora.layer.ParamWrapper: target_parameters"),
    }


@pytest.mark.parametrize("name", ["dora-embedding", "dora-conv", "mica", "alora", "velora", "monteclora",
                                  "kasa", "target_parameters"])
def test_other_variants_and_types_are_refused_with_the_reason(name):
    options, message = _variant_configs()[name]
    options = {"target_modules": ["proj"], **options}
    torch.manual_seed(0)
    try:
        model = get_peft_model(Experts(), LoraConfig(r=4, **options))
    except (TypeError, ValueError) as err:  # pragma: no cover - depends on PEFT's options for this variant
        pytest.skip(f"PEFT cannot build {name} here: {err}")
    state = {n: dict(m.lora_variant) for n, m in model.named_modules() if hasattr(m, "lora_variant")}
    with pytest.raises(ValueError, match=message):
        loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.5))
    assert {n: dict(m.lora_variant) for n, m in model.named_modules() if hasattr(m, "lora_variant")} == state
    assert loradrop.model._find_controller(model) is None


def test_quantised_and_unknown_layer_types_are_named_with_the_reason():
    from loradrop.layer_types import unsupported_reason

    quantised = type("QuantLinear", (nn.Module,), {"__module__": "peft.tuners.lora.gptq"})()
    assert unsupported_reason(quantised).startswith("peft.tuners.lora.gptq.QuantLinear is a quantised")
    assert "bitsandbytes 4-bit / 8-bit QLoRA layers are supported" in unsupported_reason(quantised)
    custom = type("MyLora", (nn.Module,), {"__module__": "mylib.layers"})()
    assert "register_layer_handler" in unsupported_reason(custom)
