"""CPU inference cost of canonicalization over a ResNet-50-sized frozen backbone (issue 3 target:
the canonicalizer adds < 15% latency on CPU at batch 256, 224x224).

Cases, all under ``torch.inference_mode()`` on float32 pixels in [0, 1], (B, 3, 224, 224):

* ``backbone``        normalize + frozen timm ``resnet50`` (``pretrained=False``: random weights are
                      fine for timing);
* ``wrapped/<canon>`` ``cw.wrap("timm:resnet50", group=G, canonicalizer=<canon>)`` called as
                      ``model(x)`` (input check + canonicalize + normalize + backbone), for
                      ``orbit`` and ``equivariant``; both share the SAME backbone module as ``backbone``;
* ``tta``             test-time averaging: mean of the backbone's logits over the |G| elements,
                      each applied with ``canonwrap.groups.transform`` (the identity is not warped);
* ``canon/<canon>``   the canonicalizer alone: ``model.canonicalize(x)`` (input check, bilinear
                      downscale to ``canon_size``, scoring network, argmax, full-resolution warp).

Measurements are interleaved round-robin (round r runs every case once), so a change in machine
load hits all cases alike; ratios to the backbone are computed within the same run, both as a
ratio of medians and as the median of per-round paired ratios, on wall time and (column ``cpu``)
on the process's CPU time, which is less sensitive to other processes on a shared machine. ``--breakdown`` also times the
stages of ``canonicalize`` one by one (it repeats the steps of ``CanonicalizedModel.canonicalize``).
``--onnx`` adds a secondary column: the backbone (normalize + resnet50, ``torch.onnx.export``) and
the wrapped models (``cw.export_onnx``) in onnxruntime's CPU execution provider, same batch/threads.

Usage::

    python benchmarks/cpu_latency.py --batch 8 --repeats 2                # quick check (~1 min)
    python benchmarks/cpu_latency.py                                      # batch 256, 2 threads
    python benchmarks/cpu_latency.py --batch 32 256 --onnx --out cpu.json

Writes JSON (``--out``) with every sample, the summary, torch/timm/onnxruntime versions, thread
count, CPU model and the load average at start and end (and per round).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import canonwrap as cw  # noqa: E402
from canonwrap.groups import get_group, transform, warp_tables  # noqa: E402

TARGET_OVERHEAD = 0.15  # issue 3: wrapped / backbone < 1.15 at batch 256 on CPU


@dataclass
class Case:
    """One timed callable. ``fn(x)`` runs the case on the batch; ``repeats`` caps its rounds."""

    name: str
    fn: Callable[[Any], Any]
    repeats: int
    warmup: int


# ---------------------------------------------------------------------------------- environment
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> List[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "canonwrap": cw.__version__}
    for name in ("timm", "onnx", "onnxruntime", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "not installed"
    return out


# --------------------------------------------------------------------------------------- timing
def summarize(samples: List[float]) -> Dict[str, Any]:
    """Seconds -> median / p90 / min / mean (seconds), plus the raw samples."""
    arr = np.asarray(samples, dtype=np.float64)
    return {
        "n": int(arr.size),
        "median_s": float(np.median(arr)),
        "p90_s": float(np.percentile(arr, 90)),
        "min_s": float(arr.min()),
        "mean_s": float(arr.mean()),
        "samples_s": [float(v) for v in arr],
    }


def run_rounds(cases: List[Case], x: Any, repeats: int, label: str) -> Dict[str, Any]:
    """Warm up every case, then time ``repeats`` interleaved rounds. Returns per-case samples and
    per-round paired ratios to the first case (the reference)."""
    for case in cases:
        for _ in range(case.warmup):
            t0 = time.perf_counter()
            case.fn(x)
            print(f"  [{label}] warm-up {case.name}: {time.perf_counter() - t0:.2f} s", flush=True)
    samples: Dict[str, List[Optional[float]]] = {c.name: [] for c in cases}
    cpu: Dict[str, List[Optional[float]]] = {c.name: [] for c in cases}  # process CPU seconds
    round_load: List[List[float]] = []
    interrupted = False
    try:
        for r in range(repeats):
            round_load.append(loadavg())
            for case in cases:
                samples[case.name].append(None)
                cpu[case.name].append(None)
                if r >= case.repeats:
                    continue
                c0, t0 = time.process_time(), time.perf_counter()
                case.fn(x)
                samples[case.name][-1] = time.perf_counter() - t0
                cpu[case.name][-1] = time.process_time() - c0
            line = ", ".join(f"{n} {s[-1]:.2f}" for n, s in samples.items() if s[-1] is not None)
            print(f"  [{label}] round {r + 1}/{repeats} (load {round_load[-1]}): {line} s", flush=True)
    except KeyboardInterrupt:  # Ctrl-C / kill -INT: keep the finished samples and report them
        interrupted = True
        print(f"  [{label}] interrupted; summarizing the samples taken so far", flush=True)
    ref = cases[0].name
    ref_median = float(np.median([s for s in samples[ref] if s is not None] or [float("nan")]))
    ref_cpu = float(np.median([s for s in cpu[ref] if s is not None] or [float("nan")]))
    results: Dict[str, Any] = {}
    for case in cases:
        valid = [s for s in samples[case.name] if s is not None]
        if not valid:
            continue
        entry = summarize(valid)
        paired = [
            s / b for s, b in zip(samples[case.name], samples[ref]) if s is not None and b is not None
        ]
        entry["ratio_of_medians"] = entry["median_s"] / ref_median
        entry["paired_ratio_median"] = float(np.median(paired)) if paired else None
        entry["paired_ratios"] = paired
        cpu_valid = [s for s in cpu[case.name] if s is not None]
        cpu_paired = [s / b for s, b in zip(cpu[case.name], cpu[ref]) if s is not None and b is not None]
        entry["cpu_median_s"] = float(np.median(cpu_valid))
        entry["cpu_samples_s"] = cpu_valid
        entry["cpu_ratio_of_medians"] = entry["cpu_median_s"] / ref_cpu
        entry["cpu_paired_ratio_median"] = float(np.median(cpu_paired)) if cpu_paired else None
        results[case.name] = entry
    return {"reference": ref, "cases": results, "round_loadavg": round_load, "interrupted": interrupted}


# --------------------------------------------------------------------------------------- torch
def build_models(canonicalizers: List[str], group: str, canon_size: int) -> Dict[str, cw.CanonicalizedModel]:
    """One timm resnet50 (random weights) shared by every wrapped model."""
    models: Dict[str, cw.CanonicalizedModel] = {}
    backbone = None
    for name in canonicalizers:
        spec = backbone if backbone is not None else "timm:resnet50"
        model = cw.wrap(spec, group=group, canonicalizer=name, canon_size=canon_size).eval()
        backbone = model.backbone
        models[name] = model
    return models


def torch_cases(
    models: Dict[str, cw.CanonicalizedModel], group: str, repeats: int, tta_repeats: int, warmup: int, tta: bool
) -> List[Case]:
    """backbone, canon/<c>, wrapped/<c>, tta/<group> (the backbone first: it is the reference)."""
    ref = next(iter(models.values()))
    grp = get_group(group)

    def backbone(x: Tensor) -> Tensor:
        return ref.backbone.logits(ref.normalize(x))  # (B, K)

    def tta_fn(x: Tensor) -> Tensor:
        total = backbone(x)  # identity element, no warp
        for e in range(1, grp.order):
            total = total + backbone(transform(x, grp, e))  # (B, K)
        return total / grp.order

    cases = [Case("backbone", backbone, repeats, warmup)]
    for name, model in models.items():
        cases.append(Case(f"canon/{name}", model.canonicalize, repeats, warmup))
    for name, model in models.items():
        cases.append(Case(f"wrapped/{name}", model, repeats, warmup))
    if tta and tta_repeats > 0:
        # The backbone is already warm at this shape; only build the warp tables (lru-cached).
        cases.append(Case(f"tta/{group}", tta_fn, min(tta_repeats, repeats), 0))
    return cases


def breakdown_cases(models: Dict[str, cw.CanonicalizedModel], x: Tensor, repeats: int, warmup: int) -> List[Case]:
    """Stages of ``CanonicalizedModel.canonicalize`` (same steps, timed separately) on batch ``x``.

    Each stage gets its real input, prepared once outside the timed region; the undo warp uses
    every group element in turn (``b % |G|``), like a real mix of chosen elements.
    """
    ref = next(iter(models.values()))
    small = ref.scorer_input(x)  # (B, C, s, s) normalized
    index = torch.arange(x.shape[0]) % ref.group.order  # (B,)
    cases = [
        Case("backbone", lambda _: ref.backbone.logits(ref.normalize(x)), repeats, warmup),
        Case("stage/check_pixels", lambda _: ref._check(x), repeats, warmup),
        Case("stage/scorer_input(downscale+normalize)", lambda _: ref.scorer_input(x), repeats, warmup),
    ]
    for name, model in models.items():
        cases.append(Case(f"stage/{name}/scorer_network", lambda _, m=model: m.canonicalizer(small), repeats, warmup))
        if hasattr(model.canonicalizer, "orbit_warp"):
            warp = model.canonicalizer.orbit_warp
            cases.append(Case(f"stage/{name}/orbit_warp(at canon_size)", lambda _, wp=warp: wp.orbit(small), repeats, warmup))
    cases.append(Case("stage/undo_warp(full resolution)", lambda _: ref.undo(x, index), repeats, warmup))
    return cases


# ---------------------------------------------------------------------------------------- onnx
class _Frozen(nn.Module):
    """normalize + backbone, the ONNX counterpart of the ``backbone`` case."""

    def __init__(self, model: cw.CanonicalizedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.model.backbone.logits(self.model.normalize(pixel_values))  # (B, K)


def export_backbone(model: cw.CanonicalizedModel, path: Path, opset: int) -> float:
    t0 = time.perf_counter()
    example = torch.rand(2, *model.config.input_size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad():
        torch.onnx.export(
            _Frozen(model).eval(), (example,), str(path), dynamo=True, opset_version=opset,
            input_names=["pixel_values"], output_names=["logits"],
            dynamic_shapes={"pixel_values": {0: batch}}, external_data=False, verbose=False,
        )
    return time.perf_counter() - t0


def onnx_cases(
    models: Dict[str, cw.CanonicalizedModel], workdir: Path, threads: int, repeats: int, warmup: int, opset: int
) -> Tuple[List[Case], Dict[str, Any]]:
    import onnxruntime as ort

    info: Dict[str, Any] = {"onnxruntime": ort.__version__, "exports": {}}
    paths = {"backbone": workdir / "backbone.onnx"}
    ref = next(iter(models.values()))
    info["exports"]["backbone"] = {"seconds": export_backbone(ref, paths["backbone"], opset)}
    for name, model in models.items():
        paths[f"wrapped/{name}"] = workdir / f"wrapped_{name}.onnx"
        res = cw.export_onnx(model, paths[f"wrapped/{name}"], opset=opset)
        info["exports"][f"wrapped/{name}"] = {"seconds": res.seconds, "exporter": res.exporter}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    cases = []
    for name, path in paths.items():
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        info["exports"][name]["providers"] = sess.get_providers()
        info["exports"][name]["size_mb"] = path.stat().st_size / 2**20
        input_name = sess.get_inputs()[0].name
        cases.append(Case(f"ort/{name}", _ort_fn(sess, input_name), repeats, warmup))
    return cases, info


def _ort_fn(sess: Any, input_name: str) -> Callable[[np.ndarray], Any]:
    return lambda x: sess.run(None, {input_name: x})


# ----------------------------------------------------------------------------------------- report
def print_table(title: str, result: Dict[str, Any]) -> None:
    ref = result["reference"]
    print(f"\n{title}  (reference: {ref}; ratio = median/median, paired = median of per-round ratios;"
          f" cpu = same paired ratio on process CPU time)")
    header = (f"{'case':44s} {'n':>3s} {'median ms':>11s} {'p90 ms':>11s} {'ms/img':>9s} {'ratio':>7s} "
              f"{'paired':>7s} {'cpu':>7s}")
    print(header)
    print("-" * len(header))
    batch = result["batch"]
    for name, e in result["cases"].items():
        paired = e["paired_ratio_median"]
        cpu_paired = e["cpu_paired_ratio_median"]
        print(
            f"{name:44s} {e['n']:3d} {e['median_s'] * 1e3:11.1f} {e['p90_s'] * 1e3:11.1f} "
            f"{e['median_s'] * 1e3 / batch:9.2f} {e['ratio_of_medians']:7.3f} "
            f"{paired if paired is not None else float('nan'):7.3f} "
            f"{cpu_paired if cpu_paired is not None else float('nan'):7.3f}"
        )


def verdicts(result: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for name, e in result["cases"].items():
        if name.startswith(("wrapped/", "ort/wrapped/")) and e["paired_ratio_median"] is not None:
            overhead = e["paired_ratio_median"] - 1.0
            out[name] = {"overhead": overhead, "target_met": overhead < TARGET_OVERHEAD}
    return out


# ------------------------------------------------------------------------------------------- main
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[256], help="batch size(s) (default 256)")
    p.add_argument("--threads", type=int, default=2, help="torch / onnxruntime intra-op threads (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per case (default 5)")
    p.add_argument("--tta-repeats", type=int, default=2, help="timed rounds for TTA (default 2; it costs |G| backbone passes; 0 skips it)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up calls per case (default 1)")
    p.add_argument("--group", default="c8", help="symmetry group (default c8)")
    p.add_argument("--canonicalizers", nargs="+", default=["orbit", "equivariant"], help="default: orbit equivariant")
    p.add_argument("--canon-size", type=int, default=64, help="side the canonicalizer scores at (default 64)")
    p.add_argument("--no-tta", action="store_true", help="skip test-time averaging")
    p.add_argument("--breakdown", action="store_true", help="also time the stages of canonicalize separately")
    p.add_argument("--onnx", action="store_true", help="also time onnxruntime CPU (secondary column)")
    p.add_argument("--onnx-repeats", type=int, default=None, help="rounds for onnxruntime (default --repeats)")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="cpu_latency.json", help="JSON output path")
    args = p.parse_args(argv)
    if min(args.batch) < 1 or args.threads < 1 or args.repeats < 1:
        p.error("--batch, --threads and --repeats must be >= 1")
    return args


def _interruptible() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt, so ``kill -INT/-TERM <pid>`` of a background run
    (where the shell sets SIGINT to ignored) still ends the rounds and writes the JSON."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    _interruptible()
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.manual_seed(args.seed)
    report: Dict[str, Any] = {
        "benchmark": "cpu_latency",
        "args": vars(args),
        "versions": versions(),
        "cpu_model": cpu_model(),
        "os_cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "platform": platform.platform(),
        "loadavg_start": loadavg(),
        "results": [],
        "onnx_results": [],
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {report['cpu_model']}, "
          f"load {report['loadavg_start']}", flush=True)
    t_start = time.perf_counter()
    models = build_models(args.canonicalizers, args.group, args.canon_size)
    c, h, w = next(iter(models.values())).config.input_size
    warp_tables(args.group, h, w)  # build (and cache) the full-resolution tables TTA uses

    with torch.inference_mode():
        for batch in args.batch:
            x = torch.rand(batch, c, h, w)  # (B, 3, 224, 224) in [0, 1]
            cases = torch_cases(models, args.group, args.repeats, args.tta_repeats, args.warmup, not args.no_tta)
            res = run_rounds(cases, x, args.repeats, f"torch B={batch}")
            res.update({"batch": batch, "engine": "torch"})
            res["verdicts"] = verdicts(res)
            report["results"].append(res)
            print_table(f"PyTorch eager, batch {batch}, {args.threads} threads", res)
            if args.breakdown:
                bres = run_rounds(breakdown_cases(models, x, args.repeats, args.warmup), x, args.repeats, f"stages B={batch}")
                bres.update({"batch": batch, "engine": "torch-stages"})
                report["results"].append(bres)
                print_table(f"canonicalize() stages, batch {batch}", bres)
            del x

    if args.onnx:
        with tempfile.TemporaryDirectory() as tmp:
            cases, info = onnx_cases(
                models, Path(tmp), args.threads, args.onnx_repeats or args.repeats, args.warmup, args.opset
            )
            report["onnx"] = info
            for batch in args.batch:
                x = np.random.default_rng(args.seed).random((batch, c, h, w), dtype=np.float32)
                res = run_rounds(cases, x, args.onnx_repeats or args.repeats, f"ort B={batch}")
                res.update({"batch": batch, "engine": "onnxruntime-cpu"})
                res["verdicts"] = verdicts(res)
                report["onnx_results"].append(res)
                print_table(f"onnxruntime CPU, batch {batch}, {args.threads} threads", res)

    report["loadavg_end"] = loadavg()
    report["total_seconds"] = time.perf_counter() - t_start
    for res in report["results"] + report["onnx_results"]:
        for name, v in res.get("verdicts", {}).items():
            print(f"B={res['batch']} {name}: overhead {v['overhead'] * 100:+.1f}% "
                  f"(target < {TARGET_OVERHEAD * 100:.0f}%: {'met' if v['target_met'] else 'NOT met'})")
    print(f"load average start {report['loadavg_start']} end {report['loadavg_end']}; "
          f"total {report['total_seconds']:.0f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
