"""Checkpoints: config.json + model.safetensors (never pickle), bit-identical round trip, and clear
errors for checkpoints that do not match what they claim to be."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

import canonwrap as cw

torch.set_num_threads(1)


@pytest.fixture
def trained(tiny_model):
    """A briefly trained C4 model per canonicalizer (BatchNorm statistics moved off their init)."""

    def build(canonicalizer: str = "orbit", **kwargs):
        model = tiny_model("c4", canonicalizer, **kwargs)
        torch.manual_seed(0)
        cw.fit(model, torch.rand(16, 1, 32, 32), epochs=1, batch_size=8, progress=False)
        return model.eval()

    return build


def _weight_names(root) -> set:
    """Tensor names stored in root/model.safetensors."""
    from safetensors import safe_open

    with safe_open(str(root / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def _edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    raw = json.loads((dst / "config.json").read_text())
    raw.update(changes)
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


@pytest.mark.parametrize("canonicalizer", ["orbit", "equivariant"])
def test_round_trip_is_bit_identical(trained, tmp_path, canonicalizer):
    model = trained(canonicalizer, num_classes=3, class_names=["x", "y", "z"])
    out = model.save(tmp_path / "ckpt")
    assert out == tmp_path / "ckpt"
    loaded = cw.load(out).eval()
    torch.manual_seed(1)
    x = torch.rand(5, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert torch.equal(loaded.canonicalize(x).scores, model.canonicalize(x).scores)
    assert loaded.config.class_names == ["x", "y", "z"] and loaded.num_classes == 3
    assert loaded.config.group == "c4" and loaded.config.canonicalizer == canonicalizer
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert all(not p.requires_grad for p in loaded.backbone.parameters())


def test_loaded_model_is_ready_for_inference(trained, tmp_path):
    """``model2 = cw.load(path); model2(x)`` must equal the saved model's output and must not
    change the checkpoint's state (BatchNorm running statistics) as a side effect."""
    model = trained("orbit")
    loaded = cw.load(model.save(tmp_path / "ckpt"))
    assert not loaded.training, "cw.load returned a model in training mode (canonicalizer BatchNorm uses batch stats)"
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    torch.manual_seed(1)
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in before.items())


def test_safetensors_only_no_pickle(trained, tmp_path, monkeypatch):
    model = trained("orbit")

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.save (pickle) called while saving a checkpoint")

    monkeypatch.setattr(torch, "save", no_pickle)
    out = model.save(tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    raw = (out / "model.safetensors").read_bytes()
    assert raw[:2] != b"\x80\x02" and not raw.startswith(b"PK")  # neither a pickle nor a torch zip
    assert _weight_names(out) == set(model.state_dict())
    config = json.loads((out / "config.json").read_text())
    assert config["group"] == "c4" and config["canonicalizer"] == "orbit" and config["includes_backbone"] is True
    assert config["backbone"]["source"] == "canonwrap"

    monkeypatch.setattr(torch, "load", no_pickle)  # loading must not unpickle either
    cw.load(out)


def test_checkpoint_without_backbone_weights(trained, tmp_path):
    model = trained("orbit")
    out = model.save(tmp_path / "ckpt", include_backbone=False)
    keys = _weight_names(out)
    assert keys and not any(k.startswith("backbone.") for k in keys)
    # the user supplies the frozen backbone: it must be the one used (not a fresh random init)
    torch.manual_seed(123)
    loaded = cw.load(out, backbone=model.backbone.module).eval()
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_plain_module_checkpoint_needs_its_backbone(tmp_path, tiny_net_cls):
    torch.manual_seed(0)
    net = tiny_net_cls()
    net.num_classes = 4
    model = cw.wrap(net, group="c4", input_size=(3, 16, 16), canonicalizer_kwargs={"width": 4, "embed_dim": 16}).eval()
    out = model.save(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"TinyNet.*backbone="):
        cw.load(out)
    other = tiny_net_cls()
    other.num_classes = 4
    loaded = cw.load(out, backbone=other).eval()  # weights come from the checkpoint
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match=r"checkpoint \(8, 3, 3, 3\) vs model \(16, 3, 3, 3\)"):
        wider = tiny_net_cls(width=16)
        wider.num_classes = 4
        cw.load(out, backbone=wider)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        cw.load(tmp_path / "nothing-here")


def test_expected_group_or_canonicalizer(trained, tmp_path):
    out = trained("orbit").save(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="group 'c4'; expected 'c8'"):
        cw.load(out, group="c8")
    with pytest.raises(ValueError, match="canonicalizer 'orbit'; expected 'equivariant'"):
        cw.load(out, canonicalizer="equivariant")
    assert cw.load(out, group="C4", canonicalizer="orbit").group.name == "c4"


@pytest.mark.parametrize(
    "canonicalizer, change, pattern",
    [
        ("equivariant", {"group": "d4"}, r"checkpoint \(4, 4, 4, 5, 5\) vs model \(4, 4, 8, 5, 5\)"),
        ("equivariant", {"group": "c8"}, r"checkpoint \(1, 4, 4, 5, 5\) vs model \(1, 4, 8, 5, 5\)"),
        ("equivariant", {"canonicalizer_kwargs": {"width": 6, "depth": 2, "kernel_size": 5}}, r"checkpoint \(4, 1, 5, 5\) vs model \(6, 1, 5, 5\)"),
        ("orbit", {"canonicalizer_kwargs": {"width": 8, "embed_dim": 16}}, r"checkpoint \(4, 1, 3, 3\) vs model \(8, 1, 3, 3\)"),
        ("orbit", {"canonicalizer_kwargs": {"width": 4, "embed_dim": 32}}, r"checkpoint \(16, 128\) vs model \(32, 128\)"),
        ("orbit", {"group": "d4"}, r"checkpoint \(4, 16\) vs model \(8, 16\)"),  # relational scorer: (G, D)
    ],
)
def test_config_that_does_not_match_the_weights(trained, tmp_path, canonicalizer, change, pattern):
    """A config.json edited to another group or width: the error names the tensor, the shape in
    the checkpoint (received) and the shape the config's architecture expects."""
    out = trained(canonicalizer).save(tmp_path / "ckpt")
    bad = _edit_config(out, tmp_path / "bad", **change)
    with pytest.raises(ValueError, match="does not match") as err:
        cw.load(bad)
    assert re.search(pattern, str(err.value)), str(err.value)
