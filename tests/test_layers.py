"""Mask semantics, read from the adapted layer's output (not from internals)."""

import pytest
import torch

import loradrop
from loradrop import LoraDropoutConfig


def full_delta(model):
    """s * (B A)^T of the single adapted layer: (in, out)."""
    layer = model.base_model.model.proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return (b @ a).T.detach() * layer.scaling["default"]


def effective_delta(model, rows=None):
    """Feed the identity: row j of the output minus the base output is row j of the effective delta^T."""
    layer = model.base_model.model.proj
    eye = torch.eye(layer.in_features) if rows is None else rows
    y = model(eye)
    base = layer.base_layer(eye)
    return (y - base), y


def dropped_lines(delta):
    zero = delta == 0
    return zero.all(1), zero.all(0)  # dropped input features (rows), dropped output features (columns)


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_ab_zero_pattern_is_union_of_dropped_rows_and_columns(one_linear, p):
    loradrop.apply_lora_dropout(one_linear, LoraDropoutConfig(p=p, seed=3))
    one_linear.train()
    full = full_delta(one_linear)
    fractions = []
    for _ in range(60):
        delta, _ = effective_delta(one_linear)
        delta = delta.detach()
        rows, cols = dropped_lines(delta)
        assert torch.equal(delta == 0, rows[:, None] | cols[None, :])
        kept = delta != 0
        torch.testing.assert_close(delta[kept], full[kept])  # no rescale: kept entries unchanged
        fractions.append((~kept).float().mean().item())
    assert sum(fractions) / len(fractions) == pytest.approx(2 * p - p * p, abs=0.03)


def test_gradients_are_exactly_zero_on_dropped_columns_of_a_and_rows_of_b(one_linear):
    loradrop.apply_lora_dropout(one_linear, LoraDropoutConfig(p=0.5, seed=5))
    one_linear.train()
    layer = one_linear.base_model.model.proj
    delta, y = effective_delta(one_linear)
    rows, cols = dropped_lines(delta.detach())
    assert rows.any() and cols.any() and (~rows).any() and (~cols).any()
    (y * torch.randn_like(y)).sum().backward()
    grad_a, grad_b = layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad
    assert torch.all(grad_a[:, rows] == 0) and torch.all(grad_a[:, ~rows] != 0)
    assert torch.all(grad_b[cols, :] == 0) and torch.all(grad_b[~cols, :] != 0)


@pytest.mark.parametrize(("strategy", "drops_rows", "drops_cols"), [("a", True, False), ("b", False, True)])
def test_one_sided_strategies(one_linear, strategy, drops_rows, drops_cols):
    loradrop.apply_lora_dropout(one_linear, LoraDropoutConfig(p=0.5, strategy=strategy, seed=1))
    one_linear.train()
    delta, _ = effective_delta(one_linear)
    rows, cols = dropped_lines(delta.detach())
    assert bool(rows.any()) is drops_rows and bool(cols.any()) is drops_cols
    assert torch.equal(delta == 0, rows[:, None] | cols[None, :])


def test_rescale_scales_kept_entries(one_linear):
    p = 0.4
    loradrop.apply_lora_dropout(one_linear, LoraDropoutConfig(p=p, rescale=True, seed=2))
    one_linear.train()
    delta, _ = effective_delta(one_linear)
    kept = delta != 0
    torch.testing.assert_close(delta[kept].detach(), full_delta(one_linear)[kept] / (1 - p) ** 2)


def test_rank_strategy_drops_rank_components(one_linear):
    loradrop.apply_lora_dropout(one_linear, LoraDropoutConfig(p=0.5, strategy="rank", seed=4))
    one_linear.train()
    layer = one_linear.base_model.model.proj
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    ranks = []
    for _ in range(40):
        delta = effective_delta(one_linear)[0].detach()
        # the delta must equal s * B diag(m) A for the mask m that its own rank reveals
        candidates = [torch.tensor([(i >> k) & 1 for k in range(4)], dtype=torch.float32) for i in range(16)]
        assert any(torch.allclose(delta, (s * (b * m) @ a).T.detach(), atol=1e-6) for m in candidates)
        ranks.append(torch.linalg.matrix_rank(delta).item())
    assert sum(ranks) / len(ranks) == pytest.approx(4 * 0.5, abs=0.5)


def test_input_strategy_is_inverted_elementwise_dropout(one_linear):
    p = 0.5
    loradrop.apply_lora_dropout(one_linear, LoraDropoutConfig(p=p, strategy="input", seed=4))
    one_linear.train()
    delta = effective_delta(one_linear)[0].detach()
    rows, _ = dropped_lines(delta)
    assert rows.any() and (~rows).any()
    torch.testing.assert_close(delta[~rows], full_delta(one_linear)[~rows] / (1 - p))


def test_example_scope_gives_every_example_its_own_mask(one_linear):
    x = torch.randn(1, 48).repeat(16, 1)
    loradrop.apply_lora_dropout(one_linear, LoraDropoutConfig(p=0.5, mask_scope="example", seed=0))
    one_linear.train()
    y = one_linear(x)
    assert len({tuple(row.tolist()) for row in y}) > 8
    loradrop.get_controller(one_linear).config.mask_scope = "batch"
    y = one_linear(x)
    assert len({tuple(row.tolist()) for row in y}) == 1


def test_example_scope_drop_rate(one_linear):
    p = 0.3
    loradrop.apply_lora_dropout(one_linear, LoraDropoutConfig(p=p, mask_scope="example", seed=0))
    one_linear.train()
    layer = one_linear.base_model.model.proj
    eye = torch.eye(48)
    delta = (one_linear(eye) - layer.base_layer(eye)).detach()
    # each row j is example j's own effective delta row: zero iff input j dropped, else a union of columns
    full = full_delta(one_linear)
    zero_fraction = (delta == 0).float().mean().item()
    assert zero_fraction == pytest.approx(2 * p - p * p, abs=0.06)
    kept = delta != 0
    torch.testing.assert_close(delta[kept], full[kept])


def reference_delta(x, a, b, bias, scaling, mask, slices, members):
    """s * (x_m A_m^T B_m^T + bias_m) per member, written out member by member from the mask rows."""
    out = []
    for m, xm in enumerate(x.reshape(members, -1, x.shape[-1])):
        am, bm, biasm = a.clone(), b.clone(), None if bias is None else bias.clone()
        if slices.a:
            am = am * mask[m, slices.a[0]:slices.a[1]][None, :]
        if slices.rank:
            am = am * mask[m, slices.rank[0]:slices.rank[1]][:, None]
        if slices.b:
            bm = bm * mask[m, slices.b[0]:slices.b[1]][:, None]
            biasm = None if biasm is None else biasm * mask[m, slices.b[0]:slices.b[1]]
        d = xm @ am.T @ bm.T
        out.append((d if biasm is None else d + biasm) * scaling)
    return torch.stack(out).reshape(*x.shape[:-1], b.shape[0])


@pytest.mark.parametrize("strategy", ["ab", "a", "b", "rank"])
@pytest.mark.parametrize("members", [1, 3, None])
@pytest.mark.parametrize("lora_bias", [False, True])
def test_fused_matmul_paths_equal_the_written_out_formula(strategy, members, lora_bias):
    """The fused paths (addmm/baddbmm epilogue, masked weight copies, batched members, example scope) compute
    result + s * B_m A_m x_m exactly as written out per member, in value and in gradient."""
    from peft import get_peft_model

    from helpers import OneLinear, lora_config
    from loradrop.layers import masked_lora_delta
    from loradrop.members import CallPlan

    torch.manual_seed(0)
    model = get_peft_model(OneLinear(), lora_config(target_modules=["proj"], lora_bias=lora_bias))
    loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.5, strategy=strategy, seed=9))
    layer = model.base_model.model.proj
    variant, ctl = layer.lora_variant["default"], loradrop.get_controller(model)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    bias = layer.lora_B["default"].bias
    x = torch.randn(6, 5, 48)
    result = torch.randn(6, 5, 40)
    plan = CallPlan(masked=True, training=True, key=1234, members=members)
    n = members if members is not None else x.shape[0]
    mask = ctl.masks(plan, n, x.device, a.dtype)
    assert (mask == 0).any() and (mask == 1).any()

    fused = masked_lora_delta(x, a, b, bias, 2.0, plan, ctl, variant.slices, result)
    expected = result + reference_delta(x, a, b, bias, 2.0, mask, variant.slices, n)
    torch.testing.assert_close(fused, expected)
    delta_only = masked_lora_delta(x, a, b, bias, 2.0, plan, ctl, variant.slices)
    torch.testing.assert_close(delta_only, expected - result)

    g = torch.randn_like(fused)
    grads = torch.autograd.grad((fused * g).sum(), (a, b))
    ref_grads = torch.autograd.grad((expected * g).sum(), (a, b))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_fused_path_with_bf16_base_output_and_fp32_adapters(one_linear):
    """PEFT keeps adapters in float32 under a bf16 base layer: the result and the delta differ in dtype, so the
    fused matmul must not be used, and the output is promoted like PEFT's own `result + delta`."""
    from loradrop.layers import masked_lora_delta
    from loradrop.members import CallPlan

    loradrop.apply_lora_dropout(one_linear, LoraDropoutConfig(p=0.5, seed=9))
    layer = one_linear.base_model.model.proj
    variant, ctl = layer.lora_variant["default"], loradrop.get_controller(one_linear)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x, result = torch.randn(4, 48), torch.randn(4, 40).bfloat16()
    plan = CallPlan(masked=True, training=True, key=7, members=1)
    out = masked_lora_delta(x, a, b, None, 2.0, plan, ctl, variant.slices, result)
    assert out.dtype == torch.float32
    mask = ctl.masks(plan, 1, x.device, a.dtype)
    torch.testing.assert_close(out, result.float() + reference_delta(x, a, b, None, 2.0, mask, variant.slices, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the fused matmul runs in bf16
        out = masked_lora_delta(x, a, b, None, 2.0, plan, ctl, variant.slices, result)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), result.float() + reference_delta(x, a, b, None, 2.0, mask,
                                                                               variant.slices, 1),
                               atol=0.1, rtol=0.02)


@pytest.mark.parametrize("strategy", ["ab", "a", "b", "rank"])
@pytest.mark.parametrize("extra", [{}, {"samples": 3}, {"mask_scope": "example"}, {"rescale": True}],
                         ids=["s1", "s3", "example", "rescale"])
def test_all_layers_precomputed_equal_each_layer_masking_its_own_weights(tiny_bert, strategy, extra):
    """The pre-hook builds every layer's masked A/B (scaling folded in) in a few foreach calls; the result and the
    gradients equal each layer slicing the mask and masking its own weights."""
    inputs = {"input_ids": torch.randint(0, 120, (4, 10), generator=torch.Generator().manual_seed(0)),
              "labels": torch.tensor([0, 1, 2, 1])}
    outs = []
    for precompute in (True, False):
        model = tiny_bert()
        # distinct scalings per layer, so a misplaced scale cannot cancel out
        for i, module in enumerate(m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A):
            module.scaling["default"] = 1.0 + 0.25 * i
        loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.5, strategy=strategy, seed=4, **extra))
        ctl = loradrop.get_controller(model)
        if not precompute:
            ctl.precompute.disable()  # every layer masks its own weights
        model.train()
        loss = model(**inputs).loss
        assert (ctl._plan.weights is not None) == precompute
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        outs.append((loss.detach(), grads))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    assert outs[0][1].keys() == outs[1][1].keys()
    for name in outs[0][1]:
        torch.testing.assert_close(outs[0][1][name], outs[1][1][name])


def test_no_grad_precompute_respects_its_memory_budget(tiny_bert, monkeypatch):
    """Under no_grad the masked copies of all layers are held at once only within a budget; past it every layer
    masks its own weights (transient copies), with the same outputs."""
    import loradrop.precompute as precompute

    model = tiny_bert()
    loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=0.5, seed=4))
    ctl = loradrop.get_controller(model)
    inputs = {"input_ids": torch.randint(0, 120, (3, 8), generator=torch.Generator().manual_seed(0))}
    model.eval()
    with torch.no_grad(), ctl.ensemble(ctl.ensemble_key(1), 4, 0):
        held = model(**inputs).logits
        assert ctl._plan.weights is not None
        monkeypatch.setattr(precompute, "NO_GRAD_PRECOMPUTE_ELEMENTS", 10)
        ctl.precompute.clear()
        per_layer = model(**inputs).logits
        assert ctl._plan.weights is None
    torch.testing.assert_close(per_layer, held)
