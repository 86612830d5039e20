"""``canonwrap`` command line: demo, train, eval, export, verify."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, List, Optional, Tuple

DATASETS = ("digits",)


def _load_data(name: str, split: str, limit: Optional[int] = None) -> Tuple[Any, Any]:
    """(images, labels) tensors of a built-in dataset or an ImageFolder directory."""
    if name == "digits":
        from .data import load_digits

        d = load_digits()
        x, y = (d.train_x, d.train_y) if split == "train" else (d.test_x, d.test_y)
        return x[:limit], y[:limit]
    root = Path(name)
    if not root.is_dir():
        from ._registry import unknown_name_message

        raise SystemExit(
            f"--data must be a built-in dataset or an ImageFolder directory; "
            + unknown_name_message("dataset", name, list(DATASETS))
        )
    raise SystemExit(f"ImageFolder loading is not supported by the CLI yet ({root}); use the Python API")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    extra = {"epochs": a.epochs} if a.epochs is not None else {}
    run_demo(a.out, group=a.group, canonicalizer=a.canonicalizer, export=not a.no_export,
             progress=not a.quiet, n_train=a.n_train, n_test=a.n_test, **extra)
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    import canonwrap as cw

    if a.backbone == "demo-digits":
        from .data import DIGIT_CLASSES
        from .demo import pretrained_digit_classifier

        model = cw.wrap(pretrained_digit_classifier(progress=not a.quiet), group=a.group,
                        canonicalizer=a.canonicalizer, class_names=DIGIT_CLASSES)
    else:
        model = cw.wrap(a.backbone, group=a.group, canonicalizer=a.canonicalizer, num_classes=a.num_classes)
    train = _load_data(a.data, "train", a.limit)
    history = cw.fit(model, train, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, device=a.device,
                     progress=not a.quiet, augment=a.augment, prior_weight=a.prior_weight)
    out = model.save(a.out)
    (out / "history.json").write_text(json.dumps(history.to_dict(), indent=2))
    print(f"saved {out}")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    import canonwrap as cw

    model = _load_ckpt(a.checkpoint, a.device)
    test = _load_data(a.data, "test", a.limit)
    angles = None if a.no_sweep else range(0, 360, a.angle_step)
    def opt(values: Optional[List[str]]) -> Any:  # absent -> None, bare flag -> True, names -> list
        return None if values is None else (values or True)

    calibration = _load_data(a.data, "train", a.calibration_size) if a.uncertainty is not None else None
    report = cw.evaluate(model, test, angles=angles, baseline=not a.no_baseline, progress=not a.quiet,
                         attacks=opt(a.attacks), corruptions=opt(a.corruptions), uncertainty=opt(a.uncertainty),
                         calibration_data=calibration, report_dir=a.report_dir)
    print(report.table())
    if a.json:
        Path(a.json).write_text(json.dumps(report.to_dict(), indent=2, default=float))
        print(f"wrote {a.json}")
    if a.report_dir:
        print(f"report: {Path(a.report_dir) / 'report.html'}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    import canonwrap as cw

    model = _load_ckpt(a.checkpoint, "cpu")
    res = cw.export_onnx(model, a.out, opset=a.opset, exporter=a.exporter)
    print(f"exported {res.path} ({res.size_mb:.1f} MB, {res.exporter}, opset {res.opset}, {res.seconds:.1f}s)")
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    import canonwrap as cw

    model = _load_ckpt(a.checkpoint, "cpu")
    x = _load_data(a.data, "test", a.limit)[0] if a.data else None
    rep = cw.verify_onnx(a.onnx, model, x)
    print(rep.summary())
    return 0 if rep.passed else 1


def _load_ckpt(path: str, device: str) -> Any:
    import canonwrap as cw

    return cw.load(path).to(device)


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = argparse.ArgumentParser(prog="canonwrap", description="Rotation-invariant wrappers for frozen vision models.")
    parser.add_argument("--version", action="version", version=f"canonwrap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="end-to-end demo on built-in real digits (CPU, a few minutes)")
    p.add_argument("--out", default="canonwrap-demo", help="output directory")
    p.add_argument("--group", default="c8")
    p.add_argument("--canonicalizer", default="orbit")
    p.add_argument("--epochs", type=int, default=None, help="canonicalizer epochs (default: the demo recipe)")
    p.add_argument("--n-train", type=int, default=None, help="use only the first N training digits")
    p.add_argument("--n-test", type=int, default=None, help="use only the first N test digits")
    p.add_argument("--no-export", action="store_true")
    _add_common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="wrap a backbone and train its canonicalizer")
    p.add_argument("--backbone", default="demo-digits", help="demo-digits, timm:<name>, hf:<dir>, canonwrap:<name>")
    p.add_argument("--data", default="digits", help="built-in dataset name")
    p.add_argument("--group", default="c8")
    p.add_argument("--canonicalizer", default="orbit")
    p.add_argument("--num-classes", type=int, default=None, help="add a new head with N classes")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--augment", default="group", choices=["group", "continuous", "none"])
    p.add_argument("--prior-weight", type=float, default=1.0)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", required=True, help="checkpoint directory")
    _add_common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="upright / per-element / group-averaged / angle-sweep accuracy")
    p.add_argument("checkpoint")
    p.add_argument("--data", default="digits")
    p.add_argument("--angle-step", type=int, default=10)
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--attacks", nargs="*", default=None, help="adversarial accuracy (bare flag: defaults; or names: fgsm pgd group)")
    p.add_argument("--corruptions", nargs="*", default=None, help="corruption accuracy by severity (bare flag: all)")
    p.add_argument("--uncertainty", nargs="*", default=None, help="calibration + error-detection scores (bare flag: defaults)")
    p.add_argument("--calibration-size", type=int, default=1000, help="training images used to fit the temperature")
    p.add_argument("--report-dir", default=None, help="write report.json + a self-contained report.html with plots")
    _add_common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export a checkpoint to one ONNX graph with metadata")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("verify", help="onnxruntime vs PyTorch parity report")
    p.add_argument("checkpoint")
    p.add_argument("onnx")
    p.add_argument("--data", default="digits", help="real inputs for the check ('' for random only)")
    p.add_argument("--limit", type=int, default=256)
    p.set_defaults(func=cmd_verify)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as err:
        print(f"canonwrap {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
