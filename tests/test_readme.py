"""The README's quickstart is executed as written (in a temporary directory)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
    text = README.read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_the_two_commands():
    text = README.read_text()
    assert 'pip install -e ".[demo]" && canonwrap demo' in text
    assert 'python -m pytest -q tests' in text


def test_quickstart_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _blocks()[0]
    assert "cw.wrap(" in code and "cw.export_onnx" in code
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README is ours
    model, model2, x = namespace["model"], namespace["model2"], namespace["x"]
    out = namespace["out"]
    assert out.images.shape == x.shape and out.index.shape == (x.shape[0],)
    assert out.scores.shape == (x.shape[0], 8)
    import torch

    torch.testing.assert_close(model2(x), model(x), rtol=0, atol=0)
    assert (tmp_path / "digits.onnx").exists() and (tmp_path / "ckpt" / "model.safetensors").exists()
