"""Uncertainty of a canonicalized model on the demo's real digits, under rotation and corruption.

Question: when the wrapped model is deployed on inputs in any orientation that are also degraded,
does it know when it is wrong? Which signal flags its errors best, and what does each cost?

Protocol:
* data: ``canonwrap.data.load_digits()`` (4,000 train / 1,000 test MNIST digits, 32x32). The
  1,000 test digits are split in two halves (stratified, alternate indices): 500 VALIDATION digits
  (temperature, reject threshold) and 500 TEST digits. Neither half was seen by the frozen
  classifier, the canonicalizer or the heads.
* shift: every validation / test digit is rotated by a uniform random angle in [0, 360) and then,
  with probability 5/6, corrupted by one of the 5 corruptions of ``canonwrap.corruptions``
  (uniform) at a uniform severity 1..5 (else left clean). ``--draws`` independent draws per digit
  (seeded; different seeds for validation and test). Also reported: "rotated" (rotation only).
* model: ``canonwrap.demo.pretrained_digit_classifier()`` frozen, wrapped with
  ``DEMO_WRAP_KWARGS`` (C8 orbit canonicalizer) and trained with ``cw.fit(model, train,
  **DEMO_FIT_KWARGS)`` (imported from canonwrap.demo, never copied).
* predictors, each with its own deterministic prediction and a temperature fitted on the shifted
  validation split (``calibrate_temperature``):
    - ``pretrained``: the frozen classifier's own head; scores entropy, 1 - max prob, canon margin;
    - ``ensemble``: M=5 linear heads on the frozen features of the canonicalized training digits
      (``fit_ensemble``, seeds 0..4); scores as above + ensemble disagreement (mutual information);
    - ``mc_dropout``: one linear head trained with dropout p=0.3 in front (``fit_ensemble(m=1,
      dropout=0.3)``), S=20 MC samples of the head (features computed once); scores as above +
      MC-dropout mutual information.
* metrics: ECE (15 equal-width bins), NLL, Brier at T=1, after T fitted on CLEAN upright
  validation digits, after T fitted on the SHIFTED validation split; AUROC of each score for
  detecting the predictor's errors, AURC, accuracy at 90% coverage, and the coverage/accuracy a
  threshold fixed on the validation split (90% coverage there) actually gives on the test split.
* latency: batch 256, CPU, ``torch.set_num_threads(1)``, median (and min) of ``--reps`` runs after a
  warm-up, all in the same process: forward only; + entropy; + canon margin; ensemble + its
  disagreement; MC dropout with cached features (S head passes) and naively (S full passes);
  optionally (``--onnx``) the exported graph with and without the uncertainty outputs in
  onnxruntime (CPU, 1 thread).

Usage::

    PYTHONPATH=. python benchmarks/uncertainty.py --out runs/uncertainty.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Tuple

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import canonwrap as cw  # noqa: E402
from canonwrap.corruptions import apply_corruption, list_corruptions  # noqa: E402
from canonwrap.data import DIGIT_CLASSES, load_digits  # noqa: E402
from canonwrap.demo import DEMO_FIT_KWARGS, DEMO_WRAP_KWARGS, pretrained_digit_classifier  # noqa: E402
from canonwrap.ensemble import fit_ensemble, frozen_features, head_forward  # noqa: E402
from canonwrap.groups import rotate  # noqa: E402
from canonwrap.metrics import (  # noqa: E402
    canon_margin,
    ensemble_disagreement,
    mc_dropout_predict,
    predictive_entropy,
)
from canonwrap.worstcase import (  # noqa: E402
    calibrate_temperature,
    calibration_section,
    predict_uncertainty,
    uncertainty_section,
)


def shift(x: torch.Tensor, seed: int, corrupt: bool = True) -> torch.Tensor:
    """Random rotation per image, then (if ``corrupt``) a random corruption/severity or none."""
    gen = torch.Generator().manual_seed(seed)
    angles = torch.rand(x.shape[0], generator=gen) * 360.0  # (N,)
    out = rotate(x, angles).clamp(0, 1)  # (N, C, H, W)
    if not corrupt:
        return out
    names = list_corruptions()
    which = torch.randint(len(names) + 1, (x.shape[0],), generator=gen)  # len(names) = clean
    severity = torch.randint(1, 6, (x.shape[0],), generator=gen)
    for c, name in enumerate(names):
        for s in range(1, 6):
            idx = torch.nonzero((which == c) & (severity == s)).flatten()
            if len(idx):
                out[idx] = apply_corruption(name, out[idx], s, seed=seed * 100 + c * 10 + s)
    return out


def repeat_draws(x: torch.Tensor, y: torch.Tensor, draws: int, seed: int, corrupt: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    xs = [shift(x, seed * 1000 + d, corrupt) for d in range(draws)]
    return torch.cat(xs), y.repeat(draws)


def time_ms(fn: Callable[[], Any], reps: int, warmup: bool = True) -> Dict[str, float]:
    """Median and min wall time in ms (on a busy machine the min is the better estimate of the cost)."""
    if warmup:
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return {"median": statistics.median(times), "min": min(times), "reps": reps}


def evaluate_predictor(model: Any, val: Tuple, val_clean: Tuple, tests: Dict[str, Tuple], mc_samples: int) -> Dict[str, Any]:
    """Temperatures (clean / shifted validation), calibration and error detection per test condition."""
    cfg = {"mc_samples": mc_samples, "rotate": False}
    t_clean = calibrate_temperature(model, val_clean, rotate=False)
    t_shift = calibrate_temperature(model, val, rotate=False)  # stored in the model
    # the reject threshold is fixed on the validation split: 90% coverage there
    val_out = predict_uncertainty(model, val[0], cfg)
    from canonwrap.metrics import threshold_for_coverage

    thresholds = {n: threshold_for_coverage(s, 0.9) for n, s in val_out.scores.items()}
    res: Dict[str, Any] = {"temperature_clean_val": t_clean, "temperature_shifted_val": t_shift, "conditions": {}}
    for cond, (x, y) in tests.items():
        out = predict_uncertainty(model, x, cfg)
        cal = {}
        for label, t in (("T=1", 1.0), ("T clean val", t_clean), ("T shifted val", t_shift)):
            out.temperature = t
            sec = calibration_section(out, y, 15)
            cal[label] = list(sec["metrics"].values())[-1]
        out.temperature = t_shift
        unc = uncertainty_section(out, y, 0.9)
        correct = out.pred == y
        fixed = {}
        for n, s in out.scores.items():
            accept = s <= thresholds[n]
            fixed[n] = {"coverage": float(accept.float().mean()), "accuracy": float(correct[accept].float().mean())}
        res["conditions"][cond] = {"accuracy": float(correct.float().mean()), "calibration": cal,
                                   "scores": unc["metrics"], "val_threshold_on_test": fixed}
    return res


def main() -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--draws", type=int, default=3, help="shifted copies of each test digit (validation: half)")
    p.add_argument("--m", type=int, default=5, help="ensemble heads")
    p.add_argument("--mc-samples", type=int, default=20)
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--reps", type=int, default=10, help="latency repetitions (the naive MC-dropout row: 2)")
    p.add_argument("--onnx", action="store_true", help="also time the exported graphs in onnxruntime")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 fit epoch, 1 draw, 3 reps (figures not meaningful)")
    p.add_argument("--out", default="runs/uncertainty.json")
    args = p.parse_args()
    recipe = dict(DEMO_FIT_KWARGS)
    if args.quick:
        recipe["epochs"], args.draws, args.reps = 1, 2, 3
    torch.set_num_threads(1)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    seconds: Dict[str, float] = {}

    data = load_digits()
    frozen = pretrained_digit_classifier(progress=False)
    model = cw.wrap(frozen, class_names=DIGIT_CLASSES, **DEMO_WRAP_KWARGS)
    t0 = time.perf_counter()
    cw.fit(model, (data.train_x, data.train_y), progress=False, **recipe)
    seconds["fit_canonicalizer"] = time.perf_counter() - t0
    model.eval()

    val_x, val_y = data.test_x[0::2], data.test_y[0::2]  # 500, 50 per class
    test_x, test_y = data.test_x[1::2], data.test_y[1::2]
    val = repeat_draws(val_x, val_y, max(1, args.draws // 2), seed=1, corrupt=True)
    tests = {"rotated+corrupted": repeat_draws(test_x, test_y, args.draws, seed=2, corrupt=True),
             "rotated": repeat_draws(test_x, test_y, args.draws, seed=3, corrupt=False)}

    t0 = time.perf_counter()
    feats = frozen_features(model, (data.train_x, data.train_y))
    seconds["cache_features"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ens_head = fit_ensemble(model, None, m=args.m, features=feats, seed=0)
    seconds["fit_ensemble"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    drop_head = fit_ensemble(model, None, m=1, dropout=args.dropout, features=feats, seed=100)
    seconds["fit_dropout_head"] = time.perf_counter() - t0

    variants = {"pretrained": model}
    variants["ensemble"] = copy.deepcopy(model)
    variants["ensemble"].head = ens_head
    variants["mc_dropout"] = copy.deepcopy(model)
    variants["mc_dropout"].head = drop_head

    results: Dict[str, Any] = {}
    t0 = time.perf_counter()
    for name, m in variants.items():
        results[name] = evaluate_predictor(m, val, (val_x, val_y), tests, args.mc_samples)
    seconds["evaluate"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ latency (batch 256)
    xb = tests["rotated+corrupted"][0][:256]
    base, ens, drop = variants["pretrained"], variants["ensemble"], variants["mc_dropout"]
    lat: Dict[str, Dict[str, float]] = {}
    with torch.no_grad():
        lat["forward (logits)"] = time_ms(lambda: base(xb), args.reps)

        def with_entropy():
            p = (base(xb) / base.temperature).softmax(-1)
            return predictive_entropy(p)

        lat["+ entropy (T-scaled)"] = time_ms(with_entropy, args.reps)

        def with_margin():
            _, _, scores = base.forward_with_element(xb)
            return canon_margin(scores)

        lat["+ canon margin"] = time_ms(with_margin, args.reps)

        def ensemble_fn():
            out = ens.canonicalize(xb)
            _, _, members = head_forward(ens, ens.normalize(out.images))
            return ensemble_disagreement(members.softmax(-1))

        lat[f"ensemble M={args.m} + disagreement"] = time_ms(ensemble_fn, args.reps)

        def mc_cached():
            out = drop.canonicalize(xb)
            feats_b = drop.backbone.features(drop.normalize(out.images))
            return ensemble_disagreement(mc_dropout_predict(drop.head, feats_b, args.mc_samples, module=drop.head, seed=0))

        lat[f"MC dropout S={args.mc_samples} (features cached)"] = time_ms(mc_cached, args.reps)
        lat[f"MC dropout S={args.mc_samples} (naive: S full passes)"] = time_ms(
            lambda: mc_dropout_predict(drop, xb, args.mc_samples, module=drop.head, seed=0), 2, warmup=False)
    latency = {"batch": 256, "threads": torch.get_num_threads(), "ms": lat}

    if args.onnx:
        import numpy as np
        import onnxruntime as ort

        from converters.uncertainty import reject_threshold

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        feed = {"pixel_values": xb.numpy().astype(np.float32)}
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            thr = reject_threshold(ens, val, coverage=0.9, rotate=False)
            cw.export_onnx(ens, os.path.join(tmp, "plain.onnx"))
            cw.export_onnx(ens, os.path.join(tmp, "unc.onnx"), uncertainty=True, reject_threshold=thr)
            seconds["export_onnx"] = time.perf_counter() - t0
            for label, f in (("onnxruntime plain graph", "plain.onnx"), ("onnxruntime + uncertainty outputs", "unc.onnx")):
                sess = ort.InferenceSession(os.path.join(tmp, f), opts, providers=["CPUExecutionProvider"])
                lat[f"{label} (ensemble head)"] = time_ms(lambda: sess.run(None, feed), args.reps)
            latency["onnx_reject_threshold_entropy"] = thr

    seconds["total"] = time.perf_counter() - t_start
    out = {
        "protocol": {"val": f"{len(val[1])} shifted (500 digits x {max(1, args.draws // 2)} draws)",
                     "test": {k: len(v[1]) for k, v in tests.items()}, **{k: v for k, v in vars(args).items() if k != "out"},
                     "fit": recipe, "wrap": DEMO_WRAP_KWARGS},
        "results": results,
        "latency": latency,
        "seconds": seconds,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "load_before": load_before,
                    "load_after": os.getloadavg()},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print_tables(out)
    print(f"\nwrote {args.out} ({seconds['total']:.0f} s)")
    return out


def print_tables(out: Dict[str, Any]) -> None:
    for cond in ("rotated+corrupted", "rotated"):
        print(f"\n== test: {cond} ==")
        print(f"{'predictor':<12}{'acc':>7}{'T(shift)':>9}{'ECE T=1':>9}{'ECE Tcln':>9}{'ECE Tsh':>9}{'NLL T=1':>9}{'NLL Tsh':>9}")
        for name, r in out["results"].items():
            c = r["conditions"][cond]
            cal = c["calibration"]
            print(f"{name:<12}{100 * c['accuracy']:>6.1f}%{r['temperature_shifted_val']:>9.2f}"
                  f"{cal['T=1']['ece']:>9.4f}{cal['T clean val']['ece']:>9.4f}{cal['T shifted val']['ece']:>9.4f}"
                  f"{cal['T=1']['nll']:>9.4f}{cal['T shifted val']['nll']:>9.4f}")
        print(f"{'predictor':<12}{'score':<14}{'AUROC':>7}{'AURC':>8}{'acc@90%':>9}{'val-thr cov':>12}{'val-thr acc':>12}")
        for name, r in out["results"].items():
            c = r["conditions"][cond]
            for score, m in c["scores"].items():
                fx = c["val_threshold_on_test"][score]
                print(f"{name:<12}{score:<14}{m['auroc']:>7.3f}{m['aurc']:>8.4f}{100 * m['acc@90%']:>8.1f}%"
                      f"{100 * fx['coverage']:>11.1f}%{100 * fx['accuracy']:>11.1f}%")
    print(f"\n== latency, batch {out['latency']['batch']}, CPU, {out['latency']['threads']} thread ==")
    print(f"{'':<52}{'median':>12}{'min':>12}{'min / forward min':>19}")
    base = None
    for k, v in out["latency"]["ms"].items():
        base = base or v["min"]
        print(f"{k:<52}{v['median']:>9.1f} ms{v['min']:>9.1f} ms{v['min'] / base:>18.2f}x")


if __name__ == "__main__":
    main()
