import pytest

from loradrop import LoraDropoutConfig
from loradrop.config import CONFIG_FILE_NAME, read_config_file


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"p": -0.1}, "p must be a float in [0, 1), got -0.1"),
        ({"p": 1.0}, "p must be a float in [0, 1), got 1.0"),
        ({"p": "0.5"}, "p must be a float in [0, 1), got '0.5'"),
        ({"samples": 0}, "samples must be an integer >= 1, got 0"),
        ({"samples": 2.0}, "samples must be an integer >= 1, got 2.0"),
        ({"strategy": "rows"}, "strategy must be one of ['ab', 'a', 'b', 'rank', 'input'], got 'rows'"),
        ({"mask_scope": "token"}, "mask_scope must be one of ['batch', 'example'], got 'token'"),
        ({"seed": -3}, "seed must be None or a non-negative integer, got -3"),
        ({"eval_mode": "mc"}, "eval_mode must be one of ['expected', 'raw'], got 'mc'"),
    ],
)
def test_bad_values_name_the_value_and_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError) as err:
        LoraDropoutConfig(**kwargs)
    assert str(err.value) == message


def test_rescale_must_be_bool():
    with pytest.raises(TypeError, match="rescale must be a bool, got 'yes'"):
        LoraDropoutConfig(rescale="yes")


@pytest.mark.parametrize(
    ("strategy", "rescale", "factor"),
    [("ab", False, 0.7**2), ("a", False, 0.7), ("b", False, 0.7), ("rank", False, 0.7), ("input", False, 1.0),
     ("ab", True, 1.0), ("a", True, 1.0)],
)
def test_expected_factor(strategy, rescale, factor):
    cfg = LoraDropoutConfig(p=0.3, strategy=strategy, rescale=rescale)
    assert cfg.expected_factor == pytest.approx(factor)


def test_round_trip_keeps_unknown_keys(tmp_path):
    cfg = LoraDropoutConfig(p=0.25, samples=3, strategy="a", mask_scope="example", rescale=True, seed=7)
    cfg.save(tmp_path, note="x")
    assert (tmp_path / CONFIG_FILE_NAME).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    assert LoraDropoutConfig.load(tmp_path) == cfg
    with pytest.warns(UserWarning, match=r"setting\(s\) \['future_option'\] are unknown to this loradrop version"):
        newer = LoraDropoutConfig.from_dict({**cfg.to_dict(), "future_option": 1})
    assert newer.extra == {"future_option": 1} and newer.p == 0.25


def test_load_without_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no loradrop_config.json"):
        LoraDropoutConfig.load(tmp_path)


def test_read_config_file_returns_settings_and_metadata(tmp_path):
    cfg = LoraDropoutConfig(p=0.25, seed=7)
    cfg.save(tmp_path, mask_state={"seed": 7, "step": 3}, eval_mode="raw")
    payload = read_config_file(tmp_path)
    assert payload["mask_state"] == {"seed": 7, "step": 3} and payload["eval_mode"] == "raw"
    assert LoraDropoutConfig.from_payload(payload) == cfg
    assert LoraDropoutConfig.from_payload(cfg.to_dict()) == cfg  # a bare settings dict (older files)


def test_read_config_file_names_the_file_when_it_is_not_valid(tmp_path):
    path = tmp_path / CONFIG_FILE_NAME
    path.write_text('{"loradrop_config": {"p": 0.5', encoding="utf-8")
    with pytest.raises(ValueError, match=f"{CONFIG_FILE_NAME}' is not valid JSON") as err:
        read_config_file(tmp_path)
    assert str(path) in str(err.value)
    with pytest.raises(ValueError, match="is not valid JSON"):
        LoraDropoutConfig.load(tmp_path)
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="holds a JSON list, not the object loradrop writes"):
        read_config_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="no loradrop_config.json"):
        read_config_file(tmp_path / "nowhere")


def test_unknown_keys_in_a_saved_file_warn_and_are_kept(tmp_path):
    import json

    LoraDropoutConfig(p=0.25, seed=7).save(tmp_path)
    path = tmp_path / CONFIG_FILE_NAME
    payload = json.loads(path.read_text())
    payload["loradrop_config"].update(future_option=1, other_future={"a": 2})
    path.write_text(json.dumps(payload))
    with pytest.warns(UserWarning, match=r"\['future_option', 'other_future'\] are unknown"):
        loaded = LoraDropoutConfig.load(tmp_path)
    assert loaded.extra == {"future_option": 1, "other_future": {"a": 2}} and loaded.p == 0.25
    loaded.save(tmp_path / "again")  # saving again keeps them (and loading warns again: still unknown)
    with pytest.warns(UserWarning, match="future_option"):
        assert LoraDropoutConfig.load(tmp_path / "again").extra == loaded.extra


def test_config_is_immutable_after_validation_and_copies_validate():
    import dataclasses

    cfg = LoraDropoutConfig(p=0.25, samples=2, seed=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.p = 2.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.samples = 0
    assert cfg.p == 0.25 and cfg.samples == 2
    copy = dataclasses.replace(cfg, p=0.3)
    assert copy.p == 0.3 and copy.samples == 2 and cfg.p == 0.25
    assert cfg.replace(strategy="a").strategy == "a"
    with pytest.raises(ValueError, match="p must be a float in \\[0, 1\\), got 2.0"):
        cfg.replace(p=2.0)
    assert hash(cfg) == hash(LoraDropoutConfig(p=0.25, samples=2, seed=1))  # hashable (extra is not hashed)


def test_config_of_an_applied_model_cannot_be_changed(one_linear):
    import dataclasses

    import loradrop

    loradrop.apply_lora_dropout(one_linear, LoraDropoutConfig(p=0.5, seed=0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        loradrop.get_controller(one_linear).config.p = 2.0
    assert loradrop.get_controller(one_linear).config.p == 0.5


def test_member_chunk_above_samples_is_clamped_with_a_warning():
    with pytest.warns(UserWarning, match="member_chunk=8 is larger than samples=4; .* clamped to 4"):
        cfg = LoraDropoutConfig(samples=4, member_chunk=8)
    assert cfg.member_chunk == 4 and cfg.chunks == [(0, 4)]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LoraDropoutConfig(samples=4, member_chunk=4).member_chunk == 4  # equal: no warning
        assert LoraDropoutConfig.from_dict(cfg.to_dict()) == cfg  # the stored value is the clamped one


def test_extra_must_be_a_dict():
    with pytest.raises(TypeError, match="extra must be a dict"):
        LoraDropoutConfig(extra=[1])
    with pytest.raises(TypeError, match="extra must be a dict"):
        LoraDropoutConfig.from_dict({"p": 0.5, "extra": "x"})
