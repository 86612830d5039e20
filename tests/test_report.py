"""The evaluation report renders: JSON, self-contained HTML with every section, valid PNGs."""
import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from canonwrap.metrics import reliability_bins, risk_coverage
from canonwrap.report import SECTIONS, render_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _full_report():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 5, generator=g) * 3
    labels = torch.randint(0, 5, (200,), generator=g)
    probs = logits.softmax(-1)
    correct = (probs.argmax(-1) == labels).numpy()
    entropy = -(probs * probs.log()).sum(-1)
    cov, risk = risk_coverage(entropy, correct)
    return {
        "title": "test report",
        "meta": {"model": "tiny", "group": "C8"},
        "summary": {"c8_avg_acc": np.float32(0.93), "worst_angle_acc": 0.9, "auroc_entropy": float("nan")},
        "angles": {"angles": list(range(0, 360, 45)), "accuracy": {"wrapped": [0.95] * 8, "frozen": np.linspace(0.3, 0.9, 8)}},
        "per_element": {"elements": [f"rot{a}" for a in range(0, 360, 45)], "accuracy": {"wrapped": torch.rand(8, generator=g)}},
        "adversarial": {"eps": [0, 2 / 255, 4 / 255, 8 / 255], "accuracy": {"pgd": [0.9, 0.6, 0.4, 0.1]}, "norm": "linf"},
        "corruptions": {"severities": [1, 2, 3, 4, 5], "accuracy": {"gaussian_noise": [0.9, 0.8, 0.6, 0.4, 0.2],
                                                                    "contrast": [0.9, 0.9, 0.8, 0.7, 0.5]}, "clean": 0.95},
        "calibration": {"bins": {"before": reliability_bins(probs, labels, 10),
                                 "after T": reliability_bins((logits / 3).softmax(-1), labels, 10)},
                        "metrics": {"before": {"ece": 0.2, "nll": 1.5}, "after T": {"ece": 0.05, "nll": 1.2, "temperature": 3.0}}},
        "risk_coverage": {"curves": {"entropy": {"coverage": cov, "risk": risk}}, "metrics": {"entropy": {"auroc": 0.7}}},
    }


def test_full_report_renders(tmp_path):
    html_path = render_report(_full_report(), tmp_path / "out")
    assert html_path == tmp_path / "out" / "report.html" and html_path.exists()
    html = html_path.read_text(encoding="utf-8")
    for key, (heading, fname) in SECTIONS.items():
        assert heading in html, key
        png = (html_path.parent / fname).read_bytes()
        assert png.startswith(PNG_SIGNATURE), fname
        assert base64.b64encode(png).decode() in html  # the same image is embedded
    embedded = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    assert len(embedded) == len(SECTIONS)
    assert all(base64.b64decode(b).startswith(PNG_SIGNATURE) for b in embedded)
    assert "src='http" not in html and 'src="http' not in html  # self-contained
    assert "after T" in html and "temperature" in html  # metrics tables
    rep = json.loads((html_path.parent / "report.json").read_text())
    assert rep["summary"]["auroc_entropy"] is None  # NaN -> null
    assert rep["summary"]["c8_avg_acc"] == pytest.approx(0.93)
    assert len(rep["per_element"]["accuracy"]["wrapped"]) == 8


def test_only_present_sections_render(tmp_path):
    rep = {"angles": {"angles": [0, 90], "accuracy": {"wrapped": [1.0, 0.5]}},
           "calibration": {"bins": reliability_bins(torch.tensor([[0.7, 0.3]]), torch.tensor([0]))}}
    html = render_report(rep, tmp_path).read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["angles.png", "reliability.png", "report.html", "report.json"]
    assert SECTIONS["angles"][0] in html and SECTIONS["calibration"][0] in html
    for key in ("per_element", "adversarial", "corruptions", "risk_coverage"):
        assert SECTIONS[key][0] not in html


def test_empty_report_still_writes_files(tmp_path):
    html_path = render_report({"summary": {"accuracy": 0.5}}, tmp_path)
    assert "Summary" in html_path.read_text() and json.loads((tmp_path / "report.json").read_text()) == {"summary": {"accuracy": 0.5}}


@pytest.mark.parametrize(
    "report, exc, match",
    [
        ([1, 2], TypeError, "report must be a dict"),
        ({"angles": [0, 90]}, TypeError, r"report\['angles'\] must be a dict"),
        ({"angles": {"accuracy": {"a": [1.0]}}}, ValueError, "needs key 'angles'"),
        ({"angles": {"angles": [0, 90], "accuracy": {"wrapped": [1.0]}}}, ValueError, r"'wrapped'\] has 1 values"),
        ({"corruptions": {"severities": [1], "accuracy": {}}}, ValueError, "empty"),
        ({"calibration": {"bins": {"x": {"edges": [0, 1], "confidence": [], "accuracy": [], "count": []}}}},
         ValueError, "empty"),
        ({"risk_coverage": {"curves": {"e": {"coverage": [0.5, 1.0], "risk": [0.1]}}}}, ValueError, "'risk' has 1"),
        ({"summary": {"model": object()}}, TypeError, "cannot write object"),
    ],
)
def test_bad_reports_give_clear_errors(tmp_path, report, exc, match):
    with pytest.raises(exc, match=match):
        render_report(report, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # validated before writing anything


def test_imports_stay_light():
    code = ("import sys, canonwrap.report, canonwrap.metrics, canonwrap.corruptions; "
            "heavy = [m for m in ('matplotlib', 'timm', 'transformers', 'onnx') if m in sys.modules]; "
            "assert not heavy, heavy")
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert res.returncode == 0, res.stderr
