"""Parity between an exported graph (run by onnxruntime) and the PyTorch model.

Per input set and batch size: max / mean abs logit difference, max difference relative to the
logit scale, cosine similarity, top-1 agreement and chosen-element agreement. A near-tie that flips
the element changes the output a lot, so logit differences are measured on the samples whose
element agrees and element disagreements are counted separately.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor


@dataclass
class ParityRow:
    inputs: str
    batch: int
    max_abs: float
    mean_abs: float
    rel_max: float
    cosine: float
    top1_agreement: float
    element_agreement: float


@dataclass
class VerifyReport:
    path: str
    providers: List[str]
    rows: List[ParityRow]
    tolerance: float
    passed: bool
    failures: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        head = f"ONNX parity ({Path(self.path).name}, {', '.join(self.providers)}): {'PASS' if self.passed else 'FAIL'}"
        cols = f"{'inputs':<8}{'batch':>6}{'max|d|':>11}{'mean|d|':>11}{'rel max':>10}{'cosine':>10}{'top1':>8}{'element':>9}"
        lines = [head, cols]
        for r in self.rows:
            lines.append(
                f"{r.inputs:<8}{r.batch:>6}{r.max_abs:>11.2e}{r.mean_abs:>11.2e}{r.rel_max:>10.2e}"
                f"{r.cosine:>10.6f}{100 * r.top1_agreement:>7.1f}%{100 * r.element_agreement:>8.1f}%"
            )
        lines += [f"  ! {f}" for f in self.failures]
        return "\n".join(lines)


def _row(name: str, ref: Dict[str, np.ndarray], got: Dict[str, np.ndarray]) -> ParityRow:
    same = ref["element"] == got["element"]
    a, b = ref["logits"][same], got["logits"][same]
    diff = np.abs(a - b) if a.size else np.zeros(1)
    scale = max(float(np.abs(ref["logits"]).max()), 1e-6)
    af, bf = ref["logits"].reshape(len(same), -1).astype(np.float64), got["logits"].reshape(len(same), -1).astype(np.float64)
    cos = (af * bf).sum(1) / np.maximum(np.linalg.norm(af, axis=1) * np.linalg.norm(bf, axis=1), 1e-12)
    return ParityRow(
        inputs=name,
        batch=int(len(same)),
        max_abs=float(diff.max()),
        mean_abs=float(diff.mean()),
        rel_max=float(diff.max()) / scale,
        cosine=float(cos.mean()),
        top1_agreement=float((ref["logits"].argmax(1) == got["logits"].argmax(1)).mean()),
        element_agreement=float(same.mean()),
    )


def verify_onnx(
    path: "str | Path",
    model: Any,
    x: Optional[Tensor] = None,
    batch_sizes: Sequence[int] = (1, 3, 16),
    tolerance: float = 1e-4,
    providers: Optional[Sequence[str]] = None,
    seed: int = 0,
) -> VerifyReport:
    """Run the exported graph with onnxruntime and compare with ``model`` (fp32, same inputs).

    Args:
        x: real inputs (B, C, H, W) in [0, 1] (the strongest check); random inputs at every batch
            size in ``batch_sizes`` (including 1 and an odd size) are always added.
        tolerance: bound on max |logit difference| / max |logit| (elements agreeing).
        providers: onnxruntime providers (default CPU).
    Returns:
        :class:`VerifyReport`; ``passed`` needs every row within tolerance, 100% element
        agreement on real inputs and >= 99% on random ones.
    """
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=list(providers or ["CPUExecutionProvider"]))
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    sets = [(f"random", torch.rand(b, *model.config.input_size, generator=gen)) for b in batch_sizes]
    if x is not None:
        sets.append(("real", x.detach().float().cpu()))
    was_training = model.training
    model.eval()
    rows, failures = [], []
    try:
        for name, inputs in sets:
            with torch.no_grad():
                logits, element, _ = model.forward_with_element(inputs.to(device))
            ref = {"logits": logits.float().cpu().numpy(), "element": element.cpu().numpy()}
            outs = sess.run(["logits", "element"], {"pixel_values": inputs.numpy().astype(np.float32)})
            got = {"logits": outs[0].astype(np.float32), "element": outs[1]}
            row = _row(name, ref, got)
            rows.append(row)
            need_elem = 1.0 if name == "real" else 0.99
            if row.rel_max > tolerance:
                failures.append(f"{name} batch {row.batch}: relative max diff {row.rel_max:.2e} > {tolerance:.0e}")
            if row.element_agreement < need_elem:
                failures.append(f"{name} batch {row.batch}: element agreement {row.element_agreement:.3f} < {need_elem}")
    finally:
        model.train(was_training)
    return VerifyReport(str(path), list(sess.get_providers()), rows, tolerance, not failures, failures)
