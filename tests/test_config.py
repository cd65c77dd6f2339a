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
