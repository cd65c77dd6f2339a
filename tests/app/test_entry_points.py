"""The documented Python entry points: the README's `loradrop.app` example runs as written (real MiniLM, real MRPC
slice), and `train` / `evaluate` return what they wrote."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_readme_app_example_runs(data_root: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from helpers import minilm_dir

    if minilm_dir() is None:
        pytest.skip("the real MiniLM weights are not installed")
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    code = next(b for b in blocks if "from loradrop.app import" in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    run, again, grid = namespace["run"], namespace["again"], namespace["grid"]
    written = json.loads((tmp_path / "runs" / "mrpc-quick" / "metrics.json").read_text())
    assert run.output == Path("runs/mrpc-quick") and run.metrics == written
    assert written["config"]["args"]["samples"] == 2 and written["train"]["global_step"] == 4
    assert {"accuracy", "f1", "ece", "nll", "brier"} <= written["eval"]["ensemble"].keys()
    assert again.metrics_file == run.output / "eval_metrics.json" and again.metrics["eval"]["ensemble"][
        "ensemble_size"] == 8
    assert [s.p for s in grid] == [0.1, 0.3] and all(s.samples == 2 for s in grid)
    out = capsys.readouterr().out
    assert "mrpc, validation split:" in out and "ensemble of 4" in out and "ensemble of 8" in out
