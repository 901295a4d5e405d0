"""mu: small encoder-decoder language models (the Mu architecture) and their decoder-only twins.

    import mu
    model = mu.build_model("small", arch="encdec")
    model = mu.load_model("runs/squad/final")      # or the paper's model.pt
    out = model.generate(ids, max_new_tokens=32)

Heavy submodules (training, vision, benchmarks) are imported only when used. `mu.onnx` runs exports of
`mu export onnx` with onnxruntime; with mu imported, transformers' Auto classes load mu's model
directories (`mu.hf`, registered when transformers' Auto modules are first imported).
"""

from mu import hf as _hf
from mu.config import MuConfig
from mu.errors import MuError

_hf.install()

__version__ = "0.1.0"

_LAZY = {
    "build_model": "mu.model.io",
    "load_model": "mu.model.io",
    "convert_reference": "mu.model.io",
    "load_tokenizer": "mu.tokenizer",
    "byte_tokenizer": "mu.tokenizer",
    "train_tokenizer": "mu.tokenizer",
    "generate": "mu.generation",
    "MuEncoderDecoder": "mu.model.encoder_decoder",
    "MuDecoderOnly": "mu.model.decoder_only",
    "KVCache": "mu.model.cache",
}

__all__ = ["MuConfig", "MuError", "__version__", *_LAZY]


_SUBMODULES = ("onnx",)  # `import mu; mu.onnx.load(...)`


def __getattr__(name: str):
    if name in _LAZY or name in _SUBMODULES:
        import importlib

        if name in _SUBMODULES:
            return importlib.import_module(f"mu.{name}")
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mu' has no attribute {name!r}")
