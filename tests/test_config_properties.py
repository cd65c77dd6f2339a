"""Property-based tests (hypothesis) of `LoraDropoutConfig` validation: every valid combination constructs, is
immutable and round-trips through to_dict / from_dict and save / load; every invalid value of any field raises
ValueError or TypeError whose message starts with the field's name."""

from __future__ import annotations

import dataclasses
import math
import tempfile
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loradrop import LoraDropoutConfig
from loradrop.config import EVAL_MODES, MASK_SCOPES, STRATEGIES

# ------------------------------------------------------------------------------------------------ valid settings
JSON_SCALARS = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=8)


@st.composite
def valid_settings(draw) -> dict:
    scope = draw(st.sampled_from(MASK_SCOPES))
    return {
        "p": draw(st.floats(0.0, 1.0, exclude_max=True) | st.just(0)),
        "samples": draw(st.integers(1, 64)),
        "strategy": draw(st.sampled_from(STRATEGIES)),
        "mask_scope": scope,
        "rescale": draw(st.booleans()),
        "seed": draw(st.none() | st.integers(0, 2**64)),
        "eval_mode": draw(st.sampled_from(EVAL_MODES)),
        "member_chunk": draw(st.none() | st.integers(1, 80)) if scope == "batch" else None,
        "extra": draw(st.dictionaries(st.text(min_size=1, max_size=8), JSON_SCALARS, max_size=2)),
    }


def build(settings_: dict) -> LoraDropoutConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # member_chunk > samples: clamped with a warning
        return LoraDropoutConfig(**settings_)


@settings(max_examples=200, deadline=None)
@given(valid_settings())
def test_valid_settings_construct_and_round_trip(values):
    cfg = build(values)
    assert cfg.p == float(values["p"]) and isinstance(cfg.p, float)
    chunk = values["member_chunk"]
    assert cfg.member_chunk == (None if chunk is None else min(chunk, values["samples"]))
    assert sum(size for _, size in cfg.chunks) == cfg.samples
    assert 0.0 < cfg.expected_factor <= 1.0 and 0.0 < cfg.expected_bias_factor <= 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # non-empty extra: "unknown settings" warning
        assert LoraDropoutConfig.from_dict(cfg.to_dict()) == cfg
        assert LoraDropoutConfig.from_payload({"loradrop_config": cfg.to_dict()}) == cfg
        with tempfile.TemporaryDirectory() as folder:
            cfg.save(folder, mask_state={"seed": 1, "step": 2})
            assert LoraDropoutConfig.load(folder) == cfg
    assert dataclasses.replace(cfg) == cfg and hash(dataclasses.replace(cfg)) == hash(cfg)


@settings(max_examples=50, deadline=None)
@given(valid_settings(), st.sampled_from([f.name for f in dataclasses.fields(LoraDropoutConfig)]))
def test_valid_configs_are_immutable(values, name):
    cfg = build(values)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, name, getattr(cfg, name))


# ------------------------------------------------------------------------------------------------ invalid values
NOT_A_NUMBER = st.none() | st.text(max_size=4) | st.lists(st.integers(), max_size=2) | st.booleans()
BAD = {
    "p": (st.floats(allow_nan=True).filter(lambda v: math.isnan(v) or not 0.0 <= v < 1.0)
          | st.integers().filter(lambda v: not 0 <= v < 1) | NOT_A_NUMBER),
    "samples": st.integers(max_value=0) | st.floats(allow_nan=True) | NOT_A_NUMBER,
    "strategy": st.text(max_size=6).filter(lambda v: v not in STRATEGIES) | st.integers() | st.none(),
    "mask_scope": st.text(max_size=6).filter(lambda v: v not in MASK_SCOPES) | st.integers() | st.none(),
    "rescale": st.integers() | st.floats(allow_nan=True) | st.text(max_size=4) | st.none(),
    "seed": st.integers(max_value=-1) | st.floats(allow_nan=True) | st.text(max_size=4) | st.booleans(),
    "eval_mode": st.text(max_size=6).filter(lambda v: v not in EVAL_MODES) | st.integers() | st.none(),
    "member_chunk": st.integers(max_value=0) | st.floats(allow_nan=True) | st.text(max_size=4) | st.booleans(),
    "extra": st.lists(st.integers(), max_size=2) | st.text(max_size=4) | st.integers(),
}


@st.composite
def one_bad_field(draw) -> tuple[dict, str]:
    values = draw(valid_settings())
    name = draw(st.sampled_from(sorted(BAD)))
    values[name] = draw(BAD[name])
    if name == "member_chunk":
        values["mask_scope"] = "batch"
    return values, name


@settings(max_examples=300, deadline=None)
@given(one_bad_field())
def test_any_invalid_value_names_its_field(case):
    values, name = case
    for make in (LoraDropoutConfig, lambda **kw: LoraDropoutConfig.from_dict(kw)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            with pytest.raises((ValueError, TypeError)) as err:
                make(**values)
        assert str(err.value).startswith(f"{name} "), (name, values[name], str(err.value))


@settings(max_examples=50, deadline=None)
@given(valid_settings(), st.integers(1, 8))
def test_member_chunk_with_example_scope_names_member_chunk(values, chunk):
    values.update(mask_scope="example", member_chunk=chunk)
    with pytest.raises(ValueError, match="^member_chunk applies to samples > 1 with mask_scope='batch'"):
        build(values)
