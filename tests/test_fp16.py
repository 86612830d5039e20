"""fp16 export: the selection path stays fp32, types are consistent (the naive-export pitfall is
caught), the graph loads and runs in onnxruntime, parity with the fp32 PyTorch model on real digits."""
import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import canonwrap as cw  # noqa: E402
from canonwrap import runtime as rt  # noqa: E402
from converters import fp16  # noqa: E402
from converters.onnx_export import export_onnx  # noqa: E402

torch.set_num_threads(1)
FLOAT, FLOAT16, INT64 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT64


@pytest.fixture(scope="module")
def digits16(tmp_path_factory):
    torch.manual_seed(0)
    model = cw.wrap("canonwrap:digitnet", group="c8").eval()
    path = tmp_path_factory.mktemp("fp16") / "digits.fp16.onnx"
    result = export_onnx(model, path, dtype="fp16")  # fp32 export, then converters.fp16
    return model, path, result


@pytest.fixture(scope="module")
def resnet32(tmp_path_factory):
    torch.manual_seed(0)
    model = cw.wrap("timm:test_resnet", group="c4").eval()
    path = tmp_path_factory.mktemp("fp16") / "resnet.onnx"
    export_onnx(model, path)
    return model, path


def _types(model):
    g = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    types = {t.name: t.data_type for t in g.initializer}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    return g, types


def _ancestors(graph, names):
    """Nodes feeding the tensors ``names`` (the walk stops at Shape, which reads only shapes)."""
    producer = {o: n for n in graph.node for o in n.output}
    seen, nodes, stack = set(), [], list(names)
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if name in seen or node is None:
            continue
        seen.add(name)
        if node not in nodes:
            nodes.append(node)
        if node.op_type != "Shape":
            stack.extend(i for i in node.input if i)
    return nodes


def _check_selection_path_fp32(model):
    """ArgMax input, every float tensor feeding it, and the scores output are fp32; the backbone's
    convolutions are fp16. Returns (graph, types, selection path nodes)."""
    g, types = _types(model)
    (argmax,) = [n for n in g.node if n.op_type == "ArgMax"]
    assert types[argmax.input[0]] == FLOAT
    (scores,) = [n for n in g.node if "scores" in n.output]
    scores_src = scores.input[0] if scores.op_type == "Cast" else "scores"  # io_dtype="fp16": Cast at the output
    sel = _ancestors(g, [argmax.input[0], scores_src])
    assert len(sel) > 10  # the whole canonicalizer: normalize, orbit warp, CNN, score head
    io = {v.name for v in list(g.input) + list(g.output)}  # IO precision is checked separately
    floats = {t for n in sel for t in list(n.input) + list(n.output) if types.get(t) in (FLOAT, FLOAT16) and t not in io}
    fp16_on_path = sorted(t for t in floats if types[t] == FLOAT16)
    assert floats and not fp16_on_path, f"selection path must stay fp32; fp16 tensors: {fp16_on_path}"
    convs = [n for n in g.node if n.op_type == "Conv" and n not in sel]
    assert convs and all(types[n.input[0]] == FLOAT16 and types[n.input[1]] == FLOAT16 for n in convs)
    return g, types, sel


def _check_valid(model):
    """What a runtime needs: full checker, strict type inference, consistent node types, ORT load."""
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    assert fp16.type_problems(model) == []
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_fp16_export_selection_path_stays_fp32(digits16):
    _, path, result = digits16
    model = onnx.load(str(path))
    g, types, sel = _check_selection_path_fp32(model)
    assert int(result.metadata["fp16_fp32_nodes"]) == len(sel) + 1  # the path + the ArgMax itself
    assert types["scores"] == FLOAT and types["logits"] == FLOAT and types["element"] == INT64
    assert result.metadata["dtype"] == "fp16" and result.metadata["io_dtype"] == "fp32"


def test_fp16_initializers_match_their_consumers(digits16):
    model = onnx.load(str(digits16[1]))
    g, types = _types(model)
    inits = {t.name: t.data_type for t in g.initializer}
    fp16_nodes = [n for n in g.node if n.op_type != "Cast" and any(types.get(o) == FLOAT16 for o in n.output)]
    assert len(fp16_nodes) >= 10
    for node in fp16_nodes:  # every float constant feeding an fp16 node is fp16
        bad = [i for i in node.input if inits.get(i) == FLOAT]
        assert not bad, f"{node.op_type} {node.name} computes fp16 but reads fp32 constants {bad}"
    assert sum(t == FLOAT16 for t in inits.values()) >= 8  # backbone weights were converted
    sess = _check_valid(model)
    assert [o.type for o in sess.get_outputs()] == ["tensor(float)", "tensor(int64)", "tensor(float)"]


def test_naive_fp16_is_caught_and_ours_is_not(resnet32):
    """The known pitfall: a half-precision export whose hand-built constants stayed fp32 (here the
    normalization mean/std) feeding fp16 ops. Every check used on our graphs rejects it."""
    from onnx import numpy_helper

    naive = onnx.load(str(resnet32[1]))
    for t in naive.graph.initializer:
        if t.data_type == FLOAT and not t.name.startswith(("model.mean", "model.std")):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in list(naive.graph.input) + list(naive.graph.output):
        if v.type.tensor_type.elem_type == FLOAT:
            v.type.tensor_type.elem_type = FLOAT16
    del naive.graph.value_info[:]
    problems = fp16.type_problems(naive)
    assert problems and any("Sub" in p and "FLOAT16" in p and "FLOAT'" in p for p in problems), problems
    with pytest.raises(Exception, match="type"):
        onnx.checker.check_model(naive, full_check=True)
    with pytest.raises(Exception, match="bound to different types"):
        ort.InferenceSession(naive.SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(ValueError, match="inconsistent types|ShapeInferenceError|type"):
        fp16.validate_fp16(naive)
    ours = fp16.convert_fp16(str(resnet32[1])).model
    _check_valid(ours)
    fp16.validate_fp16(ours)


@pytest.mark.parametrize("io_dtype", ["fp32", "fp16"])
def test_resize_and_selection_path_fp32_on_resnet(resnet32, io_dtype, tmp_path):
    model, path = resnet32
    result = fp16.convert_fp16(str(path), io_dtype=io_dtype)
    g, types, sel = _check_selection_path_fp32(result.model)
    resize = [n for n in g.node if n.op_type == "Resize"]  # the canonicalizer's 160 -> 64 downscale
    assert resize and all(n in sel and types[n.input[0]] == FLOAT for n in resize)
    inserted = {n.name for n in sel if n.op_type == "Cast" and n.name.startswith("Cast_")}  # boundary Casts
    assert {n.name for n in sel} - inserted <= set(result.fp32_nodes) and result.fp16_nodes > 10
    io = FLOAT16 if io_dtype == "fp16" else FLOAT
    assert types["pixel_values"] == io and types["logits"] == io and types["scores"] == io
    sess = _check_valid(result.model)
    x = np.random.default_rng(0).random((2, 3, 160, 160), dtype=np.float32)
    feed = {"pixel_values": x.astype(np.float16 if io == FLOAT16 else np.float32)}
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    with torch.no_grad():
        logits, element, _ = model.forward_with_element(torch.from_numpy(x))
    assert (out["element"] == element.numpy()).all()
    assert np.abs(out["logits"].astype(np.float32) - logits.numpy()).max() < 2e-2 * float(logits.abs().max())
    # the runtime reads the precision from the graph and casts numpy inputs to it
    onnx.save(result.model, str(tmp_path / "r.onnx"))
    sess = rt.Session(tmp_path / "r.onnx", device="cpu")
    assert sess.info.dtype == "fp16" and sess.info.io_dtype == io_dtype
    pred = sess.run(x)
    assert pred.logits.dtype == (np.float16 if io_dtype == "fp16" else np.float32) and pred.probs.dtype == np.float32
    assert (pred.element == element.numpy()).all()


def test_fp16_parity_on_real_digits(digits16):
    """fp16 graph (onnxruntime CPU) vs the fp32 PyTorch model on the 1,000 real test digits."""
    model, path, _ = digits16
    x = cw.load_digits().test_x  # (1000, 1, 32, 32)
    pred = rt.Session(path, device="cpu").run(x.numpy())
    with torch.no_grad():
        logits, element, _ = model.forward_with_element(x)
    top1 = float((pred.logits.argmax(1) == logits.argmax(1).numpy()).mean())
    elem = float((pred.element == element.numpy()).mean())
    rel = float(np.abs(pred.logits - logits.numpy()).max() / logits.abs().max())
    print(f"fp16 parity on {len(x)} real digits: top-1 {100 * top1:.2f}%, element {100 * elem:.2f}%, rel max {rel:.2e}")
    assert top1 >= 0.995 and elem >= 0.995
    assert rel < 5e-3


def test_generic_graph_features():
    """Constant nodes, clipping to the fp16 range, ConstantOfShape, a float->int Cast (index
    computation kept fp32) and an ArgMax branch, on a hand-built graph."""
    from onnx import helper

    nodes = [
        helper.make_node("Constant", [], ["big"], value=helper.make_tensor("big", FLOAT, [1], [1e6])),
        helper.make_node("Constant", [], ["half"], value_float=0.5),
        helper.make_node("Mul", ["x", "half"], ["xh"]),
        helper.make_node("Mul", ["xh", "big"], ["y"]),  # fp16: 1e6 is clipped to 65504
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("ConstantOfShape", ["shp"], ["ones"], value=helper.make_tensor("v", FLOAT, [1], [1.0])),
        helper.make_node("Add", ["y", "ones"], ["z"]),
        helper.make_node("Relu", ["x"], ["r"]),  # feeds ArgMax: stays fp32
        helper.make_node("ArgMax", ["r"], ["idx"], axis=1, keepdims=0),
        helper.make_node("Mul", ["x", "half"], ["s"]),
        helper.make_node("Floor", ["s"], ["f"]),  # feeds a float -> int Cast: stays fp32
        helper.make_node("Cast", ["f"], ["fi"], to=INT64),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", FLOAT, ["B", 4])],
        [
            helper.make_tensor_value_info("z", FLOAT, ["B", 4]),
            helper.make_tensor_value_info("idx", INT64, ["B"]),
            helper.make_tensor_value_info("fi", INT64, ["B", 4]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    result = fp16.convert_fp16(model)
    assert result.clipped == 1 and result.casts >= 2
    g, types = _types(result.model)
    by_out = {n.output[0]: n for n in g.node}
    assert types["y"] == FLOAT16 and types["ones"] == FLOAT16 and types["r"] == FLOAT and types["f"] == FLOAT
    assert {by_out["r"].name, by_out["idx"].name, by_out["f"].name, by_out["fi"].name} <= set(result.fp32_nodes)
    sess = _check_valid(result.model)
    x = np.array([[0.5, -2.0, 3.0, 1.25], [7.5, 0.0, -1.0, 2.0]], np.float32) / 1000
    z, idx, fi = sess.run(None, {"x": x})
    assert z.dtype == np.float32 and (idx == x.argmax(1)).all() and (fi == np.floor(x * 0.5)).all()
    assert np.allclose(z, x * 0.5 * 65504.0 + 1, rtol=2e-3)  # the constant 1e6 became 65504
    # post-processing kept fp32: everything downstream of "y" (like probs/entropy after "logits")
    after = fp16.convert_fp16(model, keep_fp32_after=("y",))
    g, types = _types(after.model)
    add = next(n for n in g.node if n.op_type == "Add")
    assert types["y"] == FLOAT16 and add.name in after.fp32_nodes and all(types[i] == FLOAT for i in add.input)
    _check_valid(after.model)


def test_bf16_and_bad_dtypes_are_refused(digits16, tmp_path):
    model, path, _ = digits16
    with pytest.raises(ValueError, match="bfloat16.*dtype='fp16'"):
        export_onnx(model, tmp_path / "m.onnx", dtype="bf16")  # raised before the export runs
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(ValueError, match="bfloat16"):
        fp16.convert_fp16(str(path), dtype="bf16")
    with pytest.raises(ValueError, match="io_dtype"):
        export_onnx(model, tmp_path / "m.onnx", dtype="fp16", io_dtype="int8")
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_onnx(model, tmp_path / "m.onnx", dtype="fp8")
    with pytest.raises(ValueError, match="already has float16"):
        fp16.convert_fp16(str(path))  # converting twice is refused
