"""The README's Python example runs as written (on the real MiniLM weights)."""

import re
from pathlib import Path

from helpers import minilm_dir


def test_readme_python_example_runs(tmp_path, monkeypatch):
    import pytest

    if minilm_dir() is None:
        pytest.skip("the real MiniLM weights are not installed")
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    out = namespace["out"]
    assert out.probs.shape == (3, 3) and out.mutual_information.shape == (3,)
    assert (tmp_path / "my-adapter" / "loradrop_config.json").is_file()
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()
