"""`mu export onnx`: a model directory -> ONNX graphs with explicit caches (+ optional int8), run by `mu.onnx`.

    encoder-decoder    encoder.onnx (+ every decoder layer's cross-attention K/V) and decoder.onnx (one step)
    decoder-only       decoder.onnx (past key/values in and out; the prompt is the first step)
    vision-language    vision.onnx (tower + projector) and embed.onnx, encoder.onnx taking inputs_embeds,
                       decoder.onnx

The graphs are traced by `torch.onnx.export(..., dynamo=True)` (torch.export, then onnxscript), with
every batch and length dimension dynamic (`torch.export.Dim.AUTO`). The TorchScript exporter
(`dynamo=False`) cannot export `aten::rms_norm`, which the model's RMSNorm uses, at any opset it
supports, so it is not used. `mu_onnx.json` describes the export (config, graphs, their input and
output names, quantisation); the tokenizer is saved next to the graphs.

`quantize="int8"` runs onnxruntime's dynamic quantisation on every graph: int8 weights with per-channel
scales for the matrix multiplications with a constant weight (the linear layers and the tied
`lm_head`), activations quantised per call; attention's activation-by-activation products stay fp32.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from mu.atomic import atomic_directory
from mu.errors import MuError
from mu.export.onnx_graphs import DecoderStepGraph, EmbedGraph, EncoderGraph, VisionGraph
from mu.model.base import MuModel
from mu.model.io import CONFIG_FILE, load_model
from mu.vision.model import MODEL_TYPE as VLM_TYPE, load_vlm

MANIFEST = "mu_onnx.json"
FORMAT = "mu-onnx"
FORMAT_VERSION = 1
DEFAULT_OPSET = 18
MIN_OPSET = 18  # the dynamo exporter's lowest
QUANTIZATIONS = ("int8",)


@dataclass
class GraphSpec:
    name: str  # file stem: encoder, decoder, vision, embed
    module: nn.Module
    args: tuple  # example inputs for tracing (every dynamic dimension >= 2, so none is specialised)
    inputs: list[str]
    outputs: list[str]
    dynamic: tuple  # dynamic_shapes, in the structure of the forward's signature (`*caches` nested)

    def to_dict(self) -> dict[str, Any]:
        return {"file": f"{self.name}.onnx", "inputs": self.inputs, "outputs": self.outputs}


def cache_names(prefix: str, n_layer: int) -> list[str]:
    """`{prefix}_key.{i}`, `{prefix}_value.{i}` for every layer, in the order the graphs take them."""
    return [f"{prefix}_{kv}.{i}" for i in range(n_layer) for kv in ("key", "value")]


def load_exportable(source: Any) -> nn.Module:
    """A text model (`MuEncoderDecoder` / `MuDecoderOnly`) or a `MuVLM`, from a directory, a paper .pt or
    an object, checked for what the exporter supports."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        cfg = path / CONFIG_FILE
        model_type = "mu"
        if path.is_dir() and cfg.is_file():
            try:
                model_type = json.loads(cfg.read_text()).get("model_type", "mu")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                raise MuError(f"{cfg}: not a JSON object of model settings") from None
        if model_type == VLM_TYPE:
            model = load_vlm(path)
        elif model_type == "mu":
            model = load_model(path)
        else:
            raise MuError(f"{cfg}: model_type {model_type!r} is not exportable; `mu export onnx` takes a mu model "
                          f"directory (model_type 'mu' or {VLM_TYPE!r}) or the paper's .pt checkpoint")
    else:
        model = source
    text = model.lm if hasattr(model, "lm") else model
    if not isinstance(text, MuModel):
        raise MuError(f"cannot export a {type(model).__name__}: expected a mu model (MuEncoderDecoder, "
                      "MuDecoderOnly or MuVLM)")
    if getattr(text, "quantization", None):
        raise MuError(f"cannot export a {text.quantization}-quantized model: export the float model and pass "
                      "--quantize int8 (onnxruntime quantizes the exported graphs)")
    adapters = sorted({type(m).__name__ for m in text.modules()
                       if isinstance(getattr(m, "base_layer", None), nn.Linear)})
    if adapters:
        raise MuError(f"cannot export a model with adapters ({', '.join(adapters)}): merge them into the weights "
                      "first (peft's merge_and_unload()) and save the merged model")
    return model


def graph_specs(model: nn.Module) -> list[GraphSpec]:
    """The graphs of `model` with example inputs and names (see the module docstring)."""
    vlm = model if hasattr(model, "lm") else None
    text = model.lm if vlm is not None else model
    c = text.config
    n = c.n_decoder_layer
    A = torch.export.Dim.AUTO
    B, S, P, T = 2, 5, 4, 3  # example sizes; all >= 2 so torch.export keeps them symbolic
    ids = torch.randint(4, c.vocab_size, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, -1] = 0
    kv = (B, c.n_kv_head, P, c.head_dim)
    past = tuple(torch.randn(kv) for _ in range(2 * n))
    step_args = (torch.randint(4, c.vocab_size, (B, T)), torch.arange(P, P + T).expand(B, T).contiguous(),
                 torch.ones(B, P + T, dtype=torch.long))
    step_inputs = ["input_ids", "position_ids", "attention_mask"] + cache_names("past", n)
    step_outputs = ["logits"] + cache_names("present", n)
    seq, cache = {0: A, 1: A}, {0: A, 2: A}
    specs = []
    if vlm is not None:
        tower = vlm.vision_config.tower
        pixels = torch.randn(2, 3, tower.image_size, tower.image_size)
        specs.append(GraphSpec("vision", VisionGraph(vlm), (pixels,), ["pixel_values"], ["image_features"],
                               ({0: A},)))
        specs.append(GraphSpec("embed", EmbedGraph(text), (ids,), ["input_ids"], ["inputs_embeds"], (seq,)))
    if c.arch == "encdec":
        encoder = EncoderGraph(text, embeds_input=vlm is not None)
        enc_in = torch.randn(B, S, c.n_embd) if vlm is not None else ids
        specs.append(GraphSpec("encoder", encoder, (enc_in, mask),
                               ["inputs_embeds" if vlm is not None else "input_ids", "attention_mask"],
                               cache_names("cross", n), (seq, seq)))
        with torch.no_grad():
            cross = encoder(enc_in, mask)
        specs.append(GraphSpec("decoder", DecoderStepGraph(text), (*step_args, *past, mask, *cross),
                               step_inputs + ["encoder_attention_mask"] + cache_names("cross", n), step_outputs,
                               (seq, seq, seq, (cache,) * (2 * n) + (seq,) + (cache,) * (2 * n))))
    else:
        specs.append(GraphSpec("decoder", DecoderStepGraph(text), (*step_args, *past), step_inputs, step_outputs,
                               (seq, seq, seq, (cache,) * (2 * n))))
    return specs


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs optional-dependency notices and warns about internals; keep the CLI output clean."""
    names = ("torch.onnx", "torch.onnx._internal.exporter._registration", "onnxscript", "root")
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def export_graph(spec: GraphSpec, path: Path, opset: int) -> None:
    spec.module.eval()
    try:
        with torch.no_grad(), _quiet_exporter():
            torch.onnx.export(spec.module, spec.args, str(path), input_names=spec.inputs, output_names=spec.outputs,
                              dynamic_shapes=spec.dynamic, opset_version=opset, dynamo=True, external_data=True,
                              verbose=False)
    except Exception as e:  # the exporter raises its own error types from several layers
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise MuError(f"could not export the {spec.name} graph to ONNX (opset {opset}): {first}") from e


def check_loads(path: Path, opset: int) -> None:
    """onnxruntime must be able to open the graph (onnx writes newer opsets than onnxruntime runs: with
    onnxruntime 1.32, opsets 18-25 run and 28 does not)."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise MuError(f"--opset {opset}: onnxruntime {ort.__version__} cannot run the exported {path.name} "
                      f"({first[:200]}); choose a lower --opset (default {DEFAULT_OPSET})") from None


def quantize_graph(src: Path, dst: Path) -> None:
    """onnxruntime dynamic int8 quantisation: per-channel int8 weights of constant-weight MatMuls.

    Weights use 7 bits (`reduce_range`): on CPUs without VNNI (AVX2, AVX-512 without VNNI) onnxruntime's
    u8 x s8 kernel adds pairs of products in 16 bits, which saturates with full-range weights (a tiny
    model's logits moved 16% against fp32 on an AVX2 machine, 7-bit weights keep it under 10%); the file
    may be deployed on any CPU, so it is quantised for the one that saturates."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    large = sum(f.stat().st_size for f in src.parent.glob(f"{src.name}*")) > 1_500_000_000
    with _quiet_exporter():
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                         extra_options={"MatMulConstBOnly": True}, use_external_data_format=large)


def export_onnx(source: Any, out: str | os.PathLike, quantize: Optional[str] = None, opset: int = DEFAULT_OPSET
                ) -> Path:
    """Export a model (directory, paper .pt or object) to `out` (written atomically); returns `out`.

    With `quantize="int8"` the fp32 graphs go to a temporary directory first and `out` gets their
    int8 versions (`quantize_export`).
    """
    import onnx

    if quantize is not None and quantize not in QUANTIZATIONS:
        raise MuError(f"--quantize {quantize!r} is not supported; expected one of {QUANTIZATIONS}")
    max_opset = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= max_opset:
        raise MuError(f"--opset {opset} is not supported: the exporter writes opsets {MIN_OPSET}..{max_opset}")
    model = load_exportable(source)
    model = model.float().eval()  # onnxruntime's CPU kernels are fp32 (a bf16 model is widened)
    text = model.lm if hasattr(model, "lm") else model
    specs = graph_specs(model)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "arch": text.config.arch,
        "config": text.config.to_dict(),
        "vision": model.vision_config.to_dict() if hasattr(model, "vision_config") else None,
        "graphs": {s.name: s.to_dict() for s in specs}, "quantization": None, "opset": opset,
        "exported_with": {"torch": torch.__version__, "onnx": onnx.__version__, **_ort_version()},
        "source": str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__,
    }
    fp32_out = Path(out) if quantize is None else Path(out).with_name(f".{Path(out).name}.fp32-{os.getpid()}")
    try:
        with atomic_directory(fp32_out) as tmp:
            for spec in specs:
                export_graph(spec, tmp / f"{spec.name}.onnx", opset)
                if opset != DEFAULT_OPSET:
                    check_loads(tmp / f"{spec.name}.onnx", opset)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            tokenizer = getattr(model, "tokenizer", None)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        if quantize is not None:
            quantize_export(fp32_out, out)
    finally:
        if quantize is not None:
            shutil.rmtree(fp32_out, ignore_errors=True)
    return Path(out)


def quantize_export(src: str | os.PathLike, out: str | os.PathLike, mode: str = "int8") -> Path:
    """Quantize every graph of the fp32 export `src` into `out` (atomically), tokenizer and manifest along."""
    src = Path(src)
    manifest = read_manifest(src)
    if mode not in QUANTIZATIONS:
        raise MuError(f"quantization {mode!r} is not supported; expected one of {QUANTIZATIONS}")
    if manifest.get("quantization"):
        raise MuError(f"{src}: already quantized ({manifest['quantization']}); quantize the fp32 export")
    with atomic_directory(out) as tmp:
        for graph in manifest["graphs"].values():
            quantize_graph(src / graph["file"], tmp / graph["file"])
        for f in src.iterdir():
            if f.is_file() and not f.name.startswith(tuple(g["file"] for g in manifest["graphs"].values())):
                shutil.copy2(f, tmp / f.name)  # tokenizer files
        (tmp / MANIFEST).write_text(json.dumps({**manifest, "quantization": mode}, indent=2) + "\n")
    return Path(out)


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        hint = (" (that is a PyTorch model directory: export it first with `mu export onnx --model DIR --out OUT`)"
                if (directory / "config.json").is_file() else "")
        raise MuError(f"{directory}: no {MANIFEST}; expected a directory written by `mu export onnx`{hint}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MuError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise MuError(f"{path}: not a mu ONNX export (expected \"format\": {FORMAT!r})")
    return manifest


def _ort_version() -> dict[str, str]:
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__}

