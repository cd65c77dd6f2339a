"""One table-driven matrix: every layer handler x strategy x mask scope, checked for the same properties.

- p = 0 is bit-identical to plain PEFT (outputs and gradients, train and eval);
- the masked update is exactly the written-out formula for the drawn masks, and its zero pattern is the union of
  the dropped input features (columns of A, or dropped input elements for "input") and dropped output features
  (rows of B); "rank" drops whole rank components;
- eval mode uses the expected update (the strategy's factor times the full update);
- gradients reach the adapter weights only, equal the formula's gradients, and are exactly zero on features every
  member dropped;
- with ``samples=N`` the training loss is the mean of the N members' losses (each replayed alone);
- save / load (``save_pretrained`` + `loradrop.from_pretrained`) keeps settings, mask stream and outputs.

Adding a layer type is one row in HANDLERS: how to build a PeftModel around `Head` with that layer, and how to read
its update as ``s * B @ A``. DoRA rows (``use_dora=True``) also say how to read W0 and the magnitude m: their reference
is DoRA's formula ``m / ||W0 + s B_m A_m||_row * (W0 + s B_m A_m) x`` (norm detached) with each member's masked
factors, and their zero pattern is read from the update's direction part (DoRA rescales whole rows).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import loradrop
from loradrop import MASK_SCOPES, STRATEGIES, LoraDropoutConfig
from loradrop.masks import STREAM_INPUT, STREAM_TRAIN, derive_key, keep_mask, uniform

IN, OUT, RANK, P = 12, 10, 4, 0.5
FACTOR = {"ab": (1 - P) ** 2, "a": 1 - P, "b": 1 - P, "rank": 1 - P, "input": 1.0}  # E[masked] / full update


class Head(nn.Module):
    """One adapted projection; with `labels` it returns the mean squared error (a loss computed inside the model)."""

    def __init__(self, conv1d: bool = False) -> None:
        super().__init__()
        # transformers' GPT-2 Conv1D(nf=out, nx=in): y = x W + b with W stored (in, out)
        self.proj = Conv1D(OUT, IN) if conv1d else nn.Linear(IN, OUT)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        y = self.proj(x)
        return y if labels is None else F.mse_loss(y, labels)


def base_model(conv1d: bool = False) -> Head:
    torch.manual_seed(0)  # the same base weights every time (the save/load check loads onto a fresh one)
    return Head(conv1d)


def conv1d_base() -> Head:
    return base_model(conv1d=True)


# ------------------------------------------------------------------------------------------------ layer handlers
@dataclass(frozen=True)
class Handler:
    name: str
    make: Callable[[], PeftModel]  # a PeftModel around base_model() whose adapter update is non-zero
    parts: Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor, float]]  # layer -> (A, B, s): update s * B @ A
    base: Callable[[], nn.Module] = base_model  # a fresh base (the save/load check loads onto it)
    dora: Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor]] | None = None  # layer -> (W0 as (out, in), m)


def make_lora() -> PeftModel:
    model = get_peft_model(base_model(), LoraConfig(r=RANK, lora_alpha=8, target_modules=["proj"], lora_dropout=0.0,
                                                    init_lora_weights=False))
    return model


def make_conv1d() -> PeftModel:
    """GPT-2 style: PEFT's lora.Linear around transformers' Conv1D, fan_in_fan_out=True."""
    return get_peft_model(conv1d_base(), LoraConfig(r=RANK, lora_alpha=8, target_modules=["proj"], lora_dropout=0.0,
                                                    init_lora_weights=False, fan_in_fan_out=True))


def lora_parts(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]


def make_dora(conv1d: bool = False) -> PeftModel:
    model = get_peft_model(base_model(conv1d), LoraConfig(r=RANK, lora_alpha=8, target_modules=["proj"], use_dora=True,
                                                          lora_dropout=0.0, init_lora_weights=False,
                                                          fan_in_fan_out=conv1d))
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():  # PEFT starts m at ||W0 + s B A|| (m / norm = 1): move it so the magnitude matters
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(0.5 + torch.rand(param.shape, generator=gen))
    return model


def dora_parts(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    weight = layer.base_layer.weight
    weight = weight.T if isinstance(layer.base_layer, Conv1D) else weight  # Conv1D stores (in, out)
    return weight.detach(), layer.lora_magnitude_vector["default"].weight


def make_adalora() -> PeftModel:
    model = get_peft_model(base_model(), AdaLoraConfig(target_modules=["proj"], init_r=RANK, target_r=2, total_step=10,
                                                       lora_alpha=8, lora_dropout=0.0))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # PEFT starts Λ at zero (a zero update); make every factor non-zero
        for name, param in model.named_parameters():
            if "lora_E" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
            elif "lora_A" in name or "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
    return model


def adalora_parts(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    # P diag(Λ) Q * s / ranknum: Λ folded into Q (masks never touch Λ)
    a = layer.lora_A["default"] * layer.lora_E["default"]
    return a, layer.lora_B["default"], layer.scaling["default"] / (float(layer.ranknum["default"]) + 1e-5)


HANDLERS = [
    Handler("lora", make_lora, lora_parts),
    Handler("conv1d", make_conv1d, lora_parts, conv1d_base),
    Handler("adalora", make_adalora, adalora_parts),
    Handler("dora", make_dora, lora_parts, dora=dora_parts),
    Handler("dora-conv1d", lambda: make_dora(conv1d=True), lora_parts, conv1d_base, dora=dora_parts),
]

CASES = list(itertools.product(HANDLERS, STRATEGIES, MASK_SCOPES))
IDS = [f"{h.name}-{strategy}-{scope}" for h, strategy, scope in CASES]
matrix = pytest.mark.parametrize(("handler", "strategy", "scope"), CASES, ids=IDS)


def layer_of(model: PeftModel) -> nn.Module:
    return model.base_model.model.proj


def with_lora_dropout(handler: Handler, strategy: str, scope: str, **config) -> PeftModel:
    config = {"p": P, "seed": 3, **config}
    return loradrop.apply_lora_dropout(handler.make(), LoraDropoutConfig(strategy=strategy, mask_scope=scope,
                                                                         **config))


def adapter_parameters(model: PeftModel) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------ the reference
@dataclass
class Keep:
    """The keep decisions of one training call, per row of the (member-major) layer input."""

    x: torch.Tensor  # (rows, IN): input elements ("input" strategy), 1/(1-p) where kept
    a: torch.Tensor  # (rows, IN): columns of A
    b: torch.Tensor  # (rows, OUT): rows of B
    rank: torch.Tensor  # (rows, RANK): rank components


def drawn_masks(model: PeftModel, rows: int, members: int, key: int) -> Keep:
    """The masks of a training call with `rows` layer rows in `members` members, drawn from the mask functions."""
    ctl = loradrop.get_controller(model)
    strategy, slices = ctl.config.strategy, ctl.slices[0]
    member_of_row = torch.arange(rows) // (rows // members)
    keep = keep_mask(key, torch.arange(members), torch.arange(ctl.num_features), P)[member_of_row]

    def side(rng: tuple[int, int] | None, size: int) -> torch.Tensor:
        return keep[:, rng[0]:rng[1]] if rng is not None else torch.ones(rows, size)

    keep_x = torch.ones(rows, IN)
    if strategy == "input":
        u = uniform(derive_key(key, STREAM_INPUT, 0), torch.arange(members), torch.arange(rows * IN // members))
        keep_x = (u >= P).float().view(rows, IN) / (1 - P)
    return Keep(x=keep_x, a=side(slices.a, IN), b=side(slices.b, OUT), rank=side(slices.rank, RANK))


def all_kept(rows: int) -> Keep:
    return Keep(x=torch.ones(rows, IN), a=torch.ones(rows, IN), b=torch.ones(rows, OUT), rank=torch.ones(rows, RANK))


def reference_delta(x: torch.Tensor, parts: tuple[torch.Tensor, torch.Tensor, float], keep: Keep,
                    dora: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """s * B_m A_m x_m for every row, written out row by row: A_m = A * keep_a (columns) * keep_rank (rows),
    B_m = B * keep_b (rows), x_m = x * keep_x.

    DoRA (`dora` = (W0, m)): the output minus the base output W0 x is ``m / ||V_m||_row * V_m x_m - W0 x_m`` with
    ``V_m = W0 + s B_m A_m`` and the norm a constant (detached, DoRA paper section 4.3). For "input" (x_m = dropped
    x, A_m = A, B_m = B) that is PEFT's DoRA with lora_dropout: the dropped input enters W0's part too."""
    a, b, s = parts
    rows = []
    for i in range(x.shape[0]):
        a_m, b_m = member_factors(a, b, keep, i)
        x_m = x[i] * keep.x[i]
        if dora is None:
            rows.append(s * (x_m @ a_m.T @ b_m.T))
            continue
        weight, magnitude = dora
        v = weight + s * (b_m @ a_m)
        rows.append(magnitude / member_norm(weight, a, b, s, keep, i) * (v @ x_m) - weight @ x_m)
    return torch.stack(rows)


def member_factors(a: torch.Tensor, b: torch.Tensor, keep: Keep, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    return a * keep.a[i][None, :] * keep.rank[i][:, None], b * keep.b[i][:, None]


def member_norm(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float, keep: Keep, i: int) -> torch.Tensor:
    """DoRA's ||W0 + s B_m A_m|| per output row for row i's member, a constant (no gradient)."""
    a_m, b_m = member_factors(a, b, keep, i)
    v = (weight + s * (b_m @ a_m)).detach()
    return torch.sqrt((v * v).sum(1))


def dora_args(handler: Handler, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    return handler.dora(layer) if handler.dora is not None else None


def train_key(model: PeftModel) -> int:
    """The mask key of the next training call."""
    ctl = loradrop.get_controller(model)
    return derive_key(ctl.seed, STREAM_TRAIN, ctl.step)


# ------------------------------------------------------------------------------------------------ the checks
@matrix
def test_p0_is_bit_identical_to_plain_peft(handler, strategy, scope):
    ref = handler.make()
    ours = with_lora_dropout(handler, strategy, scope, p=0.0)
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(1))
    g = torch.randn(5, OUT, generator=torch.Generator().manual_seed(2))
    for model in (ref, ours):
        model.train()
        (model(x) * g).sum().backward()
    assert torch.equal(ref(x), ours(x))
    ref_grads, our_grads = adapter_parameters(ref), adapter_parameters(ours)
    assert ref_grads.keys() == our_grads.keys()
    for name, param in ref_grads.items():
        assert torch.equal(param.grad, our_grads[name].grad), name
    ref.eval(), ours.eval()
    assert torch.equal(ref(x), ours(x))


@matrix
def test_masked_update_and_its_zero_pattern(handler, strategy, scope):
    model = with_lora_dropout(handler, strategy, scope, samples=2)
    layer = layer_of(model)
    model.train()
    eye = torch.eye(IN)  # row j of the output is the update's column for input feature j
    key = train_key(model)
    delta = model(eye).detach() - layer.base_layer(eye.repeat(2, 1)).detach()  # (2 * IN, OUT), member-major
    rows = delta.shape[0]
    keep = drawn_masks(model, rows, 2 if scope == "batch" else rows, key)
    x = eye.repeat(2, 1)
    dora = dora_args(handler, layer)
    torch.testing.assert_close(delta, reference_delta(x, handler.parts(layer), keep, dora))
    if dora is not None:  # undo DoRA's row rescaling: the zero pattern is that of s B_m A_m x
        weight, magnitude = dora
        a, b, s = handler.parts(layer)
        norms = torch.stack([member_norm(weight, a, b, s, keep, i) for i in range(rows)])
        base = (x * keep.x) @ weight.T  # W0 x_m ("input": the dropped input)
        delta = (delta + base) * norms / magnitude.detach() - base
        delta = torch.where(delta.abs() < 1e-5, 0.0, delta)  # (rounding of the undo)

    feature = torch.arange(rows) % IN  # the input feature each row carries
    rows_idx = torch.arange(rows)
    dropped_in = (keep.a[rows_idx, feature] == 0) | (keep.x[rows_idx, feature] == 0)
    all_ranks_dropped = (keep.rank == 0).all(-1)
    expected_zero = (dropped_in | all_ranks_dropped)[:, None] | (keep.b == 0)
    assert torch.equal(delta == 0, expected_zero)
    if strategy != "rank":  # p = 0.5: some features dropped, some kept (the check is not vacuous)
        assert expected_zero.any() and (~expected_zero).any()
    members = loradrop.split_members(delta, 2)
    assert not torch.equal(members[0], members[1])  # each member draws its own masks


@matrix
def test_eval_uses_the_expected_update(handler, strategy, scope):
    model = with_lora_dropout(handler, strategy, scope)
    layer = layer_of(model)
    model.eval()
    x = torch.randn(4, IN, generator=torch.Generator().manual_seed(3))
    a, b, s = handler.parts(layer)
    with torch.no_grad():
        delta = model(x) - layer.base_layer(x)
        if handler.dora is None:
            torch.testing.assert_close(delta, FACTOR[strategy] * s * (x @ a.T @ b.T))
        else:  # DoRA of the expected update f s B A: its norm ||W0 + f s B A|| too
            want = reference_delta(x, (a, b, FACTOR[strategy] * s), all_kept(4), handler.dora(layer))
            torch.testing.assert_close(delta, want)
            if strategy != "input":  # the factor matters (the check is not vacuous)
                assert not torch.allclose(delta, reference_delta(x, (a, b, s), all_kept(4), handler.dora(layer)))
        assert torch.equal(model(x), model(x))  # no masks in eval: deterministic


@matrix
def test_gradients_reach_only_adapter_weights_and_follow_the_masks(handler, strategy, scope):
    model = with_lora_dropout(handler, strategy, scope, samples=2)
    layer = layer_of(model)
    model.train()
    x = torch.randn(3, IN, generator=torch.Generator().manual_seed(4))
    g = torch.randn(6, OUT, generator=torch.Generator().manual_seed(5))
    key = train_key(model)
    (model(x) * g).sum().backward()

    adapter = adapter_parameters(model)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(adapter) and with_grad
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None

    keep = drawn_masks(model, 6, 2 if scope == "batch" else 6, key)
    reference = (reference_delta(x.repeat(2, 1), handler.parts(layer), keep, dora_args(handler, layer)) * g).sum()
    names = sorted(adapter)
    for name, want in zip(names, torch.autograd.grad(reference, [adapter[n] for n in names])):
        torch.testing.assert_close(adapter[name].grad, want, msg=name)

    # features that every row dropped get exactly zero gradient (A's columns, B's rows, A's rows for "rank")
    a_weight = next(p for n, p in adapter.items() if "lora_A" in n)
    b_weight = next(p for n, p in adapter.items() if "lora_B" in n)
    assert (a_weight.grad[:, (keep.a == 0).all(0)] == 0).all()
    assert (b_weight.grad[(keep.b == 0).all(0)] == 0).all()
    assert (a_weight.grad[(keep.rank == 0).all(0)] == 0).all()
    if handler.name == "adalora" and strategy != "rank":
        lam = next(p for n, p in adapter.items() if "lora_E" in n)
        assert (lam.grad != 0).all()  # Λ is never masked


@matrix
def test_samples_loss_is_the_mean_of_member_losses(handler, strategy, scope):
    model = with_lora_dropout(handler, strategy, scope, samples=3)
    ctl = loradrop.get_controller(model)
    model.train()
    x = torch.randn(4, IN, generator=torch.Generator().manual_seed(6))
    labels = torch.randn(4, OUT, generator=torch.Generator().manual_seed(7))
    key = train_key(model)
    loss = model(x, labels=labels)
    members = []
    for m in range(3):  # replay member m alone: same key, member id m (batch scope) or its rows' ids (example)
        count, offset = (1, m) if scope == "batch" else (None, m * x.shape[0])
        with ctl.ensemble(key, count, offset):
            members.append(model(x, labels=labels))
    torch.testing.assert_close(loss, torch.stack(members).mean())
    assert len({float(v.detach()) for v in members}) > 1  # the members differ


@matrix
def test_save_load_round_trip(handler, strategy, scope, tmp_path):
    model = with_lora_dropout(handler, strategy, scope, samples=2, seed=11)
    x = torch.randn(3, IN, generator=torch.Generator().manual_seed(8))
    model.train()
    model(x)  # advance the mask stream
    loradrop.set_eval_mode(model, "raw")
    model.save_pretrained(tmp_path)

    restored = loradrop.from_pretrained(handler.base(), tmp_path)
    ctl, restored_ctl = loradrop.get_controller(model), loradrop.get_controller(restored)
    assert restored_ctl.config == ctl.config and restored_ctl.eval_mode == "raw"
    assert loradrop.get_mask_state(restored) == loradrop.get_mask_state(model)
    model.eval(), restored.eval()
    torch.testing.assert_close(restored(x), model(x))
    model.train(), restored.train()
    torch.testing.assert_close(restored(x), model(x))  # the next training masks are the same
    plain = PeftModel.from_pretrained(handler.base(), str(tmp_path))  # still a standard PEFT adapter
    torch.testing.assert_close(plain.eval()(x), copy.deepcopy(model).eval()(x))  # "raw": the unscaled update


@pytest.mark.parametrize("handler", [h for h in HANDLERS if h.name != "adalora"], ids=lambda h: h.name)
def test_merge_and_export_serve_the_eval_forward(handler, tmp_path):
    """merge_adapter, merge_and_unload and export_adapter (read back by plain PEFT) all give the eval forward, and that
    is not PEFT's own forward of the unscaled adapter (AdaLoRA's merge and export are tested in test_adalora.py)."""
    model = with_lora_dropout(handler, "ab", "batch", samples=2)
    x = torch.randn(3, IN, generator=torch.Generator().manual_seed(9))
    model.eval()
    expected = model(x).detach()
    assert not torch.allclose(expected, handler.make().eval()(x))
    model.merge_adapter()
    torch.testing.assert_close(model(x), expected)
    model.unmerge_adapter()
    torch.testing.assert_close(model(x), expected)
    torch.testing.assert_close(copy.deepcopy(model).merge_and_unload()(x), expected)
    loradrop.export_adapter(model, tmp_path / "adapter")
    served = PeftModel.from_pretrained(handler.base(), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(served(x), expected)


DORA_CASES = [case for case in CASES if case[0].dora is not None and case[1] != "input"]  # "input" masks x only


@pytest.mark.parametrize(("handler", "strategy", "scope"), DORA_CASES,
                         ids=[f"{h.name}-{s}-{c}" for h, s, c in DORA_CASES])
def test_dora_layer_masking_equals_the_all_layer_precompute(handler, strategy, scope):
    """A DoRA layer's own masking of A and B (the fallback) gives the outputs and gradients of the precomputed
    copies."""
    outputs, grads = [], []
    for own in (False, True):
        model = with_lora_dropout(handler, strategy, scope, samples=2)
        if own:
            loradrop.get_controller(model).precompute.disable()
        model.train()
        out = model(torch.randn(3, IN, generator=torch.Generator().manual_seed(10)))
        out.pow(2).sum().backward()
        outputs.append(out.detach())
        assert (loradrop.get_controller(model).precompute.layout is None) == own  # both paths really ran
        grads.append([p.grad for p in adapter_parameters(model).values()])
    torch.testing.assert_close(outputs[0], outputs[1])
    for grad, own_grad in zip(*grads):
        torch.testing.assert_close(grad, own_grad)
