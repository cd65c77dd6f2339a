"""Property-based tests of the command line (hypothesis): any values for the numeric flags either parse into
validated settings or are refused as a usage error (argparse's exit 2, or one `SettingsError`), never anything
else; valid settings round-trip through their record."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loradrop.app import TrainSettings
from loradrop.cli import build_parser, settings_from_args
from loradrop.errors import SettingsError

NUMBERS = st.one_of(st.integers(-10, 10_000), st.floats(allow_nan=True, allow_infinity=True, width=32),
                    st.sampled_from(["nan", "inf", "-1", "1e30", "0", "abc", ""]))
FLAGS = {"--p": NUMBERS, "--samples": NUMBERS, "--lr": NUMBERS, "--epochs": NUMBERS, "--ensemble": NUMBERS,
         "--batch-size": NUMBERS, "--max-seq-len": NUMBERS, "--seed": NUMBERS, "--alpha": NUMBERS,
         "--holdout-fraction": NUMBERS, "--peft-dropout": NUMBERS, "--chunk-size": NUMBERS,
         "--strategy": st.sampled_from(["ab", "a", "b", "rank", "input", "rows"]),
         "--test-ensemble": st.sampled_from(["auto", "masks", "mc_dropout", "none", "deep"])}
PARSER = build_parser()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional=FLAGS))
def test_any_flag_values_parse_or_are_refused_cleanly(values: dict) -> None:
    argv = ["train", "--task", "rte", "--output", "out"]
    for flag, value in values.items():
        argv += [flag, str(value)]
    try:
        args = PARSER.parse_args(argv)
    except SystemExit as exit_:  # argparse: bad type or choice, exit status 2 with usage
        assert exit_.code == 2
        return
    try:
        parsed = settings_from_args(args)
    except SettingsError as err:
        assert err.problems and all(isinstance(p, str) and p for p in err.problems)
        return
    assert isinstance(parsed, TrainSettings)
    assert 0 <= parsed.p < 1 and parsed.samples >= 1 and parsed.lr > 0 and math.isfinite(parsed.lr)
    assert parsed.ensemble >= 0 and parsed.batch_size >= 1 and parsed.seed >= 0
    assert TrainSettings.from_dict(parsed.to_dict()) == parsed


@pytest.fixture(autouse=True)
def _quiet(capsys):
    yield
    capsys.readouterr()  # argparse prints usage for refused values
