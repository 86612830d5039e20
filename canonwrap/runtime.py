"""Deploy an exported canonwrap graph with onnxruntime only (no torch): ``Session`` and ``predict``.

    sess = Session("model.onnx", device="cuda")         # refuses to run on CPU silently
    pred = sess.run(x)                                   # x (B, C, H, W) float32 in [0, 1]
    pred.logits, pred.element, pred.probs, pred.labels   # (B, K), (B,), (B, K), names or None
    sess.predict(["a.png", "b.jpg"])                     # files/arrays: resized to the graph's size

What the exported file carries (``metadata_props``, written by ``converters.onnx_export``): the group
and its elements, the canonicalizer, mean/std (applied INSIDE the graph: feed pixels in [0, 1]), the
input size (C, H, W), class names and output names. :class:`ModelInfo` decodes them.

Devices. ``device="cuda"`` needs the onnxruntime-gpu build (``pip install canonwrap[gpu]``, which
installs it *instead of* onnxruntime) and the CUDA 13 / cuDNN 9 libraries. The session is checked
after creation: if the CUDA execution provider is not the first provider (onnxruntime falls back to
the CPU when the CUDA libraries do not load), :class:`ProviderError` is raised naming the missing
library. With ``disable_cpu_fallback=True`` (default) onnxruntime is also told not to place single
nodes on the CPU (``session.disable_cpu_ep_fallback``) and not to retry failed runs on the CPU.

Inputs. numpy arrays go through ``InferenceSession.run`` (host -> device copy by onnxruntime). torch
CUDA tensors are bound with IO binding to their device memory (``bind_input(..., buffer_ptr=
x.data_ptr())``), outputs are written into torch CUDA tensors: no host round trip; the prediction
then holds torch tensors on the same device (:meth:`Prediction.numpy` copies them to the host).

CUDA graphs (``cuda_graph=True``, CUDA only). onnxruntime replays a captured CUDA graph only for the
exact shapes and device addresses it captured, so there is one ``InferenceSession`` per batch size in
``batch_buckets`` (default ``(1, 32, 128)``), created with the ``enable_cuda_graph`` provider option
and a free-dimension override that makes its batch static (so shape computations can fold into
constants instead of running on the CPU), bound once to pre-allocated device buffers (``OrtValue``).
A batch of ``n`` runs in the smallest bucket ``>= n`` (padded with zeros, outputs sliced back to
``n``); batches larger than the largest bucket run in chunks. The first run of each bucket captures
the graph. fp32 nodes compute in real fp32 (``tf32=False`` by default, see :class:`Session`).

A Session is not thread-safe (IO bindings are reused); create one per thread.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

DEFAULT_BUCKETS: Tuple[int, ...] = (1, 32, 128)
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"
_ORT_TO_NUMPY = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(uint8)": np.uint8,
}
_CUDA_LIB = re.compile(r"(lib(?:cudart|cublasLt|cublas|cudnn[a-z_]*|cufft|curand|nvrtc|nvJitLink|cuda)\.so(?:\.[0-9]+)*)")


class ProviderError(RuntimeError):
    """The requested execution provider cannot run the model (instead of a silent CPU fallback)."""


# ------------------------------------------------------------------------------------- metadata
@dataclass
class ModelInfo:
    """What the exported graph says about itself (decoded ``metadata_props`` + graph IO).

    input_size (C, H, W); mean/std are applied inside the graph (informational); group_elements
    is a list of ``{"index", "angle", "flip"}``; dtype is the graph precision (``fp32``/``fp16``)
    and io_dtype the precision of its float inputs/outputs.
    """

    input_name: str
    input_size: Tuple[int, int, int]
    outputs: List[str]
    group: Optional[str] = None
    group_elements: List[Dict[str, Any]] = field(default_factory=list)
    canonicalizer: Optional[str] = None
    mean: Tuple[float, ...] = ()
    std: Tuple[float, ...] = ()
    class_names: Optional[List[str]] = None
    num_classes: Optional[int] = None
    input_range: Tuple[float, float] = (0.0, 1.0)
    dtype: str = "fp32"
    io_dtype: str = "fp32"
    metadata: Dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def channels(self) -> int:
        return self.input_size[0]

    def describe_element(self, e: int) -> str:
        """``rot90``, ``flip+rot45``, ... for element index ``e``."""
        if not 0 <= int(e) < len(self.group_elements):
            raise IndexError(f"group {self.group} has elements 0..{len(self.group_elements) - 1}; got {e}")
        el = self.group_elements[int(e)]
        return f"{'flip+' if el.get('flip') else ''}rot{float(el.get('angle', 0)):g}"

    @classmethod
    def from_session(cls, session: Any) -> "ModelInfo":
        """Build from an ``onnxruntime.InferenceSession`` (metadata + input/output signature)."""
        raw = dict(session.get_modelmeta().custom_metadata_map)
        meta = {k: _json(v) for k, v in raw.items()}
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"expected a graph with one image input; got inputs {[i.name for i in inputs]}")
        inp = inputs[0]
        size = meta.get("input_size")
        if not size:
            dims = inp.shape[1:]
            if len(dims) != 3 or not all(isinstance(d, int) for d in dims):
                raise ValueError(
                    f"{inp.name!r} has shape {inp.shape} and the file has no 'input_size' metadata; "
                    "expected (B, C, H, W) with static C, H, W"
                )
            size = dims
        names = meta.get("class_names")
        rng = meta.get("input_range") or [0, 1]
        io_dtype = "fp16" if inp.type == "tensor(float16)" else "fp32"
        return cls(
            input_name=inp.name,
            input_size=tuple(int(v) for v in size),  # type: ignore[arg-type]
            outputs=[o.name for o in session.get_outputs()],
            group=meta.get("group"),
            group_elements=list(meta.get("group_elements") or []),
            canonicalizer=meta.get("canonicalizer"),
            mean=tuple(float(v) for v in meta.get("mean") or ()),
            std=tuple(float(v) for v in meta.get("std") or ()),
            class_names=[str(n) for n in names] if names else None,
            num_classes=int(meta["num_classes"]) if meta.get("num_classes") is not None else None,
            input_range=(float(rng[0]), float(rng[1])),
            dtype=str(meta.get("dtype", "fp32")),
            io_dtype=io_dtype,
            metadata=raw,
        )


def _json(value: str) -> Any:
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        return value


# ----------------------------------------------------------------------------------- prediction
@dataclass
class Prediction:
    """Outputs of one run. Arrays are numpy for numpy inputs, torch tensors (same CUDA device) for
    torch inputs.

    logits (B, K); element (B,) int64: the chosen group element (the input is ``element . canonical``),
    or None if the graph has no ``element`` output; probs (B, K) softmax of the logits (float32);
    labels: the top-1 class names when the file has class names; outputs: every graph output by name
    (``scores`` and any extra output such as ``entropy`` / ``canon_margin``, also reachable as
    attributes: ``pred.scores``).
    """

    logits: Any
    element: Any
    probs: Any
    labels: Optional[List[str]] = None
    outputs: Dict[str, Any] = field(default_factory=dict, repr=False)

    def __getattr__(self, name: str) -> Any:
        outputs = self.__dict__.get("outputs", {})
        if name in outputs:
            return outputs[name]
        raise AttributeError(f"Prediction has no attribute or graph output {name!r}; outputs: {sorted(outputs)}")

    @property
    def top1(self) -> Any:
        """(B,) index of the most likely class."""
        return self.logits.argmax(-1)

    def numpy(self) -> "Prediction":
        """A copy with every array on the host as numpy (no-op for numpy predictions)."""
        conv = {k: _to_numpy(v) for k, v in self.outputs.items()}
        return Prediction(_to_numpy(self.logits), _to_numpy(self.element), _to_numpy(self.probs), self.labels, conv)


def _to_numpy(v: Any) -> Any:
    if v is None or isinstance(v, np.ndarray):
        return v
    return v.detach().cpu().numpy()


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float32)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _is_torch(x: Any) -> bool:
    return hasattr(x, "__dlpack__") and hasattr(x, "data_ptr") and hasattr(x, "is_cuda")


# --------------------------------------------------------------------------------------- session
class Session:
    """An onnxruntime session for an exported canonwrap graph (see the module docstring).

    Args:
        path: the ``.onnx`` file (fp32 or fp16, from ``export_onnx``).
        device: ``"cuda"`` (needs onnxruntime-gpu; never falls back to the CPU silently) or ``"cpu"``.
        device_id: CUDA device index.
        cuda_graph: capture and replay CUDA graphs, one per batch bucket (CUDA only).
        batch_buckets: batch sizes with a captured graph (``cuda_graph=True`` only; default (1, 32, 128)).
        providers: explicit onnxruntime providers (names or ``(name, options)``), overriding the
            defaults for ``device``; the first one must still match ``device``.
        disable_cpu_fallback: CUDA only: fail at creation if any node would be placed on the CPU
            (``session.disable_cpu_ep_fallback``; onnxruntime then also rejects the CPU provider in
            the list). A failed CUDA run is never retried on the CPU either way.
        intra_op_threads: onnxruntime intra-op threads (CPU work).
        check_range: check that numpy/torch inputs lie in [0, 1] (costs a min/max; off for benchmarks).
        tf32: CUDA only: let fp32 convolutions/GEMMs use TF32 tensor cores (onnxruntime's default).
            Off by default so fp32 nodes -- the selection path of an fp16 graph, or a whole fp32
            graph -- compute in real fp32 (TF32 keeps 10 mantissa bits, like fp16, and flips
            near-tie elements); turn on for speed when fp32 parity does not matter.
    Example:
        >>> sess = Session("digits.onnx", device="cpu")
        >>> pred = sess.run(np.random.rand(4, 1, 32, 32).astype(np.float32))
        >>> pred.logits.shape, pred.element
    """

    def __init__(
        self,
        path: "str | os.PathLike[str]",
        device: str = "cuda",
        device_id: int = 0,
        cuda_graph: bool = False,
        batch_buckets: Optional[Sequence[int]] = None,
        providers: Optional[Sequence[Any]] = None,
        disable_cpu_fallback: bool = True,
        intra_op_threads: Optional[int] = None,
        check_range: bool = True,
        tf32: bool = False,
    ) -> None:
        ort = _import_ort()
        self.path = str(path)
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"no ONNX file at {self.path!r}")
        if device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu'; got {device!r}")
        if cuda_graph and device != "cuda":
            raise ValueError(
                "cuda_graph=True needs device='cuda' (CUDA graphs are a CUDA execution provider feature); "
                f"got device={device!r}"
            )
        if batch_buckets is not None and not cuda_graph:
            raise ValueError("batch_buckets only applies with cuda_graph=True")
        self.device, self.device_id, self.cuda_graph = device, int(device_id), bool(cuda_graph)
        self.disable_cpu_fallback, self.check_range = bool(disable_cpu_fallback), bool(check_range)
        self._intra, self.tf32 = intra_op_threads, bool(tf32)
        if device == "cuda":
            require_cuda_provider(ort)
        self._providers = list(providers) if providers is not None else self._default_providers()
        names = [p[0] if isinstance(p, tuple) else p for p in self._providers]
        if not names:
            raise ValueError("providers must not be empty")
        if device == "cuda" and disable_cpu_fallback and _CPU in names:
            raise ValueError(
                f"providers {names} include {_CPU} but disable_cpu_fallback=True (onnxruntime rejects that "
                "combination); drop it or pass disable_cpu_fallback=False"
            )
        self.batch_buckets: Tuple[int, ...] = ()
        self._buckets: Dict[int, "_GraphBucket"] = {}
        if cuda_graph:
            buckets = sorted({int(b) for b in (batch_buckets or DEFAULT_BUCKETS)})
            if not buckets or buckets[0] < 1:
                raise ValueError(f"batch_buckets must be positive batch sizes; got {batch_buckets!r}")
            self.batch_buckets = tuple(buckets)
            probe = self._probe_signature(ort)
            self.info = ModelInfo.from_session(probe)
            batch_dim = probe.get_inputs()[0].shape[0]
            del probe
            if isinstance(batch_dim, int) and batch_dim > 0 and self.batch_buckets != (batch_dim,):
                raise ValueError(f"{self.path} has a static batch of {batch_dim}; use batch_buckets=({batch_dim},)")
            for b in self.batch_buckets:
                sess = self._create(ort, graph_batch=(batch_dim, b))
                self._buckets[b] = _GraphBucket(sess, b, self.info, self.device_id)
            self.session = self._buckets[self.batch_buckets[-1]].session
        else:
            self.session = self._create(ort)
            self.info = ModelInfo.from_session(self.session)
        if "logits" not in self.info.outputs:
            raise ValueError(f"{self.path} has no 'logits' output (outputs: {self.info.outputs}); not a canonwrap classifier graph")
        self._io_dtype = np.float16 if self.info.io_dtype == "fp16" else np.float32

    # ------------------------------------------------------------------ session creation
    def _default_providers(self) -> List[Any]:
        if self.device == "cpu":
            return [_CPU]
        cuda = (_CUDA, {"device_id": str(self.device_id), "use_tf32": "1" if self.tf32 else "0"})
        # onnxruntime refuses the CPU EP in the list when CPU fallback is disabled
        return [cuda] if self.disable_cpu_fallback else [cuda, _CPU]

    def _options(self, ort: Any) -> Any:
        so = ort.SessionOptions()
        if self._intra:
            so.intra_op_num_threads = int(self._intra)
        if self.device == "cuda" and self.disable_cpu_fallback:
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        return so

    def _probe_signature(self, ort: Any) -> Any:
        """A cheap CPU session (no optimizations) to read the metadata and the batch dimension name."""
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(self.path, so, providers=[_CPU])

    def _create(self, ort: Any, graph_batch: Optional[Tuple[Any, int]] = None) -> Any:
        so = self._options(ort)
        providers = self._providers
        if graph_batch is not None:
            dim, b = graph_batch
            if isinstance(dim, str) and dim:
                so.add_free_dimension_override_by_name(dim, int(b))
            providers = [_with_option(p, _CUDA, "enable_cuda_graph", "1") for p in providers]
        first = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
        if (self.device == "cuda") != (first == _CUDA):
            raise ValueError(f"device={self.device!r} but the first provider is {first!r}")
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):  # older onnxruntime prints its fallback banner
                sess = ort.InferenceSession(self.path, so, providers=providers, enable_fallback=0)
        except Exception as err:  # noqa: BLE001 - re-raised with a diagnosis
            if self.device != "cuda":
                raise
            raise ProviderError(_cuda_failure_message(ort, f"{err}\n{log.getvalue()}")) from err
        if self.device == "cuda":
            got = list(sess.get_providers())
            if not got or got[0] != _CUDA:
                raise ProviderError(
                    f"asked for device='cuda' but onnxruntime created the session on {got} (a silent CPU "
                    f"fallback); refusing to run. {_cuda_failure_message(ort, log.getvalue())}"
                )
            sess.disable_fallback()  # a failing CUDA run raises instead of being re-run on the CPU
        return sess

    @property
    def providers(self) -> List[str]:
        """Providers of the (largest-bucket) session, in precedence order."""
        return list(self.session.get_providers())

    def __repr__(self) -> str:
        extra = f", cuda_graph buckets={self.batch_buckets}" if self.cuda_graph else ""
        return (
            f"Session({Path(self.path).name!r}, device={self.device!r}, providers={self.providers}{extra}, "
            f"input={self.info.input_name} (B, {', '.join(map(str, self.info.input_size))}) {self.info.io_dtype}, "
            f"group={self.info.group})"
        )

    # --------------------------------------------------------------------------- running
    def run(self, x: Any) -> Prediction:
        """Run a batch. x (B, C, H, W) float pixels in [0, 1]: a numpy array or a torch tensor
        (CUDA tensors stay on the device). Returns a :class:`Prediction`."""
        if _is_torch(x):
            if self.device == "cuda" and x.is_cuda:
                return self._finish(self._run_torch(x), torch_out=True)
            x = x.detach().cpu().numpy()
        x = self._check_numpy(x)
        if self.cuda_graph:
            raw = self._run_buckets(x)
        else:
            raw = dict(zip(self.info.outputs, self.session.run(None, {self.info.input_name: x})))
        return self._finish(raw, torch_out=False)

    __call__ = run

    def _finish(self, raw: Dict[str, Any], torch_out: bool) -> Prediction:
        logits = raw["logits"]
        if "probs" in raw:  # graphs exported with uncertainty=True: calibrated (temperature) probs
            probs = raw["probs"]
        else:
            probs = logits.float().softmax(-1) if torch_out else _softmax(logits)
        names = self.info.class_names
        labels = [names[i] for i in logits.argmax(-1).tolist()] if names else None
        return Prediction(logits, raw.get("element"), probs, labels, raw)

    def _expected(self) -> str:
        c, h, w = self.info.input_size
        return f"(B, {c}, {h}, {w}) float pixels in [0, 1]"

    def _check_shape(self, shape: Tuple[int, ...], kind: str) -> None:
        c, h, w = self.info.input_size
        expected = self._expected()
        if len(shape) != 4:
            hint = " (add a batch dimension: x[None])" if len(shape) == 3 else ""
            raise ValueError(f"expected a {kind} of {expected}; got shape {tuple(shape)}{hint}")
        if shape[0] == 0:
            raise ValueError(f"expected a non-empty batch {expected}; got shape {tuple(shape)}")
        if shape[1] != c:
            hint = ""
            if shape[-1] == c:
                hint = " (channels-last input? transpose to channels-first: x.transpose(0, 3, 1, 2) / x.permute(0, 3, 1, 2))"
            raise ValueError(f"expected {c} channels, {expected}; got shape {tuple(shape)}{hint}")
        if tuple(shape[2:]) != (h, w):
            raise ValueError(
                f"expected spatial size {h}x{w}, {expected}; got shape {tuple(shape)}. "
                "Resize first (Session.predict resizes images for you)"
            )

    def _check_values(self, lo: float, hi: float) -> None:
        a, b = self.info.input_range
        if not (lo == lo and hi == hi):
            raise ValueError("input contains NaN")
        if lo < a - 1e-4 or hi > b + 1e-4:
            hint = " (0-255 pixels? divide by 255)" if hi > 1.5 else ""
            raise ValueError(f"expected pixel values in [{a:g}, {b:g}]; got min {lo:.4g}, max {hi:.4g}{hint}")

    def _check_numpy(self, x: Any) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise TypeError(f"expected a numpy array or a torch tensor of {self._expected()}; got {type(x).__name__}")
        if x.dtype.kind != "f":
            hint = " Convert integer images with x.astype(np.float32) / 255" if x.dtype.kind in "ui" else ""
            raise TypeError(f"expected {self._expected()}; got dtype {x.dtype}.{hint}")
        self._check_shape(x.shape, "numpy array")
        if self.check_range:
            self._check_values(float(np.min(x)), float(np.max(x)))
        return np.ascontiguousarray(x, dtype=self._io_dtype)

    def _run_torch(self, x: Any) -> Dict[str, Any]:
        """torch CUDA tensor in, torch CUDA tensors out (IO binding, no host copy)."""
        import torch

        if not x.dtype.is_floating_point:
            raise TypeError(f"expected {self._expected()}; got dtype {x.dtype}. Convert with x.float() / 255")
        self._check_shape(tuple(x.shape), "torch tensor")
        if x.device.index not in (None, self.device_id):
            raise ValueError(f"the session runs on cuda:{self.device_id}; got a tensor on {x.device}")
        if self.check_range:
            lo, hi = torch.aminmax(x.detach())
            self._check_values(float(lo), float(hi))
        want = torch.float16 if self._io_dtype == np.float16 else torch.float32
        x = x.detach().to(want).contiguous()
        if self.cuda_graph:
            return self._run_buckets(x)
        binding = self.session.io_binding()
        binding.bind_input(self.info.input_name, "cuda", self.device_id, self._io_dtype, tuple(x.shape), x.data_ptr())
        outs: Dict[str, Any] = {}
        for meta in self.session.get_outputs():
            shape = _output_shape(meta, x.shape[0], self.info)
            np_type = _ORT_TO_NUMPY[meta.type]
            out = torch.empty(shape, dtype=_torch_dtype(torch, np_type), device=x.device)
            binding.bind_output(meta.name, "cuda", self.device_id, np_type, shape, out.data_ptr())
            outs[meta.name] = out
        torch.cuda.current_stream(x.device).synchronize()  # x is written before onnxruntime's stream reads it
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return outs

    def _run_buckets(self, x: Any) -> Dict[str, Any]:
        return run_in_buckets(x, self._buckets)

    # ---------------------------------------------------------------------------- images
    def preprocess(self, images: Any) -> np.ndarray:
        """Image files / arrays -> (B, C, H, W) float32 in [0, 1] at the graph's input size.

        Accepts a path, an array (H, W) or (H, W, C) (uint8 0-255 or float 0-1; C = 1, 3 or 4), or
        a list of those. Resizing is PIL bilinear; RGB <-> grayscale follows the graph's channels
        (ITU-R 601-2 luma, as PIL's ``convert("L")``); an alpha channel is dropped.
        """
        items = images if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError("expected at least one image")
        return np.stack([self._load_one(item) for item in items]).astype(np.float32)

    def predict(self, images: Any) -> Prediction:
        """:meth:`preprocess` + :meth:`run`; ``labels`` holds the class names when the file has them."""
        return self.run(self.preprocess(images))

    def _load_one(self, item: Any) -> np.ndarray:
        from PIL import Image

        c, h, w = self.info.input_size
        if isinstance(item, (str, os.PathLike)):
            with Image.open(item) as img:
                img = img.convert("L" if c == 1 else "RGB")
                arr = np.asarray(img, dtype=np.float32) / 255.0
        elif isinstance(item, np.ndarray):
            arr = _array_pixels(item)
        else:
            raise TypeError(f"expected an image path or a numpy array (H, W[, C]); got {type(item).__name__}")
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        if arr.shape[2] == 4:
            arr = arr[:, :, :3]
        if c == 1 and arr.shape[2] == 3:
            arr = (arr * np.array([0.299, 0.587, 0.114], dtype=np.float32)).sum(2, keepdims=True)
        elif c == 3 and arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        if arr.shape[2] != c:
            raise ValueError(f"cannot convert an image with {arr.shape[2]} channels to the graph's {c}")
        if arr.shape[:2] != (h, w):
            arr = np.stack(
                [np.asarray(Image.fromarray(np.ascontiguousarray(arr[:, :, k])).resize((w, h), Image.BILINEAR)) for k in range(c)],
                axis=2,
            )
        return np.clip(arr, 0.0, 1.0).transpose(2, 0, 1)  # (C, H, W)


def _array_pixels(a: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) array -> float32 in [0, 1] (uint8 / integer arrays are divided by 255)."""
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        hint = ""
        if a.ndim == 3 and a.shape[0] in (1, 3):
            hint = " (channels-first? predict takes (H, W, C) images: a.transpose(1, 2, 0); run() takes (B, C, H, W))"
        raise ValueError(f"expected an image array (H, W) or (H, W, C) with C in (1, 3, 4); got shape {a.shape}{hint}")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype.kind in "ui":
        if a.max(initial=0) > 255 or a.min(initial=0) < 0:
            raise ValueError(f"integer images must be 0-255; got range [{a.min()}, {a.max()}]")
        return a.astype(np.float32) / 255.0
    if a.dtype.kind != "f":
        raise TypeError(f"expected uint8 or float pixels; got dtype {a.dtype}")
    lo, hi = float(np.min(a)), float(np.max(a))
    if lo < -1e-4 or hi > 1 + 1e-4:
        hint = " (0-255 floats? divide by 255)" if hi > 1.5 else ""
        raise ValueError(f"float images must be in [0, 1]; got min {lo:.4g}, max {hi:.4g}{hint}")
    return a.astype(np.float32)


# ------------------------------------------------------------------------------ CUDA graphs
def run_in_buckets(x: Any, buckets: Dict[int, "_GraphBucket"]) -> Dict[str, Any]:
    """Run ``x`` (B, ...) through fixed-batch buckets: chunks of at most the largest bucket, each
    padded up to the smallest bucket that holds it; outputs sliced back and concatenated."""
    sizes = sorted(buckets)
    parts = []
    for start in range(0, x.shape[0], sizes[-1]):
        chunk = x[start : start + sizes[-1]]
        bucket = next(b for b in sizes if b >= chunk.shape[0])
        parts.append(buckets[bucket].run(chunk))
    if len(parts) == 1:
        return parts[0]
    if isinstance(x, np.ndarray):
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    import torch

    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class _GraphBucket:
    """One CUDA-graph session of a fixed batch size with static device buffers (OrtValues)."""

    def __init__(self, session: Any, batch: int, info: ModelInfo, device_id: int, device_type: str = "cuda") -> None:
        ort = _import_ort()
        self.session, self.batch, self.device_id = session, batch, device_id
        io_type = np.float16 if info.io_dtype == "fp16" else np.float32
        self.input = ort.OrtValue.ortvalue_from_shape_and_type([batch, *info.input_size], io_type, device_type, device_id)
        self.outputs: Dict[str, Any] = {}
        self.binding = session.io_binding()
        self.binding.bind_ortvalue_input(info.input_name, self.input)
        for meta in session.get_outputs():
            shape = _output_shape(meta, batch, info)
            value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), _ORT_TO_NUMPY[meta.type], device_type, device_id)
            self.binding.bind_ortvalue_output(meta.name, value)
            self.outputs[meta.name] = value
        self._torch_views: Optional[Tuple[Any, Dict[str, Any]]] = None

    def run(self, x: Any) -> Dict[str, Any]:
        n = x.shape[0]
        if isinstance(x, np.ndarray):
            padded = np.zeros((self.batch, *x.shape[1:]), dtype=x.dtype)
            padded[:n] = x
            self.input.update_inplace(padded)  # host -> the captured device buffer
            self.session.run_with_iobinding(self.binding)
            return {k: v.numpy()[:n].copy() for k, v in self.outputs.items()}
        import torch

        inp, outs = self._views(torch, x.device)
        inp[:n].copy_(x)  # device -> device into the captured buffer
        inp[n:].zero_()
        torch.cuda.current_stream(x.device).synchronize()
        self.session.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()
        return {k: v[:n].clone() for k, v in outs.items()}

    def _views(self, torch: Any, device: Any) -> Tuple[Any, Dict[str, Any]]:
        """torch tensors aliasing the static OrtValue buffers (``__cuda_array_interface__``)."""
        if self._torch_views is None:
            alias = lambda v: torch.as_tensor(_CudaArray(v), device=device)  # noqa: E731
            self._torch_views = (alias(self.input), {k: alias(v) for k, v in self.outputs.items()})
        return self._torch_views


class _CudaArray:
    """Minimal ``__cuda_array_interface__`` over an OrtValue's device buffer (zero copy)."""

    _TYPESTR = {np.dtype(np.float32): "<f4", np.dtype(np.float16): "<f2", np.dtype(np.int64): "<i8",
                np.dtype(np.int32): "<i4", np.dtype(np.float64): "<f8", np.dtype(np.bool_): "|b1"}

    def __init__(self, value: Any) -> None:
        dtype = np.dtype(_ORT_TO_NUMPY[value.data_type()])
        self.__cuda_array_interface__ = {
            "shape": tuple(value.shape()), "typestr": self._TYPESTR[dtype],
            "data": (int(value.data_ptr()), False), "version": 2, "strides": None,
        }


def _output_shape(meta: Any, batch: int, info: ModelInfo) -> Tuple[int, ...]:
    dims = list(meta.shape)
    shape = []
    for i, d in enumerate(dims):
        if isinstance(d, int) and d > 0:
            shape.append(d)
        elif i == 0:
            shape.append(int(batch))
        elif meta.name == "logits" and info.num_classes:
            shape.append(int(info.num_classes))
        elif meta.name == "scores" and info.group_elements:
            shape.append(len(info.group_elements))
        else:
            raise ValueError(f"output {meta.name!r} has shape {dims}; IO binding needs static non-batch dimensions")
    return tuple(shape)


def _torch_dtype(torch: Any, np_type: Any) -> Any:
    return {np.float32: torch.float32, np.float16: torch.float16, np.int64: torch.int64, np.int32: torch.int32,
            np.float64: torch.float64, np.bool_: torch.bool, np.uint8: torch.uint8}[np_type]


def _with_option(provider: Any, name: str, key: str, value: str) -> Any:
    if isinstance(provider, tuple) and provider[0] == name:
        return (name, {**provider[1], key: value})
    if provider == name:
        return (name, {key: value})
    return provider


# ---------------------------------------------------------------------------- diagnostics
def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "canonwrap.runtime needs onnxruntime: pip install 'canonwrap[onnx]' (CPU) or 'canonwrap[gpu]' (CUDA)"
        ) from err
    return onnxruntime


def cuda_available() -> bool:
    """True when the installed onnxruntime lists the CUDA execution provider (it may still fail to
    load its libraries; :class:`Session` checks that)."""
    try:
        return _CUDA in _import_ort().get_available_providers()
    except ImportError:
        return False


def require_cuda_provider(ort: Any = None) -> None:
    """Raise :class:`ProviderError` unless the installed onnxruntime has the CUDA provider."""
    ort = ort or _import_ort()
    available = list(ort.get_available_providers())
    if _CUDA not in available:
        raise ProviderError(
            f"device='cuda' needs onnxruntime-gpu, but the installed onnxruntime {ort.__version__} has "
            f"providers {available} (a CPU build). Install the GPU build instead of it: "
            "pip uninstall -y onnxruntime && pip install 'canonwrap[gpu]' (onnxruntime-gpu >= 1.27 "
            "needs the CUDA 13 and cuDNN 9 libraries); or use device='cpu'."
        )


def missing_cuda_libraries(text: str) -> List[str]:
    """CUDA library names (``libcudart.so.13``, ``libcudnn.so.9``, ...) mentioned in an error text."""
    return sorted(set(_CUDA_LIB.findall(text)))


def cuda_load_error(ort: Any = None) -> str:
    """Why the CUDA provider library does not load: dlopen's own message (names the missing
    library), or ``""`` when it loads."""
    import ctypes

    ort = ort or _import_ort()
    capi = Path(ort.__file__).parent / "capi"
    lib = capi / "libonnxruntime_providers_cuda.so"
    if not lib.exists():
        return f"{lib.name} is not in {capi} (this onnxruntime build has no CUDA provider)"
    try:
        shared = capi / "libonnxruntime_providers_shared.so"
        if shared.exists():
            ctypes.CDLL(str(shared), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(lib))
    except OSError as err:
        return str(err)
    return ""


def _cuda_failure_message(ort: Any, text: str) -> str:
    """Readable reason why a CUDA session failed or fell back to the CPU."""
    text = (text or "").strip()
    why = cuda_load_error(ort)
    libs = sorted(set(missing_cuda_libraries(text)) | set(missing_cuda_libraries(why)))
    if not why and not libs and "fallback to CPU EP has been explicitly disabled" in text:
        return (
            "Some nodes of the graph would run on the CPU and disable_cpu_fallback=True forbids it. "
            "Export with a static batch or use cuda_graph=True (static shapes fold the shape "
            "computations), or pass disable_cpu_fallback=False and check the placement with "
            "canonwrap.runtime.node_placement(). onnxruntime said: " + text.splitlines()[0]
        )
    parts = []
    if libs:
        parts.append(f"missing CUDA libraries: {', '.join(libs)}")
    if why:
        parts.append(f"loading the CUDA provider failed: {why}")
    if not parts and text:
        parts.append(f"onnxruntime said: {text.splitlines()[0]}")
    hint = (
        "onnxruntime-gpu >= 1.27 needs CUDA 13 (libcudart.so.13, libcublas.so.13) and cuDNN 9 "
        "(libcudnn.so.9) on LD_LIBRARY_PATH; `import torch` first or onnxruntime.preload_dlls() loads "
        "the ones from the nvidia-* pip packages."
    )
    return "; ".join(parts + [hint])


def node_placement(path: "str | os.PathLike[str]", device: str = "cuda", batch: int = 1, device_id: int = 0) -> Dict[str, Any]:
    """Where onnxruntime runs every node, from its own profiler: ``{"providers": {provider: count},
    "memcpy": number of Memcpy nodes, "nodes": [(name, op, provider), ...]}``. Runs one batch of
    zeros with CPU fallback allowed (so the placement can be inspected, not refused)."""
    import tempfile

    ort = _import_ort()
    so = ort.SessionOptions()
    so.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        so.profile_file_prefix = str(Path(tmp) / "placement")
        providers = [(_CUDA, {"device_id": str(device_id)}), _CPU] if device == "cuda" else [_CPU]
        if device == "cuda":
            require_cuda_provider(ort)
        sess = ort.InferenceSession(str(path), so, providers=providers)
        info = ModelInfo.from_session(sess)
        io_type = np.float16 if info.io_dtype == "fp16" else np.float32
        sess.run(None, {info.input_name: np.zeros((batch, *info.input_size), dtype=io_type)})
        events = json.loads(Path(sess.end_profiling()).read_text())
    nodes, counts, seen = [], {}, set()
    for ev in events:
        args = ev.get("args", {})
        if ev.get("cat") != "Node" or "provider" not in args or not ev.get("name", "").endswith("_kernel_time"):
            continue
        name = ev["name"][: -len("_kernel_time")]
        if name in seen:
            continue
        seen.add(name)
        nodes.append((name, args.get("op_name", ""), args["provider"]))
        counts[args["provider"]] = counts.get(args["provider"], 0) + 1
    memcpy = sum(1 for _, op, _ in nodes if op.startswith("Memcpy"))
    return {"providers": counts, "memcpy": memcpy, "nodes": nodes}


def predict(model: "Session | str | os.PathLike[str]", images: Any, device: str = "cpu", **kwargs: Any) -> Prediction:
    """One-shot :meth:`Session.predict` for image files/arrays (``model``: a Session or a path)."""
    sess = model if isinstance(model, Session) else Session(model, device=device, **kwargs)
    return sess.predict(images)


def load(path: "str | os.PathLike[str]", device: str = "cuda", **kwargs: Any) -> Session:
    """Shorthand for :class:`Session` (``canonwrap.runtime.load("model.onnx", device="cpu")``)."""
    return Session(path, device=device, **kwargs)


__all__ = [
    "Session", "ModelInfo", "Prediction", "ProviderError", "load", "predict", "node_placement",
    "cuda_available", "require_cuda_provider", "missing_cuda_libraries", "cuda_load_error",
    "run_in_buckets", "DEFAULT_BUCKETS",
]
