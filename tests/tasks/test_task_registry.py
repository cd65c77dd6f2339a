"""Registry, data-root resolution, hub fallback and generic argument errors."""

from __future__ import annotations

import datasets
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from loradrop.tasks import (
    DATA_DIR_ENV,
    KINDS,
    TASKS,
    DataUnavailableError,
    TaskSpec,
    compute_metrics,
    find_data_root,
    get_metadata,
    get_task,
    load_task_data,
    make_compute_metrics,
    split_indices,
)
from loradrop.tasks.base import require_data_root

EXPECTED = {
    "cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte",
    "squad", "squad_v2", "alpaca", "lima", "mmlu", "tweets",
    "arc_easy", "arc_challenge", "openbookqa", "boolq", "winogrande_s", "winogrande_m", "piqa",
    "mmlu_college_chemistry", "mmlu_college_physics",
}


def test_registry_contents():
    assert set(TASKS) == EXPECTED
    for name, spec in TASKS.items():
        assert isinstance(spec, TaskSpec) and spec.name == name
        assert spec.kind in KINDS
        assert spec.main_metric in spec.metric_names
        assert spec.loader and spec.preprocessor and spec.metrics
    assert TASKS["cola"].metric_names == ("matthews_correlation",)
    assert TASKS["stsb"].kind == "regression" and TASKS["stsb"].metric_names == ("pearson", "spearman")
    assert TASKS["mrpc"].metric_names == ("accuracy", "f1") and TASKS["qqp"].metric_names == ("accuracy", "f1")
    assert TASKS["mnli"].label_names == ("entailment", "neutral", "contradiction")
    assert TASKS["rte"].label2id == {"entailment": 0, "not_entailment": 1}
    assert TASKS["squad"].kind == "span" and TASKS["squad"].metric_names == ("exact_match", "f1")
    assert TASKS["alpaca"].kind == "causal_lm"
    assert TASKS["tweets"].num_labels == 3
    assert TASKS["mnli"].text_columns == ("premise", "hypothesis")


def test_get_task_aliases_and_errors():
    assert get_task("SST-2") is TASKS["sst2"]
    assert get_task("STS-B") is TASKS["stsb"]
    assert get_task(TASKS["rte"]) is TASKS["rte"]
    with pytest.raises(ValueError, match=r"unknown task 'imdb'.*allowed.*'cola'"):
        get_task("imdb")
    with pytest.raises(ValueError, match="unknown task"):
        get_task(3)


def test_taskspec_validation():
    with pytest.raises(ValueError, match="kind must be one of"):
        TaskSpec("x", "glue", "ranking", 2, ("a", "b"), ("t",), ("accuracy",), "accuracy")
    with pytest.raises(ValueError, match="main_metric"):
        TaskSpec("x", "glue", "classification", 2, ("a", "b"), ("t",), ("accuracy",), "f1")


def test_data_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert find_data_root() == tmp_path
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "missing"))
    assert find_data_root() is None
    with pytest.raises(ValueError, match=DATA_DIR_ENV):
        require_data_root()
    with pytest.raises(ValueError, match=DATA_DIR_ENV):
        load_task_data("rte")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_task_data("rte", tmp_path / "nope")
    with pytest.raises(ValueError, match="does not exist"):
        load_task_data("rte", "/definitely/not/here")
    with pytest.raises(ValueError, match="seed"):
        load_task_data("rte", tmp_path, seed=-1)
    with pytest.raises(ValueError, match="no hub loader"):
        load_task_data("tweets", "someone/tweets")


def test_bad_subsample_sizes(glue_dir):
    with pytest.raises(ValueError, match="max_train_samples"):
        load_task_data("rte", glue_dir, max_train_samples=0)
    with pytest.raises(ValueError, match="max_eval_samples"):
        load_task_data("rte", glue_dir, max_eval_samples=-3)


def test_hub_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataUnavailableError, match="--data-dir"):
        load_task_data("rte", "nyu-mll/glue")
    with pytest.raises(DataUnavailableError, match="--data-dir"):
        load_task_data("squad", "rajpurkar/squad")


def _allow_hub(monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False, raising=False)


def test_hub_connection_error(monkeypatch):
    _allow_hub(monkeypatch)

    def fail(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(DataUnavailableError, match="local --data-dir"):
        load_task_data("rte", "glue")


def test_hub_splits_are_normalized(monkeypatch):
    """A hub GLUE dataset (mocked, same schema as nyu-mll/glue) loses its unlabeled test split."""
    _allow_hub(monkeypatch)
    calls = []
    feats = Features({"premise": Value("string"), "hypothesis": Value("string"),
                      "label": ClassLabel(names=["entailment", "neutral", "contradiction"]), "idx": Value("int32")})

    def split(n, label):
        return Dataset.from_dict({"premise": ["p"] * n, "hypothesis": ["h"] * n, "label": [label] * n,
                                  "idx": list(range(n))}, features=feats)

    def fake_load(name, config=None):
        calls.append((name, config))
        return DatasetDict({"train": split(6, 1), "validation_matched": split(3, 0),
                            "validation_mismatched": split(2, 2), "test_matched": split(4, -1)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    data = load_task_data("mnli", "glue")
    assert calls == [("nyu-mll/glue", "mnli")]
    assert {k: len(v) for k, v in data.items()} == {"train": 6, "validation": 3, "validation_mismatched": 2}
    assert get_metadata(data)["source"] == "hub:nyu-mll/glue"


def test_hub_without_validation_split(monkeypatch):
    _allow_hub(monkeypatch)
    feats = Features({"sentence": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    train = Dataset.from_dict({"sentence": [f"s{i}" for i in range(20)], "label": [i % 2 for i in range(20)]},
                              features=feats)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: DatasetDict({"train": train}))
    data = load_task_data("sst2", "someone/sst2-copy", validation_fraction=0.3)
    assert {k: len(v) for k, v in data.items()} == {"train": 14, "validation": 6}  # 3 per class
    assert "held out from hub train" in get_metadata(data)["split_notes"]["validation"]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: DatasetDict({"train": train.rename_column(
        "sentence", "text")}))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['sentence'\]"):
        load_task_data("sst2", "someone/sst2-copy")


def test_split_indices_properties():
    labels = [0] * 30 + [1] * 70
    keep, held = split_indices(100, 0.2, 3, strata=labels)
    assert len(held) == 20 and sorted([*keep, *held]) == list(range(100))
    assert sum(labels[i] for i in held) == 14  # stratified: 70 % of 20
    again_keep, again_held = split_indices(100, 0.2, 3, strata=labels)
    assert (held == again_held).all() and (keep == again_keep).all()
    assert not (split_indices(100, 0.2, 4, strata=labels)[1] == held).all()
    groups = [i // 10 for i in range(100)]
    keep, held = split_indices(100, 0.25, 0, groups=groups)
    assert {groups[i] for i in keep}.isdisjoint({groups[i] for i in held})
    with pytest.raises(ValueError, match="fraction"):
        split_indices(10, 1.5, 0)
    with pytest.raises(ValueError, match="cannot split"):
        split_indices(1, 0.5, 0)


def test_make_compute_metrics():
    import numpy as np
    from transformers import EvalPrediction

    fn = make_compute_metrics("mrpc")
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    out = fn(EvalPrediction(predictions=(logits,), label_ids=np.array([1, 0, 0])))
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert out == compute_metrics("mrpc", [1, 0, 1], [1, 0, 0])
    with pytest.raises(ValueError, match="postprocess_squad"):
        make_compute_metrics("squad")


def test_data_dir_type():
    with pytest.raises(ValueError, match="data_dir must be"):
        load_task_data("rte", 123)  # type: ignore[arg-type]
