"""Issue 6 benchmark: heads on the demo's frozen digit classifier trained with CE, PGD-AT, TRADES and
D2R (``canonwrap.finetune.fit_head``), attacked in PIXEL space through the whole wrapped model.

Protocol (defaults; every number is a flag):

* model and data: as ``benchmarks/sam_head.py`` -- the demo's real digits, the demo's frozen
  DigitNet behind the demo's C8 orbit canonicalizer (trained once, cached, shared), a new
  ``nn.Linear(128, 10)`` head;
* training, per seed: (1) a CE head, cached features, AdamW, 5 epochs on the 4,000 training digits
  (that IS the "CE" row); (2) starting from that CE head, ``--robust-epochs`` epochs of PGD-AT,
  TRADES (beta 6) or D2R (one pass as released, alpha 20, beta 30, guide = the pretrained DigitNet
  classifier) on ``--n-train`` training digits in the INPUT-space threat model (Linf,
  eps ``--train-eps`` = 0.2, ``--train-steps`` = 3 steps of eps/2, attacks through the frozen
  backbone and the canonicalizer's warp), AdamW lr 3e-3, batch 64. Robust training from a clean
  head (robust fine-tuning) keeps the CPU budget small; it is the same for the three losses;
* evaluation: clean upright and C8-avg accuracy on the 1,000 test digits (shared frozen features of
  the 8 rotated test sets, as in ``sam_head.py``); FGSM and PGD-20 (Linf, random start, step eps/8)
  at eps 0.1 and 0.2 in [0, 1] pixel space through the whole wrapped model (canonicalizer +
  backbone + head; ``canonwrap.attacks``) on ``--n-attack`` stratified test digits; 3 seeds;
* cross-checks on seed 0 (``--check-seeds``): PGD-20 from torchattacks (independent code, same
  eps/step/steps and the SAME random starts, so any gap is an implementation difference, not
  random-start luck) when ``--torchattacks DIR`` is given (``pip install --target DIR torchattacks
  --no-deps``; DIR is put on ``sys.path`` only here); a gap > 2 points suggests gradient masking
  or a bug. And a straight-through PGD-20: gradients taken through the canonicalizer's
  straight-through relaxation (``model.canonicalize(x, differentiable=True)``: same forward, but
  the scorer gets a gradient) -- the argmax choice has zero gradient in the plain model, so if this
  BPDA-style attack is much stronger, the plain attack is masked by the argmax; and the per-sample
  worst case over the PGD variants that ran ("worst of all");
* seconds per training epoch of each loss (CE: cached features; robust: pixel path, n-train digits).
* optional ``--feature-threat``: TRADES trained in the FEATURE-space threat model (eps in feature
  units) and evaluated with the same pixel-space attacks -- a different threat model.

Usage::

    python benchmarks/robust_heads.py --torchattacks /tmp/ta           # default budget
    python benchmarks/robust_heads.py --n-train 4000 --robust-epochs 3 --train-steps 7 --n-attack 1000

Writes JSON (``--out``) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, List

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from canonwrap.attacks import FGSM, PGD  # noqa: E402
from canonwrap.finetune import PixelHead, extract_features, fit_head  # noqa: E402
from sam_head import fmt, load_average, mean_std, prepare_model, rotated_test_sets  # noqa: E402

LOSSES = ("ce", "pgd_at", "trades", "d2r")


@torch.no_grad()
def accuracy(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, batch: int = 250) -> float:
    return sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch)) / len(y)


def attacked_correct(model: nn.Module, attack: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor,
                     batch: int = 100) -> Tensor:
    """(N,) bool: ``model`` is right on ``attack(x, y)`` (batched)."""
    correct = []
    for i in range(0, len(y), batch):
        x_adv = attack(x[i:i + batch], y[i:i + batch])
        with torch.no_grad():
            correct.append(model(x_adv).argmax(1) == y[i:i + batch])
    return torch.cat(correct)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    ap.add_argument("--ce-epochs", type=int, default=5)
    ap.add_argument("--robust-epochs", type=int, default=1)
    ap.add_argument("--n-train", type=int, default=500, help="training digits of the robust stage")
    ap.add_argument("--train-eps", type=float, default=0.2)
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.2])
    ap.add_argument("--pgd-steps", type=int, default=20)
    ap.add_argument("--n-attack", type=int, default=100, help="stratified test digits attacked")
    ap.add_argument("--check-seeds", type=int, nargs="*", default=[0], help="seeds of the cross-checks")
    ap.add_argument("--torchattacks", default=None, help="directory holding torchattacks (pip --target)")
    ap.add_argument("--no-st-check", action="store_true", help="skip the straight-through PGD check")
    ap.add_argument("--feature-threat", action="store_true", help="also TRADES in the feature-space threat model")
    ap.add_argument("--feature-eps", type=float, default=0.5, help="feature-space eps (feature units)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="robust_heads_results.json")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()
    load_before = load_average()

    ta = None
    if args.torchattacks:
        sys.path.insert(0, args.torchattacks)
        import torchattacks as ta  # noqa: F811

        print(f"torchattacks {ta.__version__} from {args.torchattacks}", flush=True)

    model, digits, info = prepare_model(args.progress)
    train = (digits.train_x, digits.train_y)
    robust_train = (digits.train_x[:args.n_train], digits.train_y[:args.n_train])
    per_class = max(args.n_attack // 10, 1)
    sel = torch.cat([torch.nonzero(digits.test_y == c).flatten()[:per_class] for c in range(10)])
    xa, ya = digits.test_x[sel], digits.test_y[sel]  # stratified attacked subset
    t0 = time.perf_counter()
    train_feats, train_y, _ = extract_features(model, train)
    test_feats = [extract_features(model, (xr, digits.test_y))[0] for xr in rotated_test_sets(digits.test_x)]
    print(f"shared frozen features: {time.perf_counter() - t0:.0f} s", flush=True)
    canon_state = {k: v.clone() for k, v in model.canonicalizer.state_dict().items()}
    backbone_state = {k: v.clone() for k, v in model.backbone.state_dict().items()}

    def clean_metrics() -> Dict[str, float]:
        with torch.no_grad():
            accs = [float((model.head(f).argmax(1) == digits.test_y).float().mean()) for f in test_feats]
        return {"upright": accs[0], "c8_avg": sum(accs) / 8}

    def attack_metrics(seed: int, check: bool) -> Dict[str, float]:
        model.eval()
        out: Dict[str, float] = {"clean_attacked_subset": accuracy(model, xa, ya)}
        for eps in args.eps:
            out[f"fgsm_{eps}"] = float(attacked_correct(model, FGSM(model, eps=eps), xa, ya).float().mean())
            torch.manual_seed(1000 + seed)  # the same random starts for every PGD variant below
            pgd = PGD(model, eps=eps, alpha=eps / 8, steps=args.pgd_steps, random_start=True)
            survived = attacked_correct(model, pgd, xa, ya)  # (N,) bool
            out[f"pgd_{eps}"] = float(survived.float().mean())
            if check and ta is not None:
                torch.manual_seed(1000 + seed)
                tpgd = ta.PGD(model, eps=eps, alpha=eps / 8, steps=args.pgd_steps, random_start=True)
                ok = attacked_correct(model, tpgd, xa, ya)
                out[f"ta_pgd_{eps}"] = float(ok.float().mean())
                survived &= ok
            if check and not args.no_st_check:
                torch.manual_seed(1000 + seed)
                surrogate = PixelHead(model, model.head, differentiable=True)  # same forward, ST gradient
                spgd = PGD(surrogate, eps=eps, alpha=eps / 8, steps=args.pgd_steps, random_start=True)
                ok = attacked_correct(model, spgd, xa, ya)
                out[f"st_pgd_{eps}"] = float(ok.float().mean())
                survived &= ok
            if check:  # per sample: robust only if it survives every PGD variant that ran
                out[f"worst_pgd_{eps}"] = float(survived.float().mean())
        return out

    runs: List[Dict[str, Any]] = []
    extra: List[Dict[str, Any]] = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        model.head.reset_parameters()
        t0 = time.perf_counter()
        ce_hist = fit_head(model, train, epochs=args.ce_epochs, optimizer="adamw", seed=seed,
                           features=(train_feats, train_y), progress=args.progress)
        ce_state = {k: v.clone() for k, v in model.head.state_dict().items()}
        ce_epoch_s = statistics.median(e["seconds"] for e in ce_hist.epochs)
        for loss in args.losses:
            model.head.load_state_dict(ce_state)
            hist = None
            t0 = time.perf_counter()
            if loss != "ce":
                hist = fit_head(model, robust_train, epochs=args.robust_epochs, batch_size=args.batch_size,
                                optimizer="adamw", loss=loss, eps=args.train_eps, alpha=args.train_eps / 2,
                                steps=args.train_steps, threat="input", seed=seed, progress=args.progress)
            train_s = time.perf_counter() - t0
            check = seed in args.check_seeds
            t0 = time.perf_counter()
            run = {"loss": loss, "seed": seed, **clean_metrics(), **attack_metrics(seed, check),
                   "epoch_s": statistics.median(e["seconds"] for e in hist.epochs) if hist else ce_epoch_s,
                   "epoch_images": len(robust_train[1]) if hist else len(train_y),
                   "threat": hist.config["threat"] if hist else None,
                   "history": hist.to_dict() if hist else ce_hist.to_dict(), "eval_s": time.perf_counter() - t0}
            runs.append(run)
            shown = {k: round(100 * v, 1) for k, v in run.items() if isinstance(v, float) and not k.endswith("_s")}
            print(f"{loss:7s} seed {seed}: {shown}  epoch {run['epoch_s']:.2f} s / {run['epoch_images']} images"
                  f"  (eval {run['eval_s']:.0f} s)", flush=True)
        if args.feature_threat:
            model.head.load_state_dict(ce_state)
            hist = fit_head(model, train, epochs=args.robust_epochs, batch_size=args.batch_size, optimizer="adamw",
                            loss="trades", threat="feature", eps=args.feature_eps, steps=args.train_steps, seed=seed,
                            progress=args.progress)
            run = {"loss": "trades(feature)", "seed": seed, **clean_metrics(), **attack_metrics(seed, False),
                   "epoch_s": statistics.median(e["seconds"] for e in hist.epochs), "epoch_images": len(train_y),
                   "threat": hist.config["threat"], "threat_model": hist.config["threat_model"], "history": hist.to_dict()}
            extra.append(run)
            print(f"trades(feature eps {args.feature_eps}) seed {seed}: "
                  f"{ {k: round(100 * v, 1) for k, v in run.items() if isinstance(v, float) and k != 'epoch_s'} }", flush=True)
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in backbone_state.items()), "backbone changed"
    assert all(torch.equal(v, model.canonicalizer.state_dict()[k]) for k, v in canon_state.items()), "canonicalizer changed"

    # ---------------------------------------------------------------- summary
    metrics = ["upright", "c8_avg"] + [f"{a}_{e}" for e in args.eps for a in ("fgsm", "pgd")]
    summary: Dict[str, Any] = {}
    for loss in [*args.losses, *(["trades(feature)"] if extra else [])]:
        rs = [r for r in runs + extra if r["loss"] == loss]
        summary[loss] = {m: mean_std([r[m] for r in rs]) for m in metrics + ["epoch_s"]}
    checks = []
    for r in runs:
        for eps in args.eps:
            row = {"loss": r["loss"], "seed": r["seed"], "eps": eps, "ours": r[f"pgd_{eps}"]}
            if f"ta_pgd_{eps}" in r:
                row["torchattacks"] = r[f"ta_pgd_{eps}"]
                row["gap_points"] = 100 * (r[f"pgd_{eps}"] - r[f"ta_pgd_{eps}"])
            if f"st_pgd_{eps}" in r:
                row["straight_through"] = r[f"st_pgd_{eps}"]
                row["st_gap_points"] = 100 * (r[f"pgd_{eps}"] - r[f"st_pgd_{eps}"])
            if f"worst_pgd_{eps}" in r:
                row["worst_of_all"] = r[f"worst_pgd_{eps}"]
            if len(row) > 4:  # a cross-check ran
                checks.append(row)
    d2r_vs_trades = None
    if "d2r" in summary and "trades" in summary:
        d2r_vs_trades = {m: summary["d2r"][m]["mean"] - summary["trades"][m]["mean"] for m in metrics}

    load_after = load_average()
    print(f"\nclean: 1000 test digits; attacks: {len(ya)} stratified test digits, Linf in [0,1] pixels through "
          f"canonicalizer + frozen backbone + head; {len(args.seeds)} seeds, mean ± std (%)")
    head = f"{'loss':<17}{'upright':>14}{'C8-avg':>14}" + "".join(f"{a.upper() + ' ' + str(e):>15}" for e in args.eps
                                                                for a in ("fgsm", "pgd")) + f"{'s/epoch':>10}{'images':>8}"
    print(head)
    for loss, s in summary.items():
        n_img = next(r["epoch_images"] for r in runs + extra if r["loss"] == loss)
        print(f"{loss:<17}{fmt(s['upright'], 100, 1):>14}{fmt(s['c8_avg'], 100, 1):>14}"
              + "".join(f"{fmt(s[m], 100, 1):>15}" for m in metrics[2:])
              + f"{s['epoch_s']['mean']:>10.2f}{n_img:>8}")
    if checks:
        print("\nPGD cross-checks (accuracy %, ours - other in points; > 2 points = suspicious):")
        for c in checks:
            parts = [f"ours {100 * c['ours']:.1f}"]
            if "torchattacks" in c:
                parts.append(f"torchattacks {100 * c['torchattacks']:.1f} (gap {c['gap_points']:+.1f})")
            if "straight_through" in c:
                parts.append(f"straight-through {100 * c['straight_through']:.1f} (gap {c['st_gap_points']:+.1f})")
            if "worst_of_all" in c:
                parts.append(f"worst of all {100 * c['worst_of_all']:.1f}")
            print(f"  {c['loss']:7s} seed {c['seed']} eps {c['eps']}: " + ", ".join(parts))
    if d2r_vs_trades is not None:
        better = [m for m in metrics[2:] if d2r_vs_trades[m] > 0]
        print(f"\nD2R - TRADES (points): " + ", ".join(f"{m} {100 * v:+.1f}" for m, v in d2r_vs_trades.items()))
        print(f"D2R beats TRADES on robust accuracy here? {'yes' if len(better) == len(metrics) - 2 else 'NO' if not better else 'mixed'}"
              f" ({len(better)}/{len(metrics) - 2} attack columns)")
    wall = time.time() - t_start
    print(f"wall {wall:.0f} s; {args.threads} thread(s); load average before {load_before['1min']:.2f} / after "
          f"{load_after['1min']:.2f} on {os.cpu_count()} cores")
    out = {"args": vars(args), "info": info, "summary": summary, "checks": checks, "d2r_minus_trades": d2r_vs_trades,
           "runs": runs, "feature_threat_runs": extra, "wall_s": wall,
           "load_average": {"before": load_before, "after": load_after},
           "env": {"torch": torch.__version__, "python": platform.python_version(), "nproc": os.cpu_count(),
                   "torchattacks": getattr(ta, "__version__", None)}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1, default=float)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
