"""Bad input (issue part 8): every error says what was expected and what arrived; unknown names
list the valid ones and suggest the nearest."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import canonwrap as cw

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return cw.wrap("canonwrap:digitnet", group="c4", canon_size=16, canonicalizer_kwargs={"width": 4, "embed_dim": 16}).eval()


# ------------------------------------------------------------------------------------ pixels
@pytest.mark.parametrize("entry", ["forward", "canonicalize", "frozen_logits"])
def test_wrong_channel_count(model, entry):
    with pytest.raises(ValueError) as err:
        getattr(model, entry)(torch.rand(2, 3, 32, 32))
    msg = str(err.value)
    assert "expected 1 channels" in msg and "(B, 1, 32, 32)" in msg and "got shape (2, 3, 32, 32)" in msg


def test_channels_last_gets_a_hint(model):
    with pytest.raises(ValueError, match=r"got shape \(2, 32, 32, 1\).*permute\(0, 3, 1, 2\)"):
        model(torch.rand(2, 32, 32, 1))


def test_wrong_spatial_size_for_a_fixed_size_backbone(model):
    with pytest.raises(ValueError, match=r"expected spatial size 32x32.*got shape \(2, 1, 28, 28\)"):
        model(torch.rand(2, 1, 28, 28))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_integer_pixels(model, dtype):
    x = torch.randint(0, 255, (2, 1, 32, 32)).to(dtype)
    with pytest.raises(TypeError) as err:
        model(x)
    msg = str(err.value)
    assert "float pixels in [0, 1]" in msg and f"got dtype {dtype}" in msg and "/ 255" in msg


@pytest.mark.parametrize(
    "x, pattern",
    [
        (torch.full((2, 1, 32, 32), 0.5).index_fill_(3, torch.tensor([0]), 200.0), r"got min 0\.5, max 200.*divide by 255"),
        (torch.full((2, 1, 32, 32), 0.5).index_fill_(3, torch.tensor([0]), -0.5), r"got min -0\.5, max 0\.5"),
        (torch.full((2, 1, 32, 32), 0.5).index_fill_(3, torch.tensor([0]), float("nan")), r"got min nan"),
    ],
)
def test_pixels_outside_unit_range(model, x, pattern):
    with pytest.raises(ValueError, match=r"expected pixel values in \[0, 1\]") as err:
        model(x)
    assert re.search(pattern, str(err.value)), str(err.value)


def test_three_dimensional_input(model):
    with pytest.raises(ValueError, match=r"\(B, 1, 32, 32\).*got shape \(1, 32, 32\).*unsqueeze\(0\)"):
        model(torch.rand(1, 32, 32))


def test_not_a_tensor(model):
    with pytest.raises(TypeError, match="expected a torch.Tensor.*got ndarray"):
        model(np.zeros((1, 1, 32, 32), dtype=np.float32))


# ----------------------------------------------------------------------------- unknown names
@pytest.mark.parametrize(
    "kwargs, kind, valid, nearest",
    [
        ({"group": "c5"}, "group", "['c2', 'c4', 'c8', 'd4', 'd8']", "c8"),
        ({"group": "D9"}, "group", "['c2', 'c4', 'c8', 'd4', 'd8']", "d8"),
        ({"canonicalizer": "orbitt"}, "canonicalizer", "['equivariant', 'orbit']", "orbit"),
        ({"canonicalizer": "equivarient"}, "canonicalizer", "['equivariant', 'orbit']", "equivariant"),
    ],
)
def test_unknown_group_or_canonicalizer(kwargs, kind, valid, nearest):
    with pytest.raises(KeyError) as err:
        cw.wrap("canonwrap:digitnet", **kwargs)
    msg = str(err.value)
    assert f"unknown {kind} {next(iter(kwargs.values()))!r}" in msg
    assert f"expected one of {valid}" in msg and f"Did you mean {nearest!r}?" in msg


def test_unknown_backbone_source():
    with pytest.raises(KeyError) as err:
        cw.wrap("tim:resnet50")
    msg = str(err.value)
    assert "unknown backbone source 'tim'" in msg and "Did you mean 'timm'?" in msg
    for source in ("timm", "hf", "hf-base", "canonwrap"):
        assert repr(source) in msg
    with pytest.raises(ValueError, match=r"'<source>:<name>'.*got 'resnet50'"):
        cw.wrap("resnet50")


def test_unknown_timm_model_name():
    pytest.importorskip("timm")
    with pytest.raises(KeyError) as err:
        cw.wrap("timm:test_resnett")
    msg = str(err.value)
    assert "unknown timm model 'test_resnett'" in msg and "Did you mean 'test_resnet'?" in msg
    assert "'test_vit'" in msg and "'resnet50'" in msg  # the valid names are listed


def test_unknown_builtin_backbone():
    with pytest.raises(KeyError, match=r"unknown built-in backbone 'digitnett'.*\['digitnet'\].*Did you mean 'digitnet'"):
        cw.wrap("canonwrap:digitnett")


@pytest.mark.parametrize("source", ["hf", "hf-base"])
def test_hf_local_path_that_does_not_exist(tmp_path, source):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=f"does not exist: {missing}"):
        cw.wrap(f"{source}:{missing}", num_classes=2)


def test_timm_checkpoint_path_that_does_not_exist(tmp_path):
    pytest.importorskip("timm")
    missing = tmp_path / "weights.safetensors"
    with pytest.raises(FileNotFoundError, match=f"does not exist: {missing}"):
        cw.wrap("timm:test_resnet", backbone_kwargs={"checkpoint_path": str(missing)})


# ----------------------------------------------------------------------------- fit / wrap args
def test_unknown_fit_argument(model):
    with pytest.raises(TypeError) as err:
        cw.fit(model, torch.rand(4, 1, 32, 32), epoch=1, progress=False)
    msg = str(err.value)
    assert "unknown fit argument 'epoch'" in msg and "Did you mean 'epochs'?" in msg
    for name in ("epochs", "batch_size", "lr", "prior_weight", "augment"):
        assert repr(name) in msg


def test_unknown_fit_argument_lists_each_name_once(model):
    with pytest.raises(TypeError) as err:
        cw.fit(model, torch.rand(4, 1, 32, 32), learning_rate=1e-3, progress=False)
    listed = str(err.value).split("expected one of ")[1].split("]")[0]
    names = [n.strip(" '") for n in listed.strip("[").split(",")]
    assert len(names) == len(set(names)), f"duplicates in {names}"


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"epochs": 0}, r"epochs >= 1.*got 0"),
        ({"batch_size": 0}, r"batch_size >= 1.*got 1, 0"),
        ({"lr": -1.0}, r"lr > 0.*-1\.0"),
        ({"augment": "rotate"}, r"augment must be one of \('group', 'continuous', 'none'\); got 'rotate'"),
    ],
)
def test_bad_fit_values(model, kwargs, pattern):
    args = {"epochs": 1, "batch_size": 4, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        cw.fit(model, torch.rand(4, 1, 32, 32), progress=False, **args)


def test_bad_wrap_values():
    with pytest.raises(ValueError, match="num_classes must be >= 1; got 0"):
        cw.wrap("canonwrap:digitnet", num_classes=0)
    with pytest.raises(ValueError, match="class_names has 2 entries; the model has 10 classes"):
        cw.wrap("canonwrap:digitnet", class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"one value per input channel \(1\)"):
        cw.wrap("canonwrap:digitnet", mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    with pytest.raises(TypeError, match="spec string, an nn.Module or a Backbone; got int"):
        cw.wrap(3)
