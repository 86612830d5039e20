"""Export a wrapped model to ONE ONNX graph: validate-free pixels -> canonicalize -> backbone -> head.

Inputs: ``pixel_values`` (B, C, H, W) float32 in [0, 1], dynamic batch.
Outputs: ``logits`` (B, K), ``element`` (B,) int64 chosen group element (the input is
``element . canonical``), ``scores`` (B, G) canonicalizer scores.
The data-dependent choice is an ArgMax feeding Gather ops over precomputed warp tables; there is
no Python control flow on data, so nothing about the example batch is baked in.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

OUTPUT_NAMES = ("logits", "element", "scores")
INPUT_NAME = "pixel_values"


class _ExportModule(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return self.model.forward_with_element(pixel_values)


@dataclass
class ExportResult:
    path: str
    exporter: str
    opset: int
    seconds: float
    size_mb: float
    metadata: Dict[str, str]


def build_metadata(model: Any, exporter: str, opset: int) -> Dict[str, str]:
    """Everything a deployment needs besides onnxruntime, as strings (JSON for structures)."""
    import onnx

    import canonwrap

    cfg = model.config
    group = model.group
    elements = [{"index": e, "angle": group.angle(e), "flip": group.flip(e)} for e in range(group.order)]
    return {
        "canonwrap_version": canonwrap.__version__,
        "group": cfg.group,
        "group_elements": json.dumps(elements),
        "canonicalizer": cfg.canonicalizer,
        "canonicalizer_config": json.dumps(cfg.canonicalizer_config),
        "canon_size": str(cfg.canon_size),
        "mean": json.dumps(list(cfg.mean)),
        "std": json.dumps(list(cfg.std)),
        "input_size": json.dumps(list(cfg.input_size)),
        "input_range": "[0, 1]",
        "num_classes": str(model.num_classes),
        "class_names": json.dumps(cfg.class_names),
        "backbone": json.dumps(cfg.backbone),
        "inputs": INPUT_NAME,
        "outputs": json.dumps(list(OUTPUT_NAMES)),
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "exporter": exporter,
        "opset": str(opset),
    }


def export_onnx(
    model: Any,
    path: "str | Path",
    opset: int = 18,
    exporter: str = "dynamo",
    example_batch: int = 2,
    metadata: Optional[Dict[str, str]] = None,
    dtype: str = "fp32",
    io_dtype: str = "fp32",
    uncertainty: bool = False,
    reject_threshold: Optional[float] = None,
    reject_score: str = "entropy",
) -> ExportResult:
    """Export ``model`` (a :class:`canonwrap.CanonicalizedModel`) to ``path``.

    Args:
        opset: ONNX opset (>= 18).
        exporter: ``"dynamo"`` (torch.export based, the default since torch 2.9) or
            ``"torchscript"`` (the legacy tracer; also works: the graph has no data-dependent
            Python control flow).
        example_batch: batch of the example input (2: a batch of 1 would be specialized).
        metadata: extra ``metadata_props`` entries.
        dtype: ``"fp32"`` or ``"fp16"`` (the fp32 export converted by :mod:`converters.fp16`: the
            canonicalizer's selection path stays fp32); ``"bf16"`` raises ValueError with the reason.
        io_dtype: with ``dtype="fp16"``, the graph's float inputs/outputs (``"fp32"`` or ``"fp16"``).
        uncertainty: add the outputs ``probs`` (``softmax(logits / model.temperature)``), ``entropy``,
            ``canon_margin`` and, for an ensemble head, ``ensemble_disagreement`` (see
            :mod:`converters.uncertainty`); metadata ``temperature`` and ``reject_score``.
        reject_threshold: with ``uncertainty=True``, the deployed reject threshold (e.g. from
            :func:`converters.uncertainty.reject_threshold` on validation data), written to the
            metadata with ``reject_rule``.
        reject_score: the output the threshold applies to: ``entropy`` (default, reject above),
            ``canon_margin`` (reject below) or ``ensemble_disagreement`` (reject above).
    Returns:
        :class:`ExportResult` with the metadata written into the file.
    """
    import onnx

    if exporter not in ("dynamo", "torchscript"):
        raise ValueError(f"exporter must be 'dynamo' or 'torchscript'; got {exporter!r}")
    if opset < 18:
        raise ValueError(f"opset must be >= 18; got {opset}")
    if reject_threshold is not None and not uncertainty:
        raise ValueError("reject_threshold needs uncertainty=True (the graph must output the score it applies to)")
    if uncertainty:
        from .uncertainty import uncertainty_metadata

        uncertainty_metadata(model, (), reject_threshold, reject_score)  # validate before the (slow) export
    if dtype != "fp32":
        from .fp16 import check_dtype

        check_dtype(dtype, io_dtype, allowed=("fp32", "fp16"))  # fail before the (slow) export
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    was_training, was_checking = model.training, model.check_inputs
    model.eval()
    model.check_inputs = False  # range checks are data dependent; shapes are fixed by the graph
    example = torch.rand(example_batch, *model.config.input_size, device=device)
    if uncertainty:
        from .uncertainty import UncertaintyExportModule

        module = UncertaintyExportModule(model).eval()
    else:
        module = _ExportModule(model).eval()
    output_names = list(getattr(module, "output_names", OUTPUT_NAMES))
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            if exporter == "dynamo":
                batch = torch.export.Dim("batch", min=1, max=65536)
                torch.onnx.export(
                    module, (example,), str(path), dynamo=True, opset_version=opset,
                    input_names=[INPUT_NAME], output_names=output_names,
                    dynamic_shapes={"pixel_values": {0: batch}}, external_data=False, verbose=False,
                )
            else:
                torch.onnx.export(
                    module, (example,), str(path), dynamo=False, opset_version=opset,
                    input_names=[INPUT_NAME], output_names=output_names,
                    dynamic_axes={INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in output_names}},
                )
    finally:
        model.train(was_training)
        model.check_inputs = was_checking
    seconds = time.perf_counter() - t0
    meta = build_metadata(model, exporter, opset)
    if uncertainty:
        meta.update(uncertainty_metadata(model, tuple(output_names), reject_threshold, reject_score))
    meta.update(metadata or {})
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))
    if dtype != "fp32":
        from .fp16 import convert_fp16_file

        converted = convert_fp16_file(path, path, io_dtype=io_dtype)
        meta.update({p.key: p.value for p in converted.model.metadata_props if p.key in ("dtype", "io_dtype", "fp16_fp32_nodes")})
    return ExportResult(str(path), exporter, opset, seconds, path.stat().st_size / 2**20, meta)


def read_metadata(path: "str | Path") -> Dict[str, Any]:
    """The canonwrap metadata of an exported file, JSON fields decoded (needs only onnx)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    raw = {p.key: p.value for p in proto.metadata_props}
    return decode_metadata(raw)


def decode_metadata(raw: Dict[str, str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            out[key] = value
    return out
