"""Worst-case and uncertainty evaluation on real digits: evaluate(attacks=, corruptions=, uncertainty=,
calibration_data=, report_dir=), the temperature stored with the model, head ensembles / MC dropout,
uncertainty outputs in the exported graph, and clear errors for bad arguments."""
import base64
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import canonwrap as cw
from canonwrap.ensemble import EnsembleHead, add_mc_dropout, fit_ensemble, frozen_features, head_forward
from canonwrap.metrics import canon_margin, ensemble_disagreement, fit_temperature, nll, predictive_entropy
from canonwrap.report import SECTIONS
from canonwrap.worstcase import calibrate_temperature, predict_uncertainty, random_rotation, uncertainty_section

torch.set_num_threads(1)

PNG = b"\x89PNG\r\n\x1a\n"
N_TEST = 160


@pytest.fixture(scope="module")
def digits():
    from canonwrap.data import load_digits

    d = load_digits()
    return {"train": (d.train_x[:1000], d.train_y[:1000]), "val": (d.train_x[1000:1300], d.train_y[1000:1300]),
            "test": (d.test_x[::1000 // N_TEST][:N_TEST], d.test_y[::1000 // N_TEST][:N_TEST])}


@pytest.fixture(scope="module")
def model(digits):
    """A small digit classifier trained briefly on upright digits, wrapped with a C4 canonicalizer."""
    from canonwrap.zoo import DigitNet

    torch.manual_seed(0)
    net = DigitNet(width=8)
    x, y = digits["train"]
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(3):
        for idx in torch.randperm(len(y), generator=torch.Generator().manual_seed(0)).split(50):
            loss = F.cross_entropy(net((x[idx] - 0.1307) / 0.3081), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    m = cw.wrap(net.eval(), group="c4")
    assert m.config.backbone["source"] == "canonwrap"  # the same model as wrap("canonwrap:digitnet", ...)
    cw.fit(m, digits["train"], epochs=1, task_weight=0.0, progress=False)
    return m.eval()


@pytest.fixture(scope="module")
def evaluated(model, digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    rep = cw.evaluate(
        model, digits["test"], angles=range(0, 360, 45), baseline=False,
        attacks={"eps": [0, 0.05, 0.15], "steps": 3, "group_angles": [20, 40], "max_samples": 96},
        corruptions={"corruptions": ["gaussian_noise", "contrast"], "severities": [1, 5]},
        uncertainty=True, calibration_data=digits["val"], report_dir=out,
    )
    return rep, out


def _in01(values):
    return all(0.0 <= v <= 1.0 for v in values)


def test_adversarial_and_corruption_sections_are_sane(evaluated):
    rep, _ = evaluated
    adv = rep.adversarial
    assert adv["eps"] == [0, 0.05, 0.15] and adv["n"] == 96
    assert set(adv["accuracy"]) == {"fgsm", "pgd", "pgd (straight-through)", "worst"}
    clean = adv["accuracy"]["pgd"][0]
    assert clean > 0.5  # a trained model
    for name, accs in adv["accuracy"].items():
        assert _in01(accs) and accs[0] == clean, name
        assert max(accs[1:]) <= clean, name  # an attack never helps
    assert adv["accuracy"]["pgd"][-1] < clean - 0.1  # a non-robust model breaks at eps = 0.15
    for name in ("fgsm", "pgd", "pgd (straight-through)"):  # worst = correct under every attack
        assert all(w <= a + 1e-12 for w, a in zip(adv["accuracy"]["worst"], adv["accuracy"][name]))
    g = adv["group_attack"]
    assert g["worst case"] <= g["all elements"] <= g["clean"] and g["worst case"] <= g["all angles"]
    assert g["clean"] == pytest.approx(clean)
    assert sum(g["worst_element_share"].values()) == pytest.approx(1.0)

    cor = rep.corruptions
    assert cor["severities"] == [1, 5] and set(cor["accuracy"]) == {"gaussian_noise", "contrast"}
    for name, accs in cor["accuracy"].items():
        assert _in01(accs) and _in01(cor["element_agreement"][name])
        assert accs[1] <= cor["clean"] + 0.03, name  # severity 5 is not better than clean (within noise)
    assert cor["accuracy"]["gaussian_noise"][1] < cor["accuracy"]["gaussian_noise"][0]
    assert cor["clean"] == pytest.approx(rep.wrapped.upright)


def test_calibration_and_uncertainty_sections_are_sane(evaluated, model):
    rep, _ = evaluated
    cal = rep.calibration
    labels = list(cal["metrics"])
    assert labels[0] == "before (T = 1)" and labels[1].startswith("after (T = ")
    for m in cal["metrics"].values():
        assert 0 <= m["ece"] <= 1 and m["nll"] > 0 and 0 <= m["brier"] <= 2 and 0 <= m["accuracy"] <= 1
    before, after = cal["metrics"].values()
    assert before["accuracy"] == after["accuracy"]  # temperature never changes the argmax
    assert after["temperature"] == pytest.approx(float(model.temperature))
    assert sum(cal["bins"][labels[0]]["count"]) == N_TEST

    unc = rep.uncertainty
    assert set(unc["metrics"]) == {"entropy", "max_prob", "canon_margin"}  # what a plain head supports
    acc = unc["accuracy"]
    assert 0.3 < acc < 1.0  # randomly rotated inputs: some errors to detect
    for name, m in unc["metrics"].items():
        assert 0 <= m["auroc"] <= 1 and 0 <= m["acc@90%"] <= 1, name
        curve = unc["curves"][name]
        assert curve["coverage"][-1] == 1.0 and curve["risk"][-1] == pytest.approx(1 - acc)
    assert unc["metrics"]["entropy"]["auroc"] > 0.65  # entropy detects the model's errors
    assert unc["metrics"]["entropy"]["acc@90%"] > acc  # rejecting the 10% most uncertain helps
    assert "temperature" in rep.meta and "risk_coverage" in rep.to_report_dict()


def test_temperature_is_stored_and_survives_save_load(evaluated, model, digits, tmp_path):
    rep, _ = evaluated
    t = float(model.temperature)
    assert t != 1.0 and rep.meta["temperature"] == t
    # it is the NLL-optimal temperature of the (randomly rotated) calibration split
    xv, yv = digits["val"]
    with torch.no_grad():
        logits = model(random_rotation(xv, seed=1)[0])
    assert t == pytest.approx(fit_temperature(logits, yv), rel=1e-5)
    model.save(tmp_path / "ckpt")
    loaded = cw.load(tmp_path / "ckpt")
    assert float(loaded.temperature) == t
    x = digits["test"][0][:8]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))  # raw logits unchanged by the temperature


def test_temperature_scaling_fixes_an_overconfident_model(model, digits):
    hot = copy.deepcopy(model)
    with torch.no_grad():
        hot.backbone.module.classifier.weight.mul_(4.0)  # logits x4: over-confident
        hot.backbone.module.classifier.bias.mul_(4.0)
    hot.temperature.fill_(1.0)
    t = calibrate_temperature(hot, digits["val"], rotate=True)
    assert t > 2.0 and float(hot.temperature) == t  # over-confident -> T > 1, stored in the model
    x, y = random_rotation(digits["test"][0], seed=5)[0], digits["test"][1]
    out = predict_uncertainty(hot, x, {"scores": ["entropy"]})
    assert out.temperature == t
    assert nll(out.logits / t, y, kind="logits") < nll(out.logits, y, kind="logits")


def test_report_renders_each_section(evaluated):
    rep, out = evaluated
    assert Path(rep.files["html"]) == out / "report.html"
    html = (out / "report.html").read_text(encoding="utf-8")
    for key, (heading, fname) in SECTIONS.items():
        assert heading in html, key
        png = (out / fname).read_bytes()
        assert png.startswith(PNG) and base64.b64encode(png).decode() in html, fname
    assert len(re.findall(r"data:image/png;base64,", html)) == len(SECTIONS)
    saved = json.loads((out / "report.json").read_text())
    assert set(SECTIONS) <= set(saved)
    assert saved["summary"]["upright_acc"] == pytest.approx(rep.wrapped.upright)
    assert saved["meta"]["temperature"] == pytest.approx(float(rep.meta["temperature"]))
    assert "group attack" in html and "after (T = " in html  # metrics tables
    assert "adversarial pgd" in rep.table() and "uncertainty entropy" in rep.table()


def test_ensemble_head_and_mc_dropout(model, digits):
    feats = frozen_features(model, digits["train"])
    assert feats[0].shape == (1000, 128)
    ens = fit_ensemble(model, None, m=3, epochs=4, features=feats)
    again = fit_ensemble(model, None, m=3, epochs=4, features=feats)
    assert all(torch.equal(a, b) for a, b in zip(ens.state_dict().values(), again.state_dict().values()))  # seeded
    w = [h.weight for h in ens.heads]
    assert not torch.equal(w[0], w[1])  # members differ (seeds)
    wrapped = copy.deepcopy(model)
    wrapped.head = add_mc_dropout(ens, p=0.3)
    x = random_rotation(digits["test"][0][:64], seed=3)[0]
    with torch.no_grad():
        out = wrapped.canonicalize(x)
        logits, f, members = head_forward(wrapped, wrapped.normalize(out.images))
        assert members.shape == (3, 64, 10) and torch.allclose(members.mean(0), logits, atol=1e-6)
        assert torch.allclose(wrapped(x), logits, atol=1e-6)  # dropout is off in eval mode
    res = predict_uncertainty(wrapped, x, {"mc_samples": 8})
    assert set(res.scores) == {"entropy", "max_prob", "canon_margin", "ensemble", "mc_dropout"}
    assert (res.scores["ensemble"] >= 0).all() and (res.scores["mc_dropout"] > 0).any()
    assert not any(m.training for m in wrapped.modules())  # MC dropout restored eval mode
    again = predict_uncertainty(wrapped, x, {"mc_samples": 8})
    assert torch.equal(res.scores["mc_dropout"], again.scores["mc_dropout"])  # seeded masks
    assert (res.pred == digits["test"][1][:64]).float().mean() > 0.3


def test_exported_uncertainty_outputs_match_pytorch(model, digits, tmp_path):
    import onnxruntime as ort

    from converters.uncertainty import reject_threshold, uncertainty_outputs

    m = copy.deepcopy(model)
    m.head = EnsembleHead.linear(128, 10, m=3, seed=1)  # parity does not need trained heads
    m.temperature.fill_(1.7)
    thr = reject_threshold(m, digits["val"], coverage=0.9)
    res = cw.export_onnx(m, tmp_path / "u.onnx", uncertainty=True, reject_threshold=thr)
    sess = ort.InferenceSession(res.path, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    assert names == ["logits", "element", "scores", "probs", "entropy", "canon_margin", "ensemble_disagreement"]
    meta = sess.get_modelmeta().custom_metadata_map
    assert float(meta["temperature"]) == pytest.approx(1.7) and float(meta["reject_threshold"]) == thr
    assert meta["reject_score"] == "entropy" and "entropy >" in meta["reject_rule"]
    assert json.loads(meta["outputs"]) == names

    x = random_rotation(digits["test"][0][:48], seed=4)[0]
    got = dict(zip(names, sess.run(None, {"pixel_values": x.numpy()})))
    ref = uncertainty_outputs(m, x)
    assert np.array_equal(got["element"], ref["element"].numpy())
    for name in names:
        np.testing.assert_allclose(got[name], ref[name].numpy(), atol=2e-5, rtol=1e-4, err_msg=name)
    # ... and the exported definitions are the metrics' definitions
    with torch.no_grad():
        out = m.canonicalize(x)
        _, _, members = head_forward(m, m.normalize(out.images))
    np.testing.assert_allclose(got["entropy"], predictive_entropy(ref["probs"]).numpy(), atol=1e-5)
    np.testing.assert_allclose(got["canon_margin"], canon_margin(out.scores).numpy(), atol=1e-5)
    np.testing.assert_allclose(got["ensemble_disagreement"], ensemble_disagreement(members.softmax(-1)).numpy(), atol=1e-5)
    np.testing.assert_allclose(got["probs"], (ref["logits"] / 1.7).softmax(-1).numpy(), atol=1e-6)
    # the stored threshold accepts ~90% of the (rotated) validation split
    val_entropy = uncertainty_outputs(m, random_rotation(digits["val"][0], seed=2)[0])["entropy"]
    assert (val_entropy <= thr).float().mean() == pytest.approx(0.9, abs=0.01)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"attacks": ["fgsm", "pgdd"]}, KeyError, "Did you mean 'pgd'"),
        ({"attacks": {"epss": [0.1]}}, TypeError, "Did you mean 'eps'"),
        ({"attacks": 5}, TypeError, "attacks must be a name or a sequence"),
        ({"attacks": {"eps": [-0.1]}}, ValueError, "eps must be >= 0"),
        ({"corruptions": ["gaussian_nois"]}, KeyError, "Did you mean 'gaussian_noise'"),
        ({"corruptions": {"severities": [6]}}, ValueError, "severities must be"),
        ({"uncertainty": {"coverage": 0}}, ValueError, r"coverage must be a number in \(0, 1\]"),
        ({"uncertainty": {"coverage": 1.5}}, ValueError, r"coverage must be a number in \(0, 1\]"),
        ({"uncertainty": ["entropy", "entropyy"]}, KeyError, "Did you mean 'entropy'"),
        ({"uncertainty": ["ensemble"]}, ValueError, "needs an EnsembleHead"),
        ({"uncertainty": ["mc_dropout"]}, ValueError, "needs dropout in the head"),
    ],
)
def test_bad_arguments_give_clear_errors(model, kwargs, exc, match):
    x, y = torch.rand(4, 1, 32, 32), torch.zeros(4, dtype=torch.long)
    with pytest.raises(exc, match=match):
        cw.evaluate(model, (x, y), **kwargs)


def test_more_bad_arguments(model, tmp_path):
    res = predict_uncertainty(model, torch.rand(8, 1, 32, 32), {"scores": ["entropy"]})
    with pytest.raises(ValueError, match=r"coverage must be a number in \(0, 1\]"):
        uncertainty_section(res, torch.zeros(8, dtype=torch.long), coverage=0.0)
    with pytest.raises(ValueError, match="reject_threshold needs uncertainty=True"):
        cw.export_onnx(model, tmp_path / "x.onnx", reject_threshold=0.5)
    with pytest.raises(ValueError, match="unknown reject score 'entropi'"):
        cw.export_onnx(model, tmp_path / "x.onnx", uncertainty=True, reject_score="entropi")
    with pytest.raises(ValueError, match="needs an ensemble head"):
        cw.export_onnx(model, tmp_path / "x.onnx", uncertainty=True, reject_score="ensemble_disagreement")
    assert not (tmp_path / "x.onnx").exists()  # validated before exporting
    with pytest.raises(ValueError, match=r"dropout probability must be in \(0, 1\)"):
        add_mc_dropout(torch.nn.Linear(4, 2), p=1.5)
    with pytest.raises(TypeError, match="head must be an nn.Module"):
        add_mc_dropout("linear")
    with pytest.raises(ValueError, match="m must be an int >= 1"):
        EnsembleHead.linear(4, 2, m=0)


def test_imports_stay_light():
    code = ("import sys, canonwrap.worstcase, canonwrap.ensemble, converters.uncertainty; "
            "heavy = [m for m in ('matplotlib', 'timm', 'transformers', 'onnx', 'onnxruntime') if m in sys.modules]; "
            "assert not heavy, heavy")
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert res.returncode == 0, res.stderr
