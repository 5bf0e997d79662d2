"""TorchScript and ONNX exports of a published model, so it loads without this package.

`publish_model` writes them beside `model.pt` (before `metadata.json`, which records their
sha256 like model.pt's); `export_model` makes them, and proves each one before it is kept:
the export and the eager network run the same probe batch, at another batch size than the
one traced (so a batch size frozen into the graph would show), and must agree within
`TOLERANCE` (relative to the logits' scale when it exceeds 1). A format that fails is left
out with its reason in the metadata: an export problem never costs a trained model.

- TorchScript by `torch.jit.trace`: the zoo's networks have no data-dependent control flow,
  so the trace runs the very same operators (measured: identical logits).
- ONNX by `torch.onnx.export(dynamo=False)`, the TorchScript-based exporter, opset 17,
  batch axis dynamic. It is deprecated in favour of the torch.export-based one, which also
  works here but needs onnxscript and took 5.3 s instead of 0.6 s for brainnet at 160 px on
  this 2-core machine; torch is pinned, and the tests fail if a torch bump removes it.

Both files carry the input/output contract (`interface`) inside them too: ONNX as model
metadata (`custom_metadata_map["brainmri"]` in ONNX Runtime), TorchScript as the extra file
`brainmri.json`. Loading: `load_torchscript`, `OnnxNetwork` (callers check sha256 first).
`preprocess_record`, the input half of that contract, which every checkpoint keeps too, is
here: checkpoints.py imports this module, never the reverse.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import warnings

import numpy as np
import torch

from ..data.transforms import HI_PCT, LO_PCT, MEAN, STD

TORCHSCRIPT_FILE = "model.torchscript.pt"
ONNX_FILE = "model.onnx"
EXPORT_FILES = {"torchscript": TORCHSCRIPT_FILE, "onnx": ONNX_FILE}
INPUT, OUTPUT = "input", "logits"
OPSET = 17
TOLERANCE = {"torchscript": 1e-4, "onnx": 1e-3}  # max |logit difference| vs eager, per unit of scale
CONTRACT_KEY = "brainmri"  # ONNX metadata key; TorchScript extra file CONTRACT_KEY + ".json"
TRACE_BATCH, PROBE_BATCH = 2, 3


def preprocess_record(image_size: int) -> dict:
    """What a checkpoint says about its input (data.transforms' deterministic preprocess),
    exactly enough to reproduce it without this package (the exports' users need it)."""
    s = image_size
    return {"image_size": s, "mean": MEAN, "std": STD,
            "decode": f"8-bit greyscale (PIL convert('L'); 16/32-bit images scaled by their own "
                      f"min-max); JPEGs decoded at the smallest DCT scale still >= {s} px a side "
                      f"(PIL draft)",
            "fit": f"longest side resized to {s} px (PIL bilinear, reducing_gap 2.0, other side "
                   f"rounded), centred on a black {s}x{s} canvas at "
                   f"offset floor(({s} - side) / 2)",
            "intensity": f"percentile {LO_PCT}-{HI_PCT} to 0-255: u8 = clip((x - p{LO_PCT}) * 255 / "
                         f"(p{HI_PCT} - p{LO_PCT}), 0, 255) truncated to uint8, unchanged when "
                         f"p{HI_PCT} - p{LO_PCT} < 1 (numpy linear percentiles)",
            "to_input": f"float32 (u8 / 255 - {MEAN}) / {STD}, shape [N, 1, {s}, {s}] (NCHW)"}


def interface(state: dict) -> dict:
    """What a user without this package needs: the input tensor, the output, the classes and
    the preprocessing that makes the input (the checkpoint's `preprocess` record)."""
    pre = state.get("preprocess") or preprocess_record(int(state["config"]["image_size"]))
    s, classes = int(pre["image_size"]), list(state["classes"])
    return {
        "input": {"name": INPUT, "dtype": "float32", "shape": ["batch", 1, s, s],
                  "layout": "NCHW, one grey channel",
                  "values": f"(u8 / 255 - {pre['mean']}) / {pre['std']}, u8 = the image after "
                            "`preprocess` (decode, fit, intensity)"},
        "output": {"name": OUTPUT, "dtype": "float32", "shape": ["batch", len(classes)],
                   "values": "logits in `classes` order; probabilities = softmax(logits / T), "
                             "T from calibration.json beside the model if present, else 1"},
        "classes": classes,
        "preprocess": pre,
    }


@contextlib.contextmanager
def _chosen_formats():
    """Silences torch's notices that TorchScript (torch.jit.*, a FutureWarning in torch 2.14) and
    the TorchScript-based ONNX exporter are deprecated: formats chosen knowingly (see the
    module docstring), said once in docs/guide/export.md rather than at every publish and load. Any
    other warning (a TracerWarning, say) still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export",
                                category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"The feature will be removed", category=DeprecationWarning)
        yield


def export_torchscript(model: torch.nn.Module, example: torch.Tensor, contract: dict) -> bytes:
    buf = io.BytesIO()
    with torch.no_grad(), _chosen_formats():
        traced = torch.jit.trace(model, example, check_trace=False)  # checked by export_model
        torch.jit.save(traced, buf, _extra_files={CONTRACT_KEY + ".json": json.dumps(contract)})
    return buf.getvalue()


def export_onnx(model: torch.nn.Module, example: torch.Tensor, contract: dict) -> bytes:
    import onnx

    buf = io.BytesIO()
    with _chosen_formats():
        torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=OPSET,
                          input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = CONTRACT_KEY, json.dumps(contract)
    return proto.SerializeToString()


def load_torchscript(data: bytes, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """A TorchScript export's bytes -> module in eval mode. TorchScript runs its own code, not
    arbitrary Python; still, load exports only from storage you control (sha256 checked by
    the caller against metadata.json)."""
    with _chosen_formats():
        return torch.jit.load(io.BytesIO(data), map_location=device).eval()


class OnnxNetwork:
    """An ONNX Runtime session (CPU provider) called like the eager module on a float CPU
    tensor [N, 1, S, S], returning logits as a tensor: forward_logits and the rest of the
    inference code do not care which runtime they hold. `threads` = intra-op threads (ONNX
    Runtime ignores OMP_NUM_THREADS, through which Ray gives an actor its CPUs)."""

    def __init__(self, data: bytes, threads: int = 1):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = max(1, threads), 1
        opts.log_severity_level = 3  # errors only: its warnings are about graph rewrites
        self.session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(x.detach().cpu().numpy()))

    def contract(self) -> dict:
        return json.loads(self.session.get_modelmeta().custom_metadata_map[CONTRACT_KEY])


def _probe(image_size: int, n: int, seed: int) -> torch.Tensor:
    """A fixed pseudo-random input on the scale of normalised images (about N(0, 1))."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, image_size, image_size, generator=g)


def _runner(kind: str, blob: bytes):
    if kind == "torchscript":
        return load_torchscript(blob)
    return OnnxNetwork(blob, threads=torch.get_num_threads())


def export_model(state: dict, model: torch.nn.Module) -> tuple[dict[str, bytes], dict[str, dict]]:
    """(file name -> bytes, kind -> record) for every format that exported and agreed with
    the eager `model` (eval mode) on a probe batch; a failed kind's record holds its `error`.
    A record: file, sha256, bytes, how it was made, max_abs_diff on the probe, tolerance."""
    contract = interface(state)
    size = contract["input"]["shape"][-1]
    example, probe = _probe(size, TRACE_BATCH, 0), _probe(size, PROBE_BATCH, 1)
    with torch.no_grad():
        expected = model(probe).numpy()
    makers = {"torchscript": (export_torchscript, {"method": "torch.jit.trace",
                                                   "torch": str(torch.__version__)}),
              "onnx": (export_onnx, {"method": "torch.onnx.export (TorchScript-based, dynamo=False)",
                                     "opset": OPSET, "torch": str(torch.__version__)})}
    files, records = {}, {}
    for kind, (make, how) in makers.items():
        try:
            blob = make(model, example, contract)
            with torch.no_grad():
                got = _runner(kind, blob)(probe).numpy()
        except Exception as e:  # recorded, not raised: publishing goes on without this format
            first = (str(e).splitlines() or [""])[0][:300]
            records[kind] = {"error": f"{type(e).__name__}: {first}"}
            continue
        # the shape first: a wrong one may not broadcast, and must cost only this format
        if got.shape != expected.shape:
            records[kind] = {"error": f"export disagrees with the eager network: shape {got.shape} "
                                      f"vs {expected.shape}"}
            continue
        diff = float(np.abs(got - expected).max())
        limit = TOLERANCE[kind] * max(1.0, float(np.abs(expected).max()))
        if not diff <= limit:
            records[kind] = {"error": f"export disagrees with the eager network: max |diff| "
                                      f"{diff:.3g} > {limit:.3g}"}
            continue
        files[EXPORT_FILES[kind]] = blob
        records[kind] = {"file": EXPORT_FILES[kind], "sha256": hashlib.sha256(blob).hexdigest(),
                         "bytes": len(blob), **how, "max_abs_diff": diff, "tolerance": limit}
        if kind == "onnx":
            import onnxruntime

            records[kind]["onnxruntime"] = onnxruntime.__version__  # what verified it
    return files, records
