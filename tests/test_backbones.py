"""Backbones: timm tiny models, timm local weights, Hugging Face classifiers / base models from a
local directory, plain nn.Modules. Everything built with ``pretrained=False`` (no downloads)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import canonwrap as cw
from canonwrap.backbones import create_backbone, list_backbone_sources

torch.set_num_threads(1)


def _assert_frozen(model) -> None:
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert not model.backbone.training


def test_sources_registry():
    assert set(list_backbone_sources()) >= {"timm", "hf", "hf-base", "canonwrap"}


# -------------------------------------------------------------------------------------- timm
def test_timm_cnn_pretrained_cfg_and_overrides():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = cw.wrap("timm:test_resnet", group="c4", input_size=(3, 32, 32), canon_size=16,
                    backbone_kwargs={"num_classes": 5}, canonicalizer_kwargs={"width": 4, "embed_dim": 16})
    pc = timm.create_model("test_resnet", pretrained=False).pretrained_cfg
    assert model.config.mean == tuple(pc["mean"]) and model.config.std == tuple(pc["std"])
    assert model.input_size == (3, 32, 32) and model.num_classes == 5
    assert model.config.backbone == {"source": "timm", "name": "test_resnet", "kwargs": {"num_classes": 5}}
    _assert_frozen(model)
    x = torch.rand(2, 3, 32, 32)
    assert model.eval()(x).shape == (2, 5)
    assert model.backbone.features(model.normalize(x)).shape == (2, model.backbone.pretrained_cfg.num_features)
    # mean/std given explicitly win over the timm config
    custom = cw.wrap("timm:test_resnet", group="c4", input_size=(3, 32, 32), mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1),
                     canon_size=16, canonicalizer_kwargs={"width": 4, "embed_dim": 16})
    assert custom.config.mean == (0.1, 0.2, 0.3) and custom.config.std == (0.3, 0.2, 0.1)
    assert torch.allclose(custom.mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))


def test_timm_vit_img_size_sets_the_input_size():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = cw.wrap("timm:test_vit", group="d4", canonicalizer="equivariant",
                    backbone_kwargs={"img_size": 32, "num_classes": 4}, canonicalizer_kwargs={"width": 4, "depth": 2})
    assert model.input_size == (3, 32, 32) and model.config.canon_size == 32
    assert model.backbone.pretrained_cfg.fixed_input_size
    _assert_frozen(model)
    assert model.eval()(torch.rand(3, 3, 32, 32)).shape == (3, 4)
    with pytest.raises(ValueError, match="32x32"):
        model(torch.rand(1, 3, 48, 48))


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
@pytest.mark.parametrize("num_classes", [1000, 5])
def test_timm_local_weights_are_loaded(tmp_path, suffix, num_classes):
    """``backbone_kwargs={"checkpoint_path": file}`` loads a local state_dict through timm's
    pretrained path; every tensor (classifier included) must equal the saved one, also when the
    checkpoint has its own label set (num_classes != timm's default 1000)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    src = timm.create_model("test_resnet", pretrained=False, num_classes=num_classes)
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    path = tmp_path / f"weights.{suffix}"
    if suffix == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    torch.manual_seed(123)  # a different init: only loading can make them equal
    model = cw.wrap("timm:test_resnet", group="c4", input_size=(3, 32, 32), canon_size=16,
                    backbone_kwargs={"num_classes": num_classes, "checkpoint_path": str(path)},
                    canonicalizer_kwargs={"width": 4, "embed_dim": 16})
    loaded = model.backbone.module.state_dict()
    differ = [k for k, v in state.items() if not torch.equal(loaded[k], v)]
    assert not differ, f"tensors not loaded from {path.name}: {differ}"
    _assert_frozen(model)


# ------------------------------------------------------------------------------ transformers
def test_hf_classifier_from_a_local_directory(hf_vit_dir):
    from transformers import ViTForImageClassification

    pre = json.loads((hf_vit_dir / "preprocessor_config.json").read_text())
    model = cw.wrap("hf:" + str(hf_vit_dir), group="c4", canon_size=16, canonicalizer_kwargs={"width": 4, "embed_dim": 16})
    assert model.config.mean == tuple(pre["image_mean"]) and model.config.std == tuple(pre["image_std"])
    assert model.input_size == (3, 32, 32) and model.num_classes == 3
    assert model.config.backbone["source"] == "hf"
    _assert_frozen(model)
    ref = ViTForImageClassification.from_pretrained(hf_vit_dir).eval()
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(pre["image_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(pre["image_std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = ref(pixel_values=(x - mean) / std).logits
        torch.testing.assert_close(model.frozen_logits(x), expected, atol=1e-6, rtol=0)
        assert model.eval()(x).shape == (2, 3)


def test_hf_base_with_a_new_head(hf_vit_dir, hf_convnext_dir):
    vit = cw.wrap("hf-base:" + str(hf_vit_dir), group="c4", num_classes=3, canon_size=16,
                  canonicalizer_kwargs={"width": 4, "embed_dim": 16})
    assert vit.num_classes == 3 and isinstance(vit.head, nn.Linear) and vit.head.in_features == 32
    assert vit.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 3)
    _assert_frozen(vit)

    conv = cw.wrap("hf-base:" + str(hf_convnext_dir), group="d4", num_classes=2, canonicalizer="equivariant",
                   canonicalizer_kwargs={"width": 4, "depth": 2})
    assert conv.config.mean == (0.4, 0.4, 0.4) and conv.config.std == (0.2, 0.2, 0.2)
    assert conv.input_size == (3, 24, 24)  # size.shortest_edge from the hand-written preprocessor config
    assert conv.head.in_features == 16
    assert conv.eval()(torch.rand(2, 3, 24, 24)).shape == (2, 2)
    with pytest.raises(ValueError, match="num_classes"):
        cw.wrap("hf-base:" + str(hf_convnext_dir))  # features only: a head is needed


def test_hf_base_features_depend_only_on_the_saved_files(hf_vit_dir):
    """A frozen "pretrained" backbone must be a function of the files: loading the same directory
    twice (under different RNG states) must give identical features. ViTModel built from a
    ViTForImageClassification checkpoint has no pretrained pooler; a freshly initialized one
    must not be used for the features."""
    x = torch.randn(2, 3, 32, 32)
    feats = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = cw.wrap("hf-base:" + str(hf_vit_dir), group="c4", num_classes=3, canon_size=16,
                        canonicalizer_kwargs={"width": 4, "embed_dim": 16})
        with torch.no_grad():
            feats.append(model.backbone.features(x))
    torch.testing.assert_close(feats[0], feats[1], atol=0, rtol=0)


def test_hf_center_crop_size_wins(tmp_path, hf_convnext_dir):
    import shutil

    d = tmp_path / "crop"
    shutil.copytree(hf_convnext_dir, d)
    (d / "preprocessor_config.json").write_text(json.dumps({
        "image_mean": [0.5] * 3, "image_std": [0.25] * 3, "size": {"shortest_edge": 40},
        "do_center_crop": True, "crop_size": {"height": 28, "width": 28},
    }))
    model = cw.wrap("hf:" + str(d), group="c4", canon_size=16, canonicalizer_kwargs={"width": 4, "embed_dim": 16})
    assert model.input_size == (3, 28, 28) and model.config.std == (0.25, 0.25, 0.25) and model.num_classes == 4


# --------------------------------------------------------------------------- plain modules
def test_plain_module_backbone(tiny_net_cls):
    torch.manual_seed(0)
    net = tiny_net_cls()
    net.num_classes = 4  # timm-style attribute
    model = cw.wrap(net, group="c4", input_size=(3, 16, 16), canonicalizer_kwargs={"width": 4, "embed_dim": 16})
    assert model.backbone.module is net
    assert model.config.backbone == {"source": "module", "class": "TinyNet"}
    assert model.config.mean == (0.0, 0.0, 0.0) and model.config.std == (1.0, 1.0, 1.0)
    assert model.config.canon_size == 16 and model.num_classes == 4
    _assert_frozen(model)
    assert not net.training  # the user's module itself was put in eval mode (dropout off)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.frozen_logits(x), net(x), atol=0, rtol=0)  # mean 0 / std 1
        assert model.eval()(x).shape == (2, 4)
    with pytest.raises(ValueError, match="input_size"):
        cw.wrap(tiny_net_cls(), group="c4")
    with pytest.raises(ValueError, match="one value per input channel"):
        cw.wrap(tiny_net_cls(), group="c4", input_size=(3, 16, 16), mean=(0.5,), std=(0.5,))


def test_plain_classifier_without_num_classes_attribute(tiny_net_cls):
    """Most nn.Module classifiers (torchvision's, a user's own) have no ``num_classes``
    attribute; wrapping one with its own classifier must work (the class count is what the
    module outputs), not ask for a new head."""
    torch.manual_seed(0)
    net = tiny_net_cls(num_classes=4)
    assert not hasattr(net, "num_classes")
    model = cw.wrap(net, group="c4", input_size=(3, 16, 16), canonicalizer_kwargs={"width": 4, "embed_dim": 16})
    assert model.num_classes == 4
    assert model.eval()(torch.rand(2, 3, 16, 16)).shape == (2, 4)


def test_create_backbone_rejects_other_types():
    with pytest.raises(TypeError, match="spec string, an nn.Module or a Backbone"):
        create_backbone(42)
