"""Render an evaluation report: ``report.json`` + a self-contained ``report.html`` + PNG plots.

The report is a plain dict (what ``cw.evaluate`` returns). Every key is optional; a section is
rendered only when its key is present. Numbers may be Python floats, numpy arrays or tensors;
NaN/inf are written to JSON as ``null``. Accuracies are fractions in [0, 1].

Report schema (A angles, E group elements, P epsilons, S severities, n bins, U curve points)::

    {
      "title": str,                                   # page title (default "canonwrap report")
      "meta": {str: scalar},                          # model, group, dataset, n_test, versions, ...
      "summary": {str: float | str},                  # headline numbers, e.g. "c8_avg_acc", "worst_angle_acc"
      "angles": {                                     # -> "Accuracy vs rotation angle"   (angles.png)
        "angles": [A] degrees,
        "accuracy": {series: [A]},                    # e.g. {"wrapped": [...], "frozen": [...]}
      },
      "per_element": {                                # -> "Per-element accuracy"         (per_element.png)
        "elements": [E] str,                          # group element names, e.g. "rot0", "rot90", ...
        "accuracy": {series: [E]},
      },
      "adversarial": {                                # -> "Adversarial accuracy vs eps"  (adversarial.png)
        "eps": [P],                                   # perturbation budget in [0, 1] pixel units; 0 = clean
        "accuracy": {attack: [P]},                    # e.g. {"pgd": [...], "apgd": [...]}
        "norm": str,                                  # optional, e.g. "linf" (axis label)
      },
      "corruptions": {                                # -> "Corruption accuracy by severity" (corruptions.png)
        "severities": [S] ints,                       # usually [1, 2, 3, 4, 5]
        "accuracy": {corruption: [S]},                # names from canonwrap.corruptions.list_corruptions()
        "clean": float,                               # optional; drawn as a dashed line
      },
      "calibration": {                                # -> "Reliability diagram"          (reliability.png)
        "bins": {label: reliability_bins(...)},       # e.g. {"before": ..., "after T": ...}; a single
                                                      # reliability_bins dict is accepted as {"model": it}
        "metrics": {label: {str: float}},             # optional table, e.g. {"ece", "nll", "brier", "temperature"}
      },
      "risk_coverage": {                              # -> "Risk-coverage curve"          (risk_coverage.png)
        "curves": {score: {"coverage": [U], "risk": [U]}},   # from metrics.risk_coverage
        "metrics": {score: {str: float}},             # optional table, e.g. {"auroc", "aurc", "acc@90%"}
      },
    }

Other top-level keys are kept in ``report.json`` but not rendered. A bare ``reliability_bins`` dict
has keys ``edges`` (n+1), ``confidence`` (n), ``accuracy`` (n), ``count`` (n).

Example::

    >>> html_path = render_report({"angles": {"angles": [0, 45, 90],
    ...                                       "accuracy": {"wrapped": [0.97, 0.95, 0.97]}}}, "runs/eval")
    >>> sorted(p.name for p in html_path.parent.iterdir())
    ['angles.png', 'report.html', 'report.json']

matplotlib is imported lazily (inside :func:`render_report`) and used through its Agg canvas
only; pyplot and the global backend are not touched. PNGs in ``out_dir`` from earlier runs are not
deleted.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import numbers
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple, Union

import numpy as np

__all__ = ["render_report", "SECTIONS", "to_jsonable"]

# section key -> (heading, PNG file name); also the order on the page
SECTIONS: Dict[str, Tuple[str, str]] = {
    "angles": ("Accuracy vs rotation angle", "angles.png"),
    "per_element": ("Per-element accuracy", "per_element.png"),
    "adversarial": ("Adversarial accuracy vs \u03b5", "adversarial.png"),
    "corruptions": ("Corruption accuracy by severity", "corruptions.png"),
    "calibration": ("Reliability diagram", "reliability.png"),
    "risk_coverage": ("Risk\u2013coverage curve", "risk_coverage.png"),
}


# ----------------------------------------------------------------------------- JSON
def to_jsonable(obj: Any, where: str = "report") -> Any:
    """Convert tensors / numpy values to plain JSON types; NaN and inf become ``None``."""
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):  # torch.Tensor, without importing torch
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist(), where)
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item(), where)
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        f = float(obj)
        return f if math.isfinite(f) else None
    raise TypeError(f"{where}: cannot write {type(obj).__name__} to JSON (expected numbers, strings, lists, dicts, arrays)")


# ----------------------------------------------------------------------------- validation
def _need_dict(d: Any, where: str) -> Dict:
    if not isinstance(d, dict):
        raise TypeError(f"{where} must be a dict, got {type(d).__name__}")
    return d


def _need_key(d: Dict, key: str, where: str) -> Any:
    if key not in d:
        raise ValueError(f"{where} needs key {key!r} (got keys {sorted(d)})")
    return d[key]


def _need_list(x: Any, where: str) -> List:
    if not isinstance(x, list):
        raise TypeError(f"{where} must be a list (or array), got {type(x).__name__}")
    if not x:
        raise ValueError(f"{where} is empty")
    return x


def _check_series(section: Dict, x_key: str, where: str) -> None:
    """``section[x_key]`` is a list and every ``section['accuracy'][name]`` has its length."""
    xs = _need_list(_need_key(section, x_key, where), f"{where}[{x_key!r}]")
    acc = _need_dict(_need_key(section, "accuracy", where), f"{where}['accuracy']")
    if not acc:
        raise ValueError(f"{where}['accuracy'] is empty; expected {{series name: [{len(xs)} values]}}")
    for name, ys in acc.items():
        ys = _need_list(ys, f"{where}['accuracy'][{name!r}]")
        if len(ys) != len(xs):
            raise ValueError(
                f"{where}['accuracy'][{name!r}] has {len(ys)} values but {where}[{x_key!r}] has {len(xs)}"
            )


def _calibration_bins(cal: Dict) -> Dict[str, Dict]:
    bins = _need_dict(_need_key(cal, "bins", "report['calibration']"), "report['calibration']['bins']")
    if "edges" in bins:  # a single reliability_bins dict
        bins = {"model": bins}
    for label, b in bins.items():
        where = f"report['calibration']['bins'][{label!r}]"
        _need_dict(b, where)
        edges = _need_list(_need_key(b, "edges", where), f"{where}['edges']")
        for key in ("confidence", "accuracy", "count"):
            vals = _need_list(_need_key(b, key, where), f"{where}[{key!r}]")
            if len(vals) != len(edges) - 1:
                raise ValueError(f"{where}[{key!r}] has {len(vals)} values; expected len(edges) - 1 = {len(edges) - 1}")
    return bins


def _check_risk_coverage(rc: Dict) -> None:
    curves = _need_dict(_need_key(rc, "curves", "report['risk_coverage']"), "report['risk_coverage']['curves']")
    if not curves:
        raise ValueError("report['risk_coverage']['curves'] is empty; expected {score: {'coverage': [...], 'risk': [...]}}")
    for name, c in curves.items():
        where = f"report['risk_coverage']['curves'][{name!r}]"
        _need_dict(c, where)
        cov = _need_list(_need_key(c, "coverage", where), f"{where}['coverage']")
        risk = _need_list(_need_key(c, "risk", where), f"{where}['risk']")
        if len(cov) != len(risk):
            raise ValueError(f"{where}: 'coverage' has {len(cov)} values but 'risk' has {len(risk)}")


def _validate(rep: Dict) -> None:
    for key in ("meta", "summary"):
        if key in rep:
            _need_dict(rep[key], f"report[{key!r}]")
    for key in SECTIONS:
        if key in rep:
            _need_dict(rep[key], f"report[{key!r}]")
    if "angles" in rep:
        _check_series(rep["angles"], "angles", "report['angles']")
    if "per_element" in rep:
        _check_series(rep["per_element"], "elements", "report['per_element']")
    if "adversarial" in rep:
        _check_series(rep["adversarial"], "eps", "report['adversarial']")
    if "corruptions" in rep:
        _check_series(rep["corruptions"], "severities", "report['corruptions']")
    if "calibration" in rep:
        _calibration_bins(rep["calibration"])
    if "risk_coverage" in rep:
        _check_risk_coverage(rep["risk_coverage"])


# ----------------------------------------------------------------------------- plots
def _arr(values: List) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _new_axes(ncols: int = 1, width: float = 6.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols if ncols > 1 else width, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _acc_axis(ax, xlabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _plot_lines(section: Dict, x_key: str, xlabel: str, title: str, marker: str = "o"):
    fig, (ax,) = _new_axes()
    xs = _arr(section[x_key])
    for name, ys in section["accuracy"].items():
        ax.plot(xs, _arr(ys), marker=marker, ms=3, label=str(name))
    if section.get("clean") is not None:
        ax.axhline(float(section["clean"]), ls="--", c="gray", label="clean")
    ax.set_title(title)
    _acc_axis(ax, xlabel)
    return fig


def _plot_angles(sec: Dict):
    return _plot_lines(sec, "angles", "rotation angle (degrees)", "Accuracy vs rotation angle")


def _plot_adversarial(sec: Dict):
    norm = sec.get("norm")
    xlabel = f"\u03b5 ({norm})" if norm else "\u03b5"
    return _plot_lines(sec, "eps", xlabel, "Adversarial accuracy vs \u03b5")


def _plot_corruptions(sec: Dict):
    fig = _plot_lines(sec, "severities", "severity", "Corruption accuracy by severity")
    fig.axes[0].set_xticks(_arr(sec["severities"]))
    return fig


def _plot_per_element(sec: Dict):
    names = [str(e) for e in sec["elements"]]
    series = list(sec["accuracy"].items())
    fig, (ax,) = _new_axes(width=max(6.0, 0.5 * len(names) * max(1, len(series))))
    x = np.arange(len(names))
    width = 0.8 / len(series)
    for i, (name, ys) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, _arr(ys), width=width, label=str(name))
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=45 if len(names) > 8 else 0, fontsize=8)
    ax.set_title("Per-element accuracy")
    _acc_axis(ax, "group element")
    return fig


def _plot_reliability(sec: Dict):
    bins = _calibration_bins(sec)
    metrics = sec.get("metrics") or {}
    fig, axes = _new_axes(ncols=len(bins), width=4.5)
    for ax, (label, b) in zip(axes, bins.items()):
        edges = _arr(b["edges"])
        left, widths = edges[:-1], np.diff(edges)
        acc, conf = _arr(b["accuracy"]), _arr(b["confidence"])
        ax.bar(left, np.nan_to_num(acc), width=widths, align="edge", edgecolor="black", lw=0.5, label="accuracy")
        gap = np.nan_to_num(conf - acc)
        ax.bar(left, gap, bottom=np.nan_to_num(acc), width=widths, align="edge", color="red", alpha=0.3, label="gap")
        ax.plot([0, 1], [0, 1], ls="--", c="gray")
        ece = (metrics.get(label) or {}).get("ece") if isinstance(metrics, dict) else None
        ax.set_title(f"{label}" + (f" (ECE {ece:.3f})" if isinstance(ece, (int, float)) else ""))
        ax.set_xlim(0, 1)
        _acc_axis(ax, "confidence")
    return fig


def _plot_risk_coverage(sec: Dict):
    fig, (ax,) = _new_axes()
    for name, c in sec["curves"].items():
        ax.plot(_arr(c["coverage"]), _arr(c["risk"]), label=str(name))
    ax.set_xlabel("coverage")
    ax.set_ylabel("risk (error rate among accepted)")
    ax.set_xlim(0, 1.02)
    ax.set_title("Risk\u2013coverage curve")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


_PLOTTERS: Dict[str, Callable[[Dict], Any]] = {
    "angles": _plot_angles,
    "per_element": _plot_per_element,
    "adversarial": _plot_adversarial,
    "corruptions": _plot_corruptions,
    "calibration": _plot_reliability,
    "risk_coverage": _plot_risk_coverage,
}


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ----------------------------------------------------------------------------- HTML
_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; font-size: 0.9em; }
img { max-width: 100%; }
figcaption { color: #666; font-size: 0.8em; }
"""


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _kv_table(d: Dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in d.items())
    return f"<table>{rows}</table>"


def _metrics_table(metrics: Dict) -> str:
    """{row: {column: value}} -> HTML table."""
    rows = [r for r in metrics.values() if isinstance(r, dict)]
    if not rows:
        return ""
    cols: List[str] = []
    for r in rows:
        cols += [str(c) for c in r if str(c) not in cols]
    head = "<tr><th></th>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"
    body = ""
    for name, r in metrics.items():
        if isinstance(r, dict):
            r = {str(k): v for k, v in r.items()}
            body += f"<tr><th>{html.escape(str(name))}</th>" + "".join(
                f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols
            ) + "</tr>"
    return f"<table>{head}{body}</table>"


def render_report(report: Dict[str, Any], out_dir: Union[str, Path]) -> Path:
    """Write ``report.json``, one PNG per present section and a self-contained ``report.html``.

    Args:
        report: dict following the schema at the top of this module.
        out_dir: output folder (created if missing).

    Returns:
        Path of ``report.html`` (``report.json`` and the PNGs sit next to it).

    Raises:
        TypeError / ValueError: the report does not follow the schema (the message names the key).
        ImportError: matplotlib is not installed.

    Example::

        >>> render_report({"summary": {"c8_avg_acc": 0.95}, "calibration": {"bins": reliability_bins(p, y)}}, "out")
        PosixPath('out/report.html')
    """
    if not isinstance(report, dict):
        raise TypeError(f"report must be a dict, got {type(report).__name__}")
    rep = to_jsonable(report)
    _validate(rep)
    present = [k for k in SECTIONS if k in rep]
    if present:
        try:
            import matplotlib  # noqa: F401
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("render_report needs matplotlib for the plots: pip install matplotlib") from e

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rep, indent=2, allow_nan=False))

    title = str(rep.get("title") or "canonwrap report")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    if rep.get("meta"):
        parts.append("<h2>Setup</h2>" + _kv_table(rep["meta"]))
    if rep.get("summary"):
        parts.append("<h2>Summary</h2>" + _kv_table(rep["summary"]))
    for key in present:
        heading, fname = SECTIONS[key]
        fig = _PLOTTERS[key](rep[key])
        png = _png_bytes(fig)
        (out / fname).write_bytes(png)
        b64 = base64.b64encode(png).decode("ascii")
        parts.append(f"<section id='{key}'><h2>{html.escape(heading)}</h2>")
        parts.append(f"<figure><img alt='{html.escape(heading)}' src='data:image/png;base64,{b64}'>"
                     f"<figcaption>{fname}</figcaption></figure>")
        if isinstance(rep[key].get("metrics"), dict):
            parts.append(_metrics_table(rep[key]["metrics"]))
        parts.append("</section>")
    if not present and not rep.get("summary"):
        parts.append("<p>No results in this report.</p>")
    parts.append("</body></html>")
    html_path = out / "report.html"
    html_path.write_text("\n".join(parts), encoding="utf-8")
    return html_path
