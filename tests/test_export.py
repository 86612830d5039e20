"""ONNX export (dynamo exporter) and onnxruntime parity for a timm CNN, a timm ViT and a Hugging
Face ViT loaded from a temporary directory; metadata round trip; dynamic batch.

Each model is exported once (module-scoped fixture); export dominates this file's run time.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import canonwrap as cw

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # the dynamo exporter's backend

torch.set_num_threads(1)

CLASS_NAMES = ["a", "b", "c", "d", "e"]


def _build(kind: str, hf_dir) -> "cw.CanonicalizedModel":
    torch.manual_seed(0)
    if kind == "timm_cnn":
        pytest.importorskip("timm")
        return cw.wrap("timm:test_resnet", group="c4", canonicalizer="orbit", input_size=(3, 32, 32), canon_size=16,
                       backbone_kwargs={"num_classes": 5}, class_names=CLASS_NAMES,
                       canonicalizer_kwargs={"width": 4, "embed_dim": 16})
    if kind == "timm_vit":  # C8: 45-degree elements exercise the bilinear gather taps
        pytest.importorskip("timm")
        return cw.wrap("timm:test_vit", group="c8", canonicalizer="equivariant", canon_size=16,
                       backbone_kwargs={"num_classes": 4, "img_size": 32}, canonicalizer_kwargs={"width": 4, "depth": 2})
    return cw.wrap("hf:" + str(hf_dir), group="d4", canonicalizer="orbit", canon_size=16,
                   canonicalizer_kwargs={"width": 4, "embed_dim": 16})


@pytest.fixture(scope="module", params=["timm_cnn", "timm_vit", "hf_vit"])
def exported(request, tmp_path_factory):
    hf_dir = request.getfixturevalue("hf_vit_dir") if request.param == "hf_vit" else None
    model = _build(request.param, hf_dir).eval()
    path = tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx"
    result = cw.export_onnx(model, path, exporter="dynamo", opset=18)
    return request.param, model, result


def _smooth(n: int, c: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(n, c, 6, 6, generator=g)
    return torch.nn.functional.interpolate(z, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def test_onnx_parity(exported):
    """fp32: max |logit diff| <= 1e-4 x logit scale, element agreement 100% on real-like inputs,
    at batch sizes 1, 3 (odd) and 16."""
    kind, model, result = exported
    x = _smooth(7, *model.input_size[:2], seed=1)
    rep = cw.verify_onnx(result.path, model, x, batch_sizes=(1, 3, 16))
    assert rep.passed, rep.summary()
    assert {r.batch for r in rep.rows} >= {1, 3, 7, 16}
    for row in rep.rows:
        assert row.rel_max <= 1e-4 and row.element_agreement == 1.0 and row.top1_agreement == 1.0, rep.summary()
    assert "PASS" in rep.summary()


def test_onnx_metadata_round_trip(exported):
    import onnx
    import onnxruntime as ort

    kind, model, result = exported
    sess = ort.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    cfg = model.config
    assert meta["group"] == cfg.group and meta["canonicalizer"] == cfg.canonicalizer
    assert json.loads(meta["mean"]) == list(cfg.mean) and json.loads(meta["std"]) == list(cfg.std)
    assert json.loads(meta["input_size"]) == list(cfg.input_size)
    assert int(meta["num_classes"]) == model.num_classes
    assert json.loads(meta["class_names"]) == (CLASS_NAMES if kind == "timm_cnn" else None)
    assert meta["canonwrap_version"] == cw.__version__ and meta["torch_version"] == torch.__version__
    assert meta["onnx_version"] == onnx.__version__ and meta["exporter"] == "dynamo"
    assert int(meta["opset"]) >= 18 and meta["input_range"] == "[0, 1]"
    elements = json.loads(meta["group_elements"])
    assert [(e["angle"], e["flip"]) for e in elements] == [(model.group.angle(e), model.group.flip(e)) for e in model.group.elements()]
    assert json.loads(meta["canonicalizer_config"]) == cfg.canonicalizer_config
    from converters.onnx_export import read_metadata  # decodes the JSON fields with onnx alone

    decoded = read_metadata(result.path)
    assert decoded["group"] == cfg.group and decoded["mean"] == list(cfg.mean)
    assert result.metadata == meta
    proto = onnx.load(result.path)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 18
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"If", "Loop"}, ops  # no data-dependent control flow in the graph


def test_onnx_dynamic_batch(exported):
    import onnxruntime as ort

    kind, model, result = exported
    sess = ort.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.name == "pixel_values" and not isinstance(inp.shape[0], int)  # symbolic batch
    assert [o.name for o in sess.get_outputs()] == ["logits", "element", "scores"]
    for b in (1, 5):
        x = torch.rand(b, *model.input_size, generator=torch.Generator().manual_seed(b))
        logits, element, scores = sess.run(None, {"pixel_values": x.numpy()})
        assert logits.shape == (b, model.num_classes) and element.shape == (b,) and scores.shape == (b, model.group.order)
        with torch.no_grad():
            ref_logits, ref_element, ref_scores = model.forward_with_element(x)
        np.testing.assert_array_equal(element, ref_element.numpy())
        scale = float(ref_logits.abs().max())
        np.testing.assert_allclose(logits, ref_logits.numpy(), atol=1e-4 * scale, rtol=0)
        np.testing.assert_allclose(scores, ref_scores.numpy(), atol=1e-4 * float(ref_scores.abs().max()), rtol=0)


def test_export_rejects_bad_options(tmp_path, tiny_model):
    model = tiny_model("c4")
    with pytest.raises(ValueError, match="opset must be >= 18; got 17"):
        cw.export_onnx(model, tmp_path / "m.onnx", opset=17)
    with pytest.raises(ValueError, match="exporter must be"):
        cw.export_onnx(model, tmp_path / "m.onnx", exporter="tracing")
