"""A reduced run of the README's demo on real digits, checking the accuracy claim's direction."""
import json

import pytest


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from canonwrap.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, epochs=3, n_train=2000, angle_step=30, progress=False)


def test_demo_wrapped_is_invariant_and_beats_frozen(demo):
    _, res = demo
    wrapped, frozen = res.report["wrapped"], res.report["frozen"]
    # the frozen classifier only saw upright digits: it collapses under rotation
    assert frozen["upright"] > 0.95
    assert frozen["group_avg"]["c8"] < 0.6
    # the orbit canonicalizer is exactly invariant to 90-degree rotations ...
    assert wrapped["per_element"][0] == wrapped["per_element"][2] == wrapped["per_element"][4] == wrapped["per_element"][6]
    # ... and the wrapped model keeps most of the upright accuracy under every rotation
    assert wrapped["group_avg"]["c8"] > frozen["group_avg"]["c8"] + 0.4
    assert wrapped["group_avg"]["c8"] > wrapped["upright"] - 0.03
    assert wrapped["upright"] > frozen["upright"] - 0.04
    assert min(wrapped["angle_acc"]) > 0.85


def test_demo_writes_its_artifacts(demo):
    out, res = demo
    assert res.verify is not None and res.verify["passed"], res.verify
    for key in ("onnx", "angles_png", "canonical_png", "checkpoint"):
        assert key in res.files
    for key in ("angles_png", "canonical_png"):
        with open(res.files[key], "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert saved["report"]["wrapped"]["upright"] == res.report["wrapped"]["upright"]
