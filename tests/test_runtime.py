"""canonwrap.runtime: metadata round trip, provider checks, parity with PyTorch, input errors,
torch-free import, CUDA-graph bucket logic (on CPU) and the CUDA paths (skipped without a GPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import canonwrap as cw  # noqa: E402
from canonwrap import runtime as rt  # noqa: E402
from converters.onnx_export import export_onnx  # noqa: E402

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
CLASSES = [f"digit-{i}" for i in range(10)]
HAS_CUDA = rt.cuda_available() and torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu with the CUDA provider and a CUDA device")
no_cuda_provider = pytest.mark.skipif(rt.cuda_available(), reason="this onnxruntime has the CUDA provider")


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    torch.manual_seed(0)
    model = cw.wrap("canonwrap:digitnet", group="c8", class_names=CLASSES).eval()
    path = tmp_path_factory.mktemp("runtime") / "digits.onnx"
    export_onnx(model, path)
    return model, path


@pytest.fixture(scope="module")
def resnet_model(tmp_path_factory):
    torch.manual_seed(0)
    model = cw.wrap("timm:test_resnet", group="c4").eval()
    path = tmp_path_factory.mktemp("runtime") / "resnet.onnx"
    export_onnx(model, path)
    return model, path


@pytest.fixture(scope="module")
def real_digits():
    return cw.load_digits().test_x[:64]  # (64, 1, 32, 32) real MNIST digits in [0, 1]


def test_metadata_round_trip(digits_model, resnet_model):
    model, path = digits_model
    info = rt.Session(path, device="cpu").info
    assert info.group == "c8" and info.canonicalizer == "orbit"
    assert len(info.group_elements) == 8 and info.describe_element(1) == "rot45"
    assert info.input_size == (1, 32, 32) and info.input_name == "pixel_values"
    assert info.mean == pytest.approx(model.config.mean) and info.std == pytest.approx(model.config.std)
    assert info.class_names == CLASSES and info.num_classes == 10
    assert info.outputs == ["logits", "element", "scores"]
    assert info.dtype == "fp32" and info.io_dtype == "fp32" and info.input_range == (0.0, 1.0)

    model, path = resnet_model
    info = rt.Session(path, device="cpu").info
    assert info.group == "c4" and [e["angle"] for e in info.group_elements] == [0.0, 90.0, 180.0, 270.0]
    assert info.input_size == tuple(model.config.input_size) == (3, 160, 160)
    assert info.mean == pytest.approx(model.config.mean) and info.std == pytest.approx(model.config.std)
    assert info.class_names is None and info.num_classes == 1000


@no_cuda_provider
def test_cuda_without_onnxruntime_gpu_is_a_clear_error(digits_model):
    with pytest.raises(rt.ProviderError, match=r"onnxruntime-gpu.*CPU build.*canonwrap\[gpu\]"):
        rt.Session(digits_model[1], device="cuda")


@no_cuda_provider
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available")
@pytest.mark.parametrize("strict", [True, False])
def test_silent_cpu_fallback_is_refused(digits_model, monkeypatch, strict):
    # pretend the CUDA provider is installed: onnxruntime itself then cannot load it, and either
    # refuses (strict: CPU fallback disabled) or quietly builds a CPU session -- which we must refuse
    real = ort.get_available_providers
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real()])
    with pytest.raises(rt.ProviderError, match="CUDA provider") as err:
        rt.Session(digits_model[1], device="cuda", disable_cpu_fallback=strict)
    if not strict:
        assert "silent CPU fallback" in str(err.value) and "CPUExecutionProvider" in str(err.value)


@no_cuda_provider
def test_cuda_session_configuration_without_a_gpu(digits_model, monkeypatch):
    """What a CUDA Session asks onnxruntime for, checked with a recording stand-in for the session
    class (it runs on the CPU but reports the CUDA provider first)."""
    created = []

    def config(so, key):
        try:
            return so.get_session_config_entry(key)
        except RuntimeError:
            return None

    class RecordingSession(ort.InferenceSession):
        def __init__(self, path, sess_options=None, providers=None, **kwargs):
            created.append({"providers": providers, "strict": config(sess_options, "session.disable_cpu_ep_fallback"),
                            "kwargs": kwargs})
            strict = created[-1]["strict"] == "1"  # a CPU session cannot honour it: plain options then
            super().__init__(path, None if strict else sess_options, providers=["CPUExecutionProvider"])

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", RecordingSession)
    path = digits_model[1]
    rt.Session(path, device="cuda")
    assert created[-1] == {
        "providers": [("CUDAExecutionProvider", {"device_id": "0", "use_tf32": "0"})],  # no CPU EP: strict
        "strict": "1", "kwargs": {"enable_fallback": 0},
    }
    rt.Session(path, device="cuda", device_id=1, disable_cpu_fallback=False, tf32=True)
    assert created[-1]["providers"] == [("CUDAExecutionProvider", {"device_id": "1", "use_tf32": "1"}), "CPUExecutionProvider"]
    assert created[-1]["strict"] is None
    with pytest.raises(ValueError, match="disable_cpu_fallback=True"):
        rt.Session(path, device="cuda", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    # CUDA graphs: a metadata probe, then one session per bucket with a static batch and the graph option
    monkeypatch.setattr(rt, "_GraphBucket", lambda sess, b, info, device_id: SimpleNamespace(session=sess, batch=b))
    created.clear()
    sess = rt.Session(path, device="cuda", cuda_graph=True, batch_buckets=(8, 1), disable_cpu_fallback=False)
    assert sess.batch_buckets == (1, 8) and len(created) == 3
    for b, record in zip((1, 8), created[1:]):
        assert record["providers"][0] == ("CUDAExecutionProvider", {"device_id": "0", "use_tf32": "0", "enable_cuda_graph": "1"})
        assert sess._buckets[b].session.get_inputs()[0].shape == [b, 1, 32, 32]  # free dimension "batch" fixed


def test_missing_cuda_libraries_are_named():
    text = (
        "Failed to load libonnxruntime_providers_cuda.so with error: libcublasLt.so.13: cannot open shared "
        "object file: No such file or directory; also libcudnn_graph.so.9 and libcudart.so.13"
    )
    assert rt.missing_cuda_libraries(text) == ["libcublasLt.so.13", "libcudart.so.13", "libcudnn_graph.so.9"]


def test_session_arguments_are_checked(digits_model, tmp_path):
    path = digits_model[1]
    with pytest.raises(ValueError, match="'cuda' or 'cpu'"):
        rt.Session(path, device="tpu")
    with pytest.raises(ValueError, match="cuda_graph=True needs device='cuda'"):
        rt.Session(path, device="cpu", cuda_graph=True)
    with pytest.raises(ValueError, match="batch_buckets only applies"):
        rt.Session(path, device="cpu", batch_buckets=(1, 32))
    with pytest.raises(FileNotFoundError, match="no ONNX file"):
        rt.Session(tmp_path / "missing.onnx", device="cpu")


def test_parity_with_pytorch_on_real_digits(digits_model, real_digits):
    model, path = digits_model
    sess = rt.Session(path, device="cpu")
    pred = sess.run(real_digits.numpy())
    with torch.no_grad():
        logits, element, scores = model.forward_with_element(real_digits)
    assert pred.logits.shape == (64, 10) and pred.element.dtype == np.int64
    assert (pred.element == element.numpy()).all()  # 100% element agreement on real digits
    scale = float(logits.abs().max())
    assert np.abs(pred.logits - logits.numpy()).max() / scale < 1e-4
    assert np.allclose(pred.scores, scores.numpy(), atol=1e-4 * float(scores.abs().max()))
    assert np.allclose(pred.probs, torch.softmax(logits, 1).numpy(), atol=1e-5)
    assert pred.labels == [CLASSES[i] for i in logits.argmax(1).tolist()]
    # a torch CPU tensor and a batch of one give the same answers
    again = sess.run(real_digits[:1])
    assert again.element[0] == pred.element[0] and np.allclose(again.logits[0], pred.logits[0], atol=1e-5)


def test_runtime_imports_and_runs_without_torch(digits_model, real_digits):
    model, path = digits_model
    x_path = Path(path).with_name("x.npy")
    np.save(x_path, real_digits[:8].numpy())
    code = (
        "import sys, json, numpy as np\n"
        "sys.modules['torch'] = None; sys.modules['onnx'] = None\n"  # any import of them fails
        "import canonwrap.runtime as rt\n"
        f"pred = rt.Session({str(path)!r}, device='cpu').run(np.load({str(x_path)!r}))\n"
        "print(json.dumps({'element': pred.element.tolist(), 'labels': pred.labels,"
        " 'torch': sys.modules.get('torch') is not None}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        _, element, _ = model.forward_with_element(real_digits[:8])
    assert got["element"] == element.tolist() and len(got["labels"]) == 8 and got["torch"] is False


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda x: x[0], ValueError, r"add a batch dimension"),
        (lambda x: (x * 255).astype(np.uint8), TypeError, r"got dtype uint8.*/ 255"),
        (lambda x: x.transpose(0, 2, 3, 1), ValueError, r"expected 1 channels.*channels-last"),
        (lambda x: x * 255, ValueError, r"\[0, 1\].*divide by 255"),
        (lambda x: x[:, :, :28, :28], ValueError, r"spatial size 32x32.*Resize"),
        (lambda x: x[:0], ValueError, r"non-empty batch"),
        (lambda x: np.where(x > 0.5, np.nan, x), ValueError, r"NaN"),
        (lambda x: x.tolist(), TypeError, r"numpy array or a torch tensor"),
    ],
    ids=["no-batch", "uint8", "channels-last", "0-255", "size", "empty", "nan", "list"],
)
def test_bad_inputs_give_clear_errors(digits_model, real_digits, make, error, match):
    sess = rt.Session(digits_model[1], device="cpu")
    with pytest.raises(error, match=match):
        sess.run(make(real_digits[:4].numpy().astype(np.float32)))


def test_channels_last_rgb_hint(resnet_model):
    sess = rt.Session(resnet_model[1], device="cpu")
    with pytest.raises(ValueError, match=r"expected 3 channels.*channels-last.*transpose\(0, 3, 1, 2\)"):
        sess.run(np.random.rand(2, 160, 160, 3).astype(np.float32))
    out = sess.run(np.random.rand(2, 3, 160, 160))  # float64 is accepted (cast to float32)
    assert out.logits.shape == (2, 1000) and out.labels is None and out.element.shape == (2,)


def test_predict_files_and_arrays(digits_model, real_digits, tmp_path):
    from PIL import Image

    sess = rt.Session(digits_model[1], device="cpu")
    digit = real_digits[0, 0].numpy()  # (32, 32) float in [0, 1]
    direct = sess.run(digit[None, None])
    # float (H, W) at the graph's size: no resize, same answer as run()
    assert np.allclose(sess.predict(digit).logits, direct.logits, atol=1e-6)
    # a PNG file, and an RGB array with equal channels (converted to gray), give the quantized digit
    u8 = np.round(digit * 255).astype(np.uint8)
    Image.fromarray(u8).save(tmp_path / "digit.png")
    from_file = sess.predict(str(tmp_path / "digit.png"))
    from_rgb = sess.predict(np.repeat(u8[:, :, None], 3, axis=2))
    quantized = sess.run((u8 / 255.0)[None, None].astype(np.float32))
    assert np.allclose(from_file.logits, quantized.logits, atol=1e-5)
    assert np.allclose(from_rgb.logits, quantized.logits, atol=1e-4)
    # other sizes are resized (PIL bilinear) to 32x32; a batch of mixed inputs
    batch = sess.preprocess([u8[2:30, 2:30], np.zeros((64, 48, 4), np.uint8), str(tmp_path / "digit.png")])
    assert batch.shape == (3, 1, 32, 32) and batch.dtype == np.float32 and 0 <= batch.min() <= batch.max() <= 1
    pred = sess.predict([u8[2:30, 2:30], str(tmp_path / "digit.png")])
    assert pred.logits.shape == (2, 10) and len(pred.labels) == 2 and pred.labels[0] in CLASSES
    assert np.allclose(rt.predict(digits_model[1], str(tmp_path / "digit.png")).logits, from_file.logits)
    with pytest.raises(ValueError, match="channels-first"):
        sess.predict(np.zeros((3, 40, 40), np.float32))
    with pytest.raises(ValueError, match="divide by 255"):
        sess.predict(np.full((32, 32), 200.0))


def test_bucket_padding_and_chunking_on_cpu(digits_model, real_digits):
    """The CUDA-graph code path minus the capture: fixed-batch sessions bound to static OrtValues
    (here on the CPU), inputs padded to the nearest bucket, outputs sliced, big batches chunked."""
    path = digits_model[1]
    info = rt.Session(path, device="cpu").info
    buckets = {}
    for b in (1, 4):
        so = ort.SessionOptions()
        so.add_free_dimension_override_by_name("batch", b)
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        buckets[b] = rt._GraphBucket(sess, b, info, 0, device_type="cpu")
    ref = rt.Session(path, device="cpu")
    x = real_digits[:11].numpy()
    for n in (1, 3, 4, 11):  # 11 = chunks of 4 + 4 + 3 (padded to 4)
        got = rt.run_in_buckets(x[:n], buckets)
        want = ref.run(x[:n])
        assert got["logits"].shape == (n, 10) and (got["element"] == want.element).all()
        assert np.allclose(got["logits"], want.logits, atol=1e-5)
    # the zero-copy view torch uses on the static buffers (``__cuda_array_interface__``)
    view = rt._CudaArray(buckets[4].outputs["element"]).__cuda_array_interface__
    assert view["shape"] == (4,) and view["typestr"] == "<i8" and view["data"][0] == buckets[4].outputs["element"].data_ptr()
    first = rt.run_in_buckets(x[:3], buckets)["logits"]
    rt.run_in_buckets(x[5:8], buckets)  # reuses the static buffers: earlier results must not change
    assert np.allclose(first, ref.run(x[:3]).logits, atol=1e-5)


def test_node_placement_on_cpu(digits_model):
    placement = rt.node_placement(digits_model[1], device="cpu", batch=2)
    assert set(placement["providers"]) == {"CPUExecutionProvider"} and placement["memcpy"] == 0
    assert sum(placement["providers"].values()) == len(placement["nodes"]) > 10


# ------------------------------------------------------------------------------- CUDA only
@needs_cuda
def test_cuda_session_numpy_and_torch_io_binding(digits_model, real_digits):
    model, path = digits_model
    cpu = rt.Session(path, device="cpu").run(real_digits.numpy())
    sess = rt.Session(path, device="cuda", disable_cpu_fallback=False)
    assert sess.providers[0] == "CUDAExecutionProvider"
    from_numpy = sess.run(real_digits.numpy())
    assert (from_numpy.element == cpu.element).all() and np.allclose(from_numpy.logits, cpu.logits, atol=1e-3)
    x = real_digits.cuda()
    from_torch = sess.run(x)  # IO binding on the tensor's device memory
    assert from_torch.logits.is_cuda and from_torch.element.is_cuda and from_torch.probs.is_cuda
    host = from_torch.numpy()
    assert (host.element == cpu.element).all() and np.allclose(host.logits, cpu.logits, atol=1e-3)


@needs_cuda
def test_strict_cuda_session_matches_placement(digits_model):
    path = digits_model[1]
    placement = rt.node_placement(path, device="cuda", batch=2)
    on_cpu = placement["providers"].get("CPUExecutionProvider", 0)
    try:
        rt.Session(path, device="cuda")  # disable_cpu_fallback=True
        strict_ok = True
    except rt.ProviderError as err:
        assert "would run on the CPU" in str(err)
        strict_ok = False
    assert strict_ok == (on_cpu == 0)


@needs_cuda
def test_cuda_graph_buckets(digits_model, real_digits):
    path = digits_model[1]
    cpu = rt.Session(path, device="cpu")
    sess = rt.Session(path, device="cuda", cuda_graph=True, batch_buckets=(1, 4, 8))
    assert sess.batch_buckets == (1, 4, 8)
    for n in (3, 8, 11, 3):  # padded to 4; exact; 8 + 3; a replay of a captured bucket
        x = real_digits[:n]
        want = cpu.run(x.numpy())
        got = sess.run(x.numpy())
        assert (got.element == want.element).all() and np.allclose(got.logits, want.logits, atol=1e-3)
        got_t = sess.run(x.cuda()).numpy()
        assert (got_t.element == want.element).all() and np.allclose(got_t.logits, want.logits, atol=1e-3)
