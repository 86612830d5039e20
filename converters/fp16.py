"""Convert an exported fp32 canonwrap graph to fp16, keeping the canonicalizer's selection path fp32.

Why not a generic converter (``onnxconverter_common.float16``)? Its default block list does not
cover ``ArgMax`` or the ops feeding it, so the scores that pick the group element would be computed
in fp16 and near-ties would flip the chosen element; and a naive conversion leaves fp32 constants
feeding fp16 ops (an invalid graph). This converter is small, dependency-free (only ``onnx``) and
explicit about what stays fp32:

* **the selection path**: every node that feeds an ``ArgMax``/``ArgMin``/``TopK`` or a float -> int
  ``Cast`` (index computations), and every node feeding the outputs in ``keep_fp32_outputs``
  (``scores``, ``canon_margin`` by default). The walk back stops at ``Shape``/``Size``.
* **post-processing of the logits**: every node downstream of a tensor in ``keep_fp32_after``
  (``logits``: the uncertainty outputs ``probs``/``entropy`` are computed fp32 from fp16 logits).
* **ops without a (fast or exact) fp16 kernel** in ``keep_fp32_ops``: ``GridSample`` (onnxruntime's
  CUDA kernel is float32 only), ``Resize``/``Upsample``, ``RoiAlign``, ``Range``, ``CumSum``, random
  ops, ``NonMaxSuppression``; the coordinate inputs of ``GridSample`` / ``Resize`` are computed
  fp32 as well.

Everything else computes in fp16: float initializers are converted (values outside the fp16 range
are clipped to +-65504; an initializer used by both precisions is duplicated), float ``Cast`` targets
and ``ConstantOfShape`` values follow, and a ``Cast`` is inserted on every edge whose producer and
consumer precisions differ (one per tensor and target type). Input slots whose schema does not
allow float16 (e.g. ``Resize.scales``) stay fp32. The graph's float inputs/outputs are ``io_dtype``
(``"fp32"`` by default: Casts sit inside the graph).

Example:
    >>> from converters.fp16 import convert_fp16_file
    >>> result = convert_fp16_file("model.onnx", "model.fp16.onnx")
    >>> result.fp32_nodes[:3], result.casts
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence, Set, Tuple

if TYPE_CHECKING:  # pragma: no cover
    import onnx

FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT / FLOAT16 (plain ints: no onnx import at module load)
FP16_MAX = 65504.0

KEEP_FP32_OPS: Tuple[str, ...] = (
    "GridSample", "Resize", "Upsample", "RoiAlign", "NonMaxSuppression", "Range", "CumSum",
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli",
)
# float -> index boundaries: everything feeding their first input is an index computation
_INDEX_OPS = ("ArgMax", "ArgMin", "TopK")
# ops whose non-data inputs are coordinates (kept fp32 together with everything computing them)
_COORD_INPUTS = {"GridSample": (1,), "Resize": (1, 2), "Upsample": (1,), "RoiAlign": (1,)}
_SHAPE_ONLY = ("Shape", "Size")
# outputs computed from the canonicalizer scores only (kept fp32 with everything feeding them)
KEEP_FP32_OUTPUTS: Tuple[str, ...] = ("scores", "canon_margin")
# tensors whose consumers stay fp32 (probs / entropy computed from the logits)
KEEP_FP32_AFTER: Tuple[str, ...] = ("logits",)
_NEW_FLOAT_ATTR_OPS = ("EyeLike",)  # output dtype from a `dtype` attribute
_INT_TYPES = {2, 3, 4, 5, 6, 7, 9, 12, 13}  # uint8 int8 uint16 int16 int32 int64 bool uint32 uint64

BF16_UNSUPPORTED = (
    "dtype='bf16' is not supported: onnxruntime has no bfloat16 kernels for ops these graphs use "
    "(its OperatorKernels table: the CUDA EP registers none for BatchNormalization, MaxPool, "
    "GlobalAveragePool, ReduceMean or ArgMax, and Conv/AveragePool only from opset 22; the CPU EP "
    "has no bfloat16 Conv at all), so a bf16 graph would fail to load or run those nodes on the CPU "
    "with Memcpy nodes around them. Use dtype='fp16'."
)


@dataclass
class Fp16Conversion:
    """Result of :func:`convert_fp16`.

    model: the converted ``onnx.ModelProto``; fp32_nodes: names of the nodes kept fp32;
    fp16_nodes: number of nodes computing in fp16; casts: Cast nodes inserted;
    initializers: float initializers converted (or duplicated) to fp16; clipped: initializer
    values clipped to the fp16 range; kept_outputs: outputs whose producers were kept fp32.
    """

    model: "onnx.ModelProto"
    io_dtype: str
    fp32_nodes: List[str]
    fp16_nodes: int
    casts: int
    initializers: int
    clipped: int
    kept_outputs: List[str] = field(default_factory=list)
    path: Optional[str] = None

    def summary(self) -> str:
        return (
            f"fp16 graph: {self.fp16_nodes} nodes fp16, {len(self.fp32_nodes)} kept fp32 (selection path "
            f"and fp32-only ops), {self.casts} Casts inserted, {self.initializers} initializers converted, "
            f"{self.clipped} values clipped; float IO {self.io_dtype}"
        )


# ------------------------------------------------------------------------------------ helpers
def check_dtype(dtype: str, io_dtype: str, allowed: Sequence[str] = ("fp16",)) -> None:
    """Raise ValueError for dtypes we cannot produce (bf16 with the reason) and bad io_dtypes."""
    if dtype in ("bf16", "bfloat16"):
        raise ValueError(BF16_UNSUPPORTED)
    if dtype not in allowed:
        raise ValueError(f"dtype must be one of {list(allowed)} ('bf16' is refused, see its error); got {dtype!r}")
    if io_dtype not in ("fp32", "fp16"):
        raise ValueError(f"io_dtype must be 'fp32' or 'fp16'; got {io_dtype!r}")


def _schema(node: "onnx.NodeProto", opsets: Dict[str, int]):
    import onnx

    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    try:
        return onnx.defs.get_schema(node.op_type, opsets.get(domain, 1), domain)
    except onnx.defs.SchemaError:
        return None


def _slot_allows_fp16(schema, index: int) -> bool:
    """Whether input ``index`` of an op with this schema may be float16."""
    formals = schema.inputs
    if not formals:
        return False
    formal = formals[min(index, len(formals) - 1)]
    allowed = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
    return "tensor(float16)" in allowed.get(formal.type_str, [formal.type_str])


def _constants_to_initializers(graph: "onnx.GraphProto") -> None:
    """Move tensor-valued ``Constant`` nodes of the main graph into initializers (same semantics)."""
    from onnx import numpy_helper

    keep = []
    for node in graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(attrs) == 1:
            (name, attr), = attrs.items()
            tensor = None
            if name == "value":
                tensor = attr.t
            elif name in ("value_float", "value_floats"):
                import numpy as np

                values = attr.f if name == "value_float" else list(attr.floats)
                tensor = numpy_helper.from_array(np.asarray(values, dtype=np.float32))
            if tensor is not None:
                init = graph.initializer.add()
                init.CopyFrom(tensor)
                init.name = node.output[0]
                continue
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _elem_types(model: "onnx.ModelProto") -> Dict[str, int]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    types = {i.name: i.data_type for i in g.initializer}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def fp32_node_indices(
    graph: "onnx.GraphProto",
    types: Dict[str, int],
    keep_fp32_ops: Iterable[str] = KEEP_FP32_OPS,
    keep_fp32_outputs: Iterable[str] = KEEP_FP32_OUTPUTS,
    keep_fp32_after: Iterable[str] = KEEP_FP32_AFTER,
) -> Tuple[Set[int], List[str]]:
    """Indices of the nodes that must stay fp32 (see the module docstring) and the kept outputs.

    The walk goes from the seeds (ArgMax/ArgMin/TopK data inputs, float->int Cast inputs, coordinate
    inputs of GridSample/Resize, the outputs named in ``keep_fp32_outputs``) back through producers,
    stopping at Shape/Size and at graph inputs/initializers. Every node consuming (directly or not)
    a tensor named in ``keep_fp32_after`` is kept too (post-processing of the logits).
    """
    keep_ops = set(keep_fp32_ops)
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    kept: Set[int] = set()
    seeds: List[str] = []
    for i, node in enumerate(graph.node):
        if node.op_type in keep_ops:
            kept.add(i)
        if node.op_type in _INDEX_OPS:
            kept.add(i)
            seeds.append(node.input[0])
        elif node.op_type == "Cast" and types.get(node.input[0]) == FLOAT:
            to = next(a.i for a in node.attribute if a.name == "to")
            if to in _INT_TYPES:
                kept.add(i)
                seeds.append(node.input[0])
        for slot in _COORD_INPUTS.get(node.op_type, ()):
            if slot < len(node.input) and node.input[slot]:
                seeds.append(node.input[slot])
    outputs = {o.name for o in graph.output}
    kept_outputs = [o for o in keep_fp32_outputs if o in outputs]
    seeds.extend(kept_outputs)
    seen: Set[str] = set()
    while seeds:
        name = seeds.pop()
        if name in seen:
            continue
        seen.add(name)
        p = producer.get(name)
        if p is None:
            continue
        kept.add(p)
        if graph.node[p].op_type not in _SHAPE_ONLY:
            seeds.extend(x for x in graph.node[p].input if x)
    consumers: Dict[str, List[int]] = {}
    for i, node in enumerate(graph.node):
        for x in node.input:
            consumers.setdefault(x, []).append(i)
    after, seen = list(keep_fp32_after), set()
    while after:
        name = after.pop()
        if name in seen:
            continue
        seen.add(name)
        for i in consumers.get(name, []):
            kept.add(i)
            after.extend(o for o in graph.node[i].output if o)
    return kept, kept_outputs


def _to_fp16_array(tensor: "onnx.TensorProto") -> Tuple["onnx.TensorProto", int]:
    import numpy as np
    from onnx import numpy_helper

    arr = numpy_helper.to_array(tensor)
    clipped = int(np.count_nonzero(np.abs(arr[np.isfinite(arr)]) > FP16_MAX))
    out = numpy_helper.from_array(np.clip(arr, -FP16_MAX, FP16_MAX).astype(np.float16), tensor.name)
    return out, clipped


# --------------------------------------------------------------------------------- converter
def convert_fp16(
    model: "onnx.ModelProto | str | Path",
    io_dtype: str = "fp32",
    keep_fp32_ops: Sequence[str] = KEEP_FP32_OPS,
    keep_fp32_outputs: Sequence[str] = KEEP_FP32_OUTPUTS,
    dtype: str = "fp16",
    keep_fp32_after: Sequence[str] = KEEP_FP32_AFTER,
) -> Fp16Conversion:
    """Convert an fp32 ONNX model (a canonwrap export or any plain graph) to fp16.

    Args:
        model: ``onnx.ModelProto`` or a path to an ``.onnx`` file (the input is not modified).
        io_dtype: ``"fp32"`` (graph inputs/outputs stay float32, Casts inside) or ``"fp16"``.
        keep_fp32_ops: op types always computed in fp32.
        keep_fp32_outputs: graph outputs computed entirely in fp32 (with everything feeding them).
        keep_fp32_after: tensors whose downstream nodes are computed in fp32.
        dtype: ``"fp16"``; ``"bf16"`` raises ValueError with the reason.
    Returns:
        :class:`Fp16Conversion` with the new model and what was kept / inserted.
    Raises:
        ValueError: bf16, unknown dtypes, control-flow ops (If/Loop/Scan), a non-fp32 input model.
    """
    import onnx

    check_dtype(dtype, io_dtype)
    src = onnx.load(str(model)) if isinstance(model, (str, Path)) else model
    m = onnx.ModelProto()
    m.CopyFrom(src)
    g = m.graph
    for node in g.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"control-flow op {node.op_type} ({node.name!r}) is not supported by the fp16 converter")
    half = [v.name for v in list(g.input) + list(g.output) if v.type.tensor_type.elem_type == FLOAT16]
    half += [t.name for t in g.initializer if t.data_type == FLOAT16]
    if half or any(p.key == "dtype" and p.value == "fp16" for p in m.metadata_props):
        raise ValueError(f"expected an fp32 model; it already has float16 tensors ({half[:3]}...)")
    _constants_to_initializers(g)
    for i, node in enumerate(g.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in m.opset_import}
    types = _elem_types(m)
    kept, kept_outputs = fp32_node_indices(g, types, keep_fp32_ops, keep_fp32_outputs, keep_fp32_after)
    schemas = [_schema(n, opsets) for n in g.node]
    kept |= {i for i, s in enumerate(schemas) if s is None}  # unknown (custom) ops stay fp32

    fp32_names = [g.node[i].name for i in sorted(kept)]
    n_nodes = len(g.node)

    # 1. what each float input slot wants
    def wanted(i: int, slot: int) -> int:
        if i in kept or not _slot_allows_fp16(schemas[i], slot):
            return FLOAT
        return FLOAT16

    inits = {t.name: t for t in g.initializer}
    init_wants: Dict[str, Set[int]] = {}
    for i, node in enumerate(g.node):
        for slot, name in enumerate(node.input):
            if name in inits and inits[name].data_type == FLOAT and node.op_type not in _SHAPE_ONLY:
                init_wants.setdefault(name, set()).add(wanted(i, slot))
    graph_io = {v.name for v in list(g.input) + list(g.output)}
    # 2. initializers: convert in place when every use wants fp16, else add an fp16 copy
    cur: Dict[str, int] = {}  # tensor name -> elem type in the new graph
    variants: Dict[Tuple[str, int], str] = {}  # (tensor, type) -> name of a tensor of that type
    n_inits = n_clipped = 0
    new_inits = []
    for t in g.initializer:
        cur[t.name] = t.data_type
        if t.data_type != FLOAT or FLOAT16 not in init_wants.get(t.name, set()):
            continue
        half, clipped = _to_fp16_array(t)
        n_inits, n_clipped = n_inits + 1, n_clipped + clipped
        if init_wants[t.name] == {FLOAT16} and t.name not in graph_io:
            t.CopyFrom(half)
            cur[t.name] = FLOAT16
        else:
            half.name = f"{t.name}__fp16"
            new_inits.append(half)
            cur[half.name] = FLOAT16
            variants[(t.name, FLOAT16)] = half.name
    g.initializer.extend(new_inits)
    io_type = FLOAT16 if io_dtype == "fp16" else FLOAT
    for v in g.input:
        if v.type.tensor_type.elem_type == FLOAT and v.name not in cur:
            v.type.tensor_type.elem_type = io_type
        cur.setdefault(v.name, v.type.tensor_type.elem_type)

    # 3. walk the nodes in order, inserting Casts where precisions differ
    nodes, n_casts = [], 0

    def cast_to(name: str, to: int) -> str:
        nonlocal n_casts
        key = (name, to)
        if key not in variants:
            out = f"{name}__to_{'fp16' if to == FLOAT16 else 'fp32'}"
            nodes.append(onnx.helper.make_node("Cast", [name], [out], name=f"Cast_{out}", to=to))
            cur[out] = to
            variants[key] = out
            n_casts += 1
        return variants[key]

    for i, node in enumerate(g.node):
        for slot, name in enumerate(node.input):
            if name and cur.get(name) in (FLOAT, FLOAT16) and node.op_type not in _SHAPE_ONLY:
                want = wanted(i, slot)
                if cur[name] != want:
                    node.input[slot] = cast_to(name, want)
        if i not in kept:
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
                    attr.i = FLOAT16
                elif node.op_type in _NEW_FLOAT_ATTR_OPS and attr.name == "dtype" and attr.i == FLOAT:
                    attr.i = FLOAT16
                elif node.op_type == "ConstantOfShape" and attr.name == "value" and attr.t.data_type == FLOAT:
                    attr.t.CopyFrom(_to_fp16_array(attr.t)[0])
            if node.op_type == "ConstantOfShape" and not node.attribute:  # default value is fp32 zero
                node.attribute.append(onnx.helper.make_attribute("value", onnx.helper.make_tensor("value", FLOAT16, [1], [0.0])))
        nodes.append(node)
        for out, typ in _output_types(node, schemas[i], cur, types, opsets).items():
            cur[out] = typ

    # 4. graph outputs get io_dtype (rename the internal tensor, Cast into the output name)
    for v in g.output:
        orig = v.type.tensor_type.elem_type
        if orig != FLOAT:
            continue
        v.type.tensor_type.elem_type = io_type
        if cur.get(v.name) != io_type:
            internal = f"{v.name}__{'fp16' if cur[v.name] == FLOAT16 else 'fp32'}"
            for node in nodes:
                node.input[:] = [internal if x == v.name else x for x in node.input]
                node.output[:] = [internal if x == v.name else x for x in node.output]
            cur[internal] = cur.pop(v.name)
            nodes.append(onnx.helper.make_node("Cast", [internal], [v.name], name=f"Cast_{v.name}_out", to=io_type))
            n_casts += 1
            cur[v.name] = io_type
    del g.node[:]
    g.node.extend(nodes)
    for vi in g.value_info:  # keep the shapes, fix the element types
        if vi.name in cur and vi.type.HasField("tensor_type"):
            vi.type.tensor_type.elem_type = cur[vi.name]
    _set_metadata(m, {"dtype": "fp16", "io_dtype": io_dtype, "fp16_fp32_nodes": str(len(fp32_names))})
    return Fp16Conversion(m, io_dtype, fp32_names, n_nodes - len(fp32_names), n_casts, n_inits, n_clipped, kept_outputs)


def _output_types(node, schema, cur: Dict[str, int], orig: Dict[str, int], opsets: Dict[str, int]) -> Dict[str, int]:
    """Element types of ``node``'s outputs given the current input types (onnx inference)."""
    import onnx

    if schema is not None:
        in_types = {x: onnx.helper.make_tensor_type_proto(cur[x], None) for x in node.input if x and x in cur}
        try:
            inferred = onnx.shape_inference.infer_node_outputs(
                schema, node, in_types,
                opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()],
            )
            return {k: v.tensor_type.elem_type for k, v in inferred.items() if v.HasField("tensor_type")}
        except Exception:  # pragma: no cover - fall back to the original types
            pass
    return {o: orig[o] for o in node.output if o in orig}


def _set_metadata(model: "onnx.ModelProto", entries: Dict[str, str]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for key, value in entries.items():
        prop = existing.get(key) or model.metadata_props.add()
        prop.key, prop.value = key, str(value)


# -------------------------------------------------------------------------------- validation
def type_problems(model: "onnx.ModelProto") -> List[str]:
    """Type inconsistencies a runtime would reject, as readable strings (empty = consistent).

    Runs strict shape/type inference, then checks every node: inputs and outputs bound to the same
    type parameter of the op schema must have the same element type, and every input's type must be
    one the schema allows (this is what catches fp32 constants feeding fp16 ops).
    """
    import onnx

    problems: List[str] = []
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as err:  # noqa: BLE001 - reported, not raised
        return [f"strict type inference failed: {err}"]
    g = inferred.graph
    types = {t.name: t.data_type for t in g.initializer}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    names = {v: k for k, v in onnx.TensorProto.DataType.items()}
    for node in g.node:
        schema = _schema(node, opsets)
        if schema is None:
            continue
        allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
        bound: Dict[str, Set[int]] = {}
        for formals, values in ((schema.inputs, node.input), (schema.outputs, node.output)):
            for slot, name in enumerate(values):
                if not name or not formals or name not in types:
                    continue
                formal = formals[min(slot, len(formals) - 1)]
                typ = types[name]
                if not typ:  # undefined (e.g. an unused optional output)
                    continue
                ok = allowed.get(formal.type_str, {formal.type_str})
                if _type_str(typ) not in ok:
                    problems.append(f"{node.op_type} {node.name!r}: {name} is {names.get(typ, typ)}, allowed {sorted(ok)}")
                if formal.type_str in allowed and formal.is_homogeneous:
                    bound.setdefault(formal.type_str, set()).add(typ)
        for param, seen in bound.items():
            if len(seen) > 1:
                problems.append(
                    f"{node.op_type} {node.name!r}: type parameter {param} bound to {sorted(names.get(t, t) for t in seen)}"
                )
    return problems


def _type_str(elem_type: int) -> str:
    """ONNX element type -> the schema's spelling, e.g. 10 -> ``tensor(float16)``."""
    import onnx

    return f"tensor({onnx.TensorProto.DataType.Name(elem_type).lower()})"


def validate_fp16(model: "onnx.ModelProto | str | Path", providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
    """Raise ValueError unless the model passes ``onnx.checker`` (full check), strict type inference,
    the per-node type consistency check of :func:`type_problems`, and loads in onnxruntime."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(model)) if isinstance(model, (str, Path)) else model
    problems = type_problems(proto)
    if problems:
        raise ValueError("inconsistent types in the fp16 graph:\n  " + "\n  ".join(problems[:20]))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as err:  # noqa: BLE001 - onnx raises its own (non-ValueError) types
        raise ValueError(f"onnx.checker rejected the fp16 graph: {err}") from err
    try:
        ort.InferenceSession(proto.SerializeToString(), providers=list(providers))
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"onnxruntime cannot load the fp16 graph with {list(providers)}: {err}") from err


def convert_fp16_file(
    src: "str | Path",
    dst: "str | Path | None" = None,
    io_dtype: str = "fp32",
    keep_fp32_ops: Sequence[str] = KEEP_FP32_OPS,
    keep_fp32_outputs: Sequence[str] = KEEP_FP32_OUTPUTS,
    dtype: str = "fp16",
    validate: bool = True,
    keep_fp32_after: Sequence[str] = KEEP_FP32_AFTER,
) -> Fp16Conversion:
    """Convert the file ``src`` and write ``dst`` (default ``<src stem>.fp16.onnx``); with
    ``validate`` the result must pass :func:`validate_fp16` (checker, types, onnxruntime CPU load)."""
    import onnx

    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_name(f"{src.stem}.fp16.onnx")
    result = convert_fp16(src, io_dtype, keep_fp32_ops, keep_fp32_outputs, dtype, keep_fp32_after)
    if validate:
        validate_fp16(result.model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(result.model, str(dst))
    result.path = str(dst)
    return result
