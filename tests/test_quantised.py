"""LoRA Dropout on PEFT's bitsandbytes LoRA layers (QLoRA 4-bit nf4, 8-bit), on bitsandbytes' CPU backend.

Skipped when bitsandbytes is not installed (it is not in the default install; ``pip install loradrop[qlora]``).
The quantised bases are real ``bnb.nn.Linear4bit`` / ``Linear8bitLt`` layers, wrapped by PEFT's own
``lora.bnb`` classes; nothing is faked. The contract is that of ``lora.Linear`` (tests/test_matrix.py):

- p = 0 is bit for bit plain PEFT QLoRA (outputs and gradients, train and eval, with the usual float32 adapter
  over a bfloat16 compute dtype, and under autocast), merges included;
- the masked update is the written-out formula (members batched, ``samples=N``), added the way PEFT's bnb layers
  add (cast to the base output's dtype first); dropped output features leave the output exactly the base's;
- eval uses the expected update; save/load restores it; merging folds the expectation into the quantised weight.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import loradrop
from loradrop import LoraDropoutConfig
from loradrop.masks import STREAM_TRAIN, derive_key, keep_mask

bnb = pytest.importorskip("bitsandbytes",
                          reason="bitsandbytes is not installed (optional: pip install 'loradrop[qlora]')")

IN, HIDDEN, OUT, RANK, P = 64, 128, 64, 4, 0.5  # bitsandbytes' CPU 4-bit kernels need multiples of 32
KINDS = ("4bit", "8bit")


class QuantMLP(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        dense = [nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, OUT)]
        layers = []
        for lin in dense:
            if kind == "4bit":
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=torch.bfloat16,
                                      quant_type="nf4")
            else:
                q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, has_fp16_weights=False)
            q.load_state_dict(lin.state_dict())
            layers.append(q.to("cpu"))  # quantises
        self.lin0, self.lin1 = layers
        self.act = nn.ReLU()
        # what transformers sets on a model loaded with BitsAndBytesConfig; PEFT dispatches its bnb layers on it
        setattr(self, "is_loaded_in_4bit" if kind == "4bit" else "is_loaded_in_8bit", True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.act(self.lin0(x)))


def plain(kind: str, targets: tuple[str, ...] = ("lin0", "lin1")) -> PeftModel:
    config = LoraConfig(target_modules=list(targets), r=RANK, lora_alpha=8, init_lora_weights=False)
    return get_peft_model(QuantMLP(kind), config)


def ours(kind: str, targets: tuple[str, ...] = ("lin0", "lin1"), **config) -> PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return loradrop.apply_lora_dropout(plain(kind, targets), LoraDropoutConfig(**{"p": P, "seed": 3, **config}))


def inputs(rows: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, IN, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def quiet(fn, *args):
    with warnings.catch_warnings():  # bitsandbytes: "inputs will be cast from bfloat16 to float16", merge rounding
        warnings.simplefilter("ignore")
        return fn(*args)


@pytest.mark.parametrize("autocast", [False, True], ids=["no-autocast", "autocast"])
@pytest.mark.parametrize("kind", KINDS)
def test_p0_is_bit_identical_to_plain_peft_qlora(kind, autocast):
    ref = plain(kind)
    mine = ours(kind, p=0.0)
    layer = mine.base_model.model.lin0
    assert type(layer).__module__ == "peft.tuners.lora.bnb"
    assert type(layer.lora_variant["default"]).__name__ == "LoraDropoutBnbVariant"
    assert layer.lora_A["default"].weight.dtype == torch.float32  # the adapter's dtype; the base computes in bf16
    x = inputs()
    grad_out = torch.randn(4, OUT, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for model in (ref, mine):
            model.train()
            quiet(lambda m=model: (m(x) * grad_out).float().sum().backward())
        assert torch.equal(quiet(ref, x), quiet(mine, x))
        for (name, p_ref), (_, p_mine) in zip(ref.named_parameters(), mine.named_parameters()):
            if p_ref.requires_grad:
                assert torch.equal(p_ref.grad, p_mine.grad), name
        ref.eval(), mine.eval()
        with torch.no_grad():
            assert torch.equal(quiet(ref, x), quiet(mine, x))


def test_the_cast_order_matters_for_parity():
    """Why the bnb variant exists: adding the float32 update to the bfloat16 base output and casting after (what
    lora.Linear does) gives other bits than PEFT's bnb order (cast the update, then add)."""
    model = plain("4bit", ("lin0",))
    layer = model.base_model.model.lin0
    x = inputs(32)
    with torch.no_grad():
        result = layer.base_layer(x)
        update = layer.lora_B["default"](layer.lora_A["default"](x.float())) * layer.scaling["default"]
        peft_order = result + update.to(result.dtype)
        assert torch.equal(quiet(layer, x), peft_order)
        assert not torch.equal((result + update).to(result.dtype), peft_order)


def member_reference(model: PeftModel, x: torch.Tensor, key: int, members: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lin0's output per member-major row, the dropped-output-feature mask per row), written out from the masks."""
    ctl = loradrop.get_controller(model)
    layer = model.base_model.model.lin0
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    sl = ctl.slices[0]
    keep = keep_mask(key, torch.arange(members), torch.arange(ctl.num_features), P)
    rows = x.shape[0] // members
    outs, dropped = [], []
    for m in range(members):
        x_m = x[m * rows:(m + 1) * rows]
        a_m = a * keep[m, sl.a[0]:sl.a[1]][None, :]
        b_m = b * keep[m, sl.b[0]:sl.b[1]][:, None]
        base_out = layer.base_layer(x_m)
        outs.append(base_out + (s * (x_m.float() @ a_m.T) @ b_m.T).to(base_out.dtype))
        dropped.append((keep[m, sl.b[0]:sl.b[1]] == 0).expand(rows, -1))
    return torch.cat(outs), torch.cat(dropped)


@pytest.mark.parametrize("kind", KINDS)
def test_masked_members_follow_the_formula(kind):
    model = ours(kind, ("lin0",), samples=3)
    ctl = loradrop.get_controller(model)
    layer = model.base_model.model.lin0
    seen = []
    layer.register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
    model.train()
    key = derive_key(ctl.seed, STREAM_TRAIN, ctl.step)
    x = inputs()
    with torch.no_grad():
        quiet(model, x)
        x_rep, out = seen[-1]
        assert x_rep.shape[0] == 12  # the batch, repeated for 3 members, in one call
        want, dropped = member_reference(model, x_rep, key, 3)
        base_out = layer.base_layer(x_rep)
    torch.testing.assert_close(out, want, rtol=1e-2, atol=1e-2)  # bf16 output: a rounding step apart at most
    assert dropped.any() and (~dropped).any()
    assert torch.equal(out[dropped], base_out[dropped])  # dropped output features: exactly the quantised base
    assert not torch.equal(out[:4], out[4:8])  # members differ


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_the_adapter_through_the_quantised_base(kind):
    model = ours(kind, samples=2)
    model.train()
    loss = quiet(model, inputs()).float().pow(2).mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 4 and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
                                   for g in grads.values())


@pytest.mark.parametrize("kind", KINDS)
def test_eval_uses_the_expected_update(kind):
    model = ours(kind, ("lin0",))
    layer = model.base_model.model.lin0
    model.eval()
    x = inputs()
    with torch.no_grad():
        out = quiet(layer, x)
        base_out = layer.base_layer(x)
        after_a = layer.lora_B["default"](layer.lora_A["default"](x.float()))
        expected = after_a * (layer.scaling["default"] * (1 - P) ** 2)  # PEFT's op order, the factor on the scaling
        assert torch.equal(out, base_out + expected.to(base_out.dtype))
        update = after_a * layer.scaling["default"]
        raw = base_out + update.to(base_out.dtype)
        assert (out.float() - raw.float()).abs().max() > 0.05  # the expectation is not the raw update


@pytest.mark.parametrize("kind", KINDS)
def test_save_load(kind, tmp_path):
    model = ours(kind, samples=2)
    model.train()
    quiet(model, inputs())
    model.save_pretrained(tmp_path / "a")
    restored = loradrop.from_pretrained(QuantMLP(kind), tmp_path / "a")
    assert loradrop.get_mask_state(restored) == loradrop.get_mask_state(model)
    x = inputs()
    model.train(), restored.train()
    assert torch.equal(quiet(restored, x), quiet(model, x))  # the same masks, continued
    model.eval(), restored.eval()
    with torch.no_grad():
        assert torch.equal(quiet(restored, x), quiet(model, x))


@pytest.mark.parametrize("kind", KINDS)
def test_merge_folds_the_expectation_into_the_quantised_weight(kind, tmp_path):
    """merge_and_unload re-quantises W + f * s * B A; it equals PEFT merging the exported adapter (B * f).

    (Merges run before any no_grad eval forward: on CPU, bitsandbytes then repacks 4-bit weights into a layout that
    PEFT's own merge does not dequantise correctly, for plain PEFT as well.)"""
    model = ours(kind)
    loradrop.export_adapter(model, tmp_path / "export")
    served = PeftModel.from_pretrained(QuantMLP(kind), str(tmp_path / "export"))
    merged, served_merged = quiet(model.merge_and_unload), quiet(served.merge_and_unload)
    raw_merged = quiet(plain(kind).merge_and_unload)
    for name in ("lin0", "lin1"):
        weight = getattr(merged, name).weight
        assert type(weight).__module__.startswith("bitsandbytes")  # still quantised
        assert torch.equal(weight.data, getattr(served_merged, name).weight.data), name
        assert not torch.equal(weight.data, getattr(raw_merged, name).weight.data), name


@pytest.mark.parametrize("kind", KINDS)
def test_p0_merge_is_plain_peft_merge(kind):
    ref, mine = plain(kind), ours(kind, p=0.0)
    for model in (ref, mine):
        quiet(model.merge_adapter)
    for name in ("lin0", "lin1"):
        w_ref = getattr(ref.base_model.model, name).base_layer.weight
        w_mine = getattr(mine.base_model.model, name).base_layer.weight
        assert torch.equal(w_ref.data, w_mine.data), name
    x = inputs()
    ref.eval(), mine.eval()
    with torch.no_grad():
        assert torch.equal(quiet(ref, x), quiet(mine, x))
        quiet(ref.unmerge_adapter), quiet(mine.unmerge_adapter)
        assert torch.equal(quiet(ref, x), quiet(mine, x))


def test_dora_on_a_quantised_layer_is_refused_with_the_reason():
    config = LoraConfig(target_modules=["lin0"], r=RANK, use_dora=True)
    model = quiet(get_peft_model, QuantMLP("4bit"), config)
    with pytest.raises(ValueError, match="DoraLinearVariant"):
        loradrop.apply_lora_dropout(model, LoraDropoutConfig(p=P))
    assert loradrop.model._find_controller(model) is None  # refused before anything changed
