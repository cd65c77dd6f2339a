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
