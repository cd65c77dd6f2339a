"""The layer computation: rescaling, the fused matmul paths against the formula written out per member, and the
all-layer precompute against each layer masking its own weights.

Mask semantics per layer handler x strategy x mask scope (zero patterns, eval, gradients, samples, save/load) are
checked in test_matrix.py."""

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


def test_rescale_scales_kept_entries(one_linear):
    p = 0.4
    loradrop.apply_lora_dropout(one_linear, LoraDropoutConfig(p=p, rescale=True, seed=2))
    one_linear.train()
    delta, _ = effective_delta(one_linear)
    kept = delta != 0
    torch.testing.assert_close(delta[kept].detach(), full_delta(one_linear)[kept] / (1 - p) ** 2)


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
