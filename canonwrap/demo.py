"""The end-to-end demo on real digits (the README's main command: ``canonwrap demo``).

1. A small CNN is trained on UPRIGHT digits only -- the stand-in for a pretrained model -- and
   cached (``$CANONWRAP_CACHE`` or ``~/.cache/canonwrap``).
2. It is frozen and wrapped with a C8 canonicalizer, which is trained on the same upright data.
3. Frozen vs wrapped: upright / C4-avg / C8-avg / angle sweep, printed and saved as JSON.
4. Export to ONNX and verify with onnxruntime; PNGs of inputs beside their canonical versions and
   of accuracy vs rotation angle.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

from .data import DIGIT_CLASSES, DigitsSplit, as_loader, load_digits
from .zoo import DigitNet


def cache_dir() -> Path:
    root = Path(os.environ.get("CANONWRAP_CACHE", Path.home() / ".cache" / "canonwrap"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def train_classifier(
    data: DigitsSplit, epochs: int = 4, lr: float = 2e-3, seed: int = 0, max_angle: float = 10.0, progress: bool = True
) -> DigitNet:
    """Train DigitNet on upright digits (small-angle jitter of +-``max_angle`` degrees and 2-pixel
    shifts, the usual MNIST augmentation; no large rotations)."""
    from tqdm.auto import tqdm

    from .groups import rotate

    torch.manual_seed(seed)
    model = DigitNet()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    loader = as_loader(data.train, 64, shuffle=True, seed=seed)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(loader))
    mean, std = model.pretrained_cfg["mean"][0], model.pretrained_cfg["std"][0]
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        for x, y in tqdm(loader, desc=f"classifier {epoch + 1}/{epochs}", disable=not progress, leave=False):
            angle = (torch.rand(x.shape[0], generator=gen) * 2 - 1) * max_angle
            x = rotate(x, angle).clamp(0, 1)
            shift = torch.randint(-2, 3, (2,), generator=gen).tolist()
            x = torch.roll(x, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model((x - mean) / std), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def pretrained_digit_classifier(progress: bool = True, retrain: bool = False, epochs: int = 4) -> DigitNet:
    """The demo's frozen classifier, trained once and cached as safetensors."""
    from safetensors.torch import load_file, save_file

    model = DigitNet()
    recipe = json.dumps({"arch": model.builtin_spec, "epochs": epochs, "recipe": "v1"}, sort_keys=True)
    key = hashlib.sha1(recipe.encode()).hexdigest()[:10]  # architecture + recipe: no stale caches
    path = cache_dir() / f"digitnet-{key}.safetensors"
    if path.exists() and not retrain:
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    model = train_classifier(load_digits(), epochs=epochs, progress=progress)
    tmp = path.with_suffix(".tmp")
    save_file(model.state_dict(), str(tmp))
    tmp.replace(path)
    return model


# The demo's canonicalizer recipe (also used by the benchmarks, so every comparison uses it).
DEMO_WRAP_KWARGS: Dict[str, Any] = {"group": "c8", "canonicalizer": "orbit"}
# A cheaper scorer (16x16 input, width 8): ~3.7x faster training, ~0.5-0.8 points lower accuracy.
FAST_WRAP_KWARGS: Dict[str, Any] = {**DEMO_WRAP_KWARGS, "canon_size": 16, "canonicalizer_kwargs": {"width": 8}}
DEMO_FIT_KWARGS: Dict[str, Any] = {"epochs": 8, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.05, "augment": "group", "task_weight": 0.0}


@dataclass
class DemoResult:
    report: Dict[str, Any]
    history: Dict[str, Any]
    verify: Optional[Dict[str, Any]]
    seconds: Dict[str, float] = field(default_factory=dict)
    files: Dict[str, str] = field(default_factory=dict)


def run_demo(
    out_dir: "str | Path" = "canonwrap-demo",
    group: str = "c8",
    canonicalizer: str = "orbit",
    epochs: int = DEMO_FIT_KWARGS["epochs"],
    n_train: Optional[int] = None,
    n_test: Optional[int] = None,
    export: bool = True,
    plots: bool = True,
    progress: bool = True,
    seed: int = 0,
    angle_step: int = 10,
    **fit_kwargs: Any,
) -> DemoResult:
    """Run the demo; returns the figures and writes them (JSON, PNG, ONNX) to ``out_dir``."""
    import canonwrap as cw

    torch.manual_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds: Dict[str, float] = {}
    t0 = time.perf_counter()
    data = load_digits()
    frozen = pretrained_digit_classifier(progress=progress)
    seconds["classifier"] = time.perf_counter() - t0
    train = (data.train_x[:n_train], data.train_y[:n_train])
    test = (data.test_x[:n_test], data.test_y[:n_test])

    model = cw.wrap(frozen, group=group, canonicalizer=canonicalizer, class_names=DIGIT_CLASSES)
    t0 = time.perf_counter()
    recipe = {**DEMO_FIT_KWARGS, "epochs": epochs, **fit_kwargs}
    history = cw.fit(model, train, progress=progress, seed=seed, **recipe)
    seconds["fit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = cw.evaluate(model, test, angles=range(0, 360, angle_step), progress=progress)
    seconds["evaluate"] = time.perf_counter() - t0
    print(f"\n{len(test[1])} test digits; frozen = classifier trained on upright digits; "
          f"wrapped = frozen classifier behind a {group.upper()} {canonicalizer} canonicalizer\n")
    print(report.table())
    files: Dict[str, str] = {}
    model.save(out / "checkpoint")
    files["checkpoint"] = str(out / "checkpoint")

    verify = None
    if export:
        t0 = time.perf_counter()
        onnx_path = out / "model.onnx"
        cw.export_onnx(model, onnx_path)
        verify_report = cw.verify_onnx(onnx_path, model, test[0][:64])
        verify = verify_report.to_dict()
        seconds["export_verify"] = time.perf_counter() - t0
        files["onnx"] = str(onnx_path)
        print("\n" + verify_report.summary())
    if plots:
        from .plots import plot_angle_sweep, plot_canonicalization

        files["angles_png"] = str(plot_angle_sweep(report, out / "accuracy_vs_angle.png"))
        files["canonical_png"] = str(plot_canonicalization(model, test[0][:8], out / "canonicalization.png", seed=seed))
    result = DemoResult(report.to_dict(), history.to_dict(), verify, seconds, files)
    (out / "results.json").write_text(json.dumps(result.__dict__, indent=2, default=float))
    print(f"\nwrote {', '.join(files.values())} and {out / 'results.json'}")
    return result
