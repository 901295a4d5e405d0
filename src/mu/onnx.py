"""Run a directory written by `mu export onnx` with onnxruntime, through mu's own generation loop.

    import mu.onnx
    model = mu.onnx.load("exported/")           # fp32 or int8 graphs, text model or VLM
    out = model.generate(ids, max_new_tokens=32, eos_token_id=tok.eos_token_id)

`OnnxModel` offers what `mu.generation.generate` uses (`config`, `tokenizer`, `device`, `new_cache`,
`prefill`, `decode_step`), so greedy decoding, sampling (temperature / top-k / top-p), beam search,
streaming, stopping and batching with padding are the PyTorch path's code, not a second copy; only the
two calls into the graphs differ:

    prefill       encoder-decoder: encoder.onnx once (cross-attention K/V of every decoder layer), then
                  the start token through decoder.onnx; decoder-only: the prompt through decoder.onnx
    decode_step   decoder.onnx on the new token(s), the self-attention cache in and grown out

`OnnxCache` mirrors `mu.model.cache.KVCache`: which keys are real tokens (`valid`, passed to the graphs
as `attention_mask`), each row's next RoPE position, and the K/V arrays of every layer. The cache grows
by the graph's own concatenation, so `max_len` is only checked, never preallocated. Padding follows the
PyTorch path: pad tokens are masked as keys, decoder-only prompts are left-aligned with each row's
positions starting at its first real token.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from mu.config import MuConfig
from mu.errors import MuError
from mu.export.onnx_export import MANIFEST, cache_names, read_manifest
from mu.generation import generate
from mu.tokenizer import has_tokenizer_files, load_tokenizer
from mu.vision.config import VLMConfig
from mu.vision.model import MuVLM


class OnnxCache:
    """Generation state for the ONNX graphs (see the module docstring); rows can be reordered (beams)."""

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, head_dim: int, max_len: int):
        empty = np.zeros((batch, n_kv_head, 0, head_dim), dtype=np.float32)
        self.kv: list[np.ndarray] = [empty] * (2 * n_layer)  # past_key.0, past_value.0, past_key.1, ...
        self.valid = torch.zeros(batch, 0, dtype=torch.bool)  # (B, length): key may be attended
        self.positions = torch.zeros(batch, dtype=torch.long)  # next RoPE position per row
        self.max_len = max_len
        self.cross: Optional[list[np.ndarray]] = None  # encoder-decoder: cross_key.0, cross_value.0, ...
        self.cross_valid: Optional[np.ndarray] = None  # (B, S) int64
        self.static = self.compiled = False  # set by generate(compile=True), which is PyTorch-only

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def reorder(self, index: Tensor) -> None:
        """Select/reorder batch rows (beam search)."""
        idx = index.cpu().numpy()
        self.kv = [a[idx] for a in self.kv]
        self.valid = self.valid.index_select(0, index.cpu())
        self.positions = self.positions.index_select(0, index.cpu())
        if self.cross is not None:
            self.cross = [a[idx] for a in self.cross]
            self.cross_valid = self.cross_valid[idx]


class OnnxModel:
    """An exported text model (or, as `OnnxVLM`, a vision-language model) behind onnxruntime sessions."""

    training = False

    def __init__(self, directory: Path, manifest: dict[str, Any], tokenizer: Any = None,
                 threads: Optional[int] = None, providers: Optional[Sequence[str]] = None):
        import onnxruntime as ort

        self.directory = directory
        self.manifest = manifest
        self.config = MuConfig.from_dict(manifest["config"], source=f"{directory / MANIFEST}: config")
        self.quantization = manifest.get("quantization")
        self.tokenizer = tokenizer
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only
        self.sessions = {}
        for name, graph in manifest["graphs"].items():
            path = directory / graph["file"]
            if not path.is_file():
                raise MuError(f"{directory}: missing {graph['file']} (listed in {MANIFEST}); export again")
            self.sessions[name] = ort.InferenceSession(str(path), options,
                                                       providers=list(providers or ["CPUExecutionProvider"]))
        self.n_layer = self.config.n_decoder_layer
        self._past, self._present = cache_names("past", self.n_layer), cache_names("present", self.n_layer)
        self._cross = cache_names("cross", self.n_layer)

    # -- what mu.generation.generate uses --------------------------------------------------------

    device = torch.device("cpu")  # inputs and outputs are host tensors whatever the provider
    dtype = torch.float32

    def eval(self) -> "OnnxModel":
        return self

    def train(self, mode: bool = True) -> "OnnxModel":
        if mode:
            raise MuError("an ONNX model is inference-only")
        return self

    def new_cache(self, batch: int, max_len: int) -> OnnxCache:
        c = self.config
        return OnnxCache(self.n_layer, batch, c.n_kv_head, c.head_dim, max_len)

    def generate(self, input_ids: Tensor | Sequence[int], **kwargs: Any) -> Tensor:
        """`mu.generation.generate` on the ONNX graphs (same options, same outputs as the PyTorch model)."""
        if kwargs.get("compile"):
            raise MuError("compile=True is an option of the PyTorch backend (torch.compile); onnxruntime runs "
                          "the exported graphs as they are")
        return generate(self, input_ids, **kwargs)

    def prefill(self, input_ids: Optional[Tensor], attention_mask: Optional[Tensor], cache: OnnxCache,
                start_ids: Optional[Tensor] = None, inputs_embeds: Optional[Tensor] = None) -> Tensor:
        if self.config.arch == "encdec":
            self.encode(input_ids, attention_mask, cache, inputs_embeds)
            return self.decode_step(start_ids, cache)
        pad = self.config.pad_token_id
        valid = input_ids != pad if attention_mask is None else attention_mask.bool()
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # each row from its first real token
        logits = self._step(input_ids, positions, valid, cache)
        cache.positions = valid.sum(-1)
        return logits

    def decode_step(self, tokens: Tensor, cache: OnnxCache) -> Tensor:
        """New tokens (B, T) through decoder.onnx, reading and growing `cache` -> last logits (B, vocab_size)."""
        if cache.static:
            raise MuError("compile=True is an option of the PyTorch backend")
        T = tokens.shape[1]
        positions = cache.positions[:, None] + torch.arange(T)
        logits = self._step(tokens, positions, tokens != self.config.pad_token_id, cache)
        cache.positions = cache.positions + T
        return logits

    # -- the graphs ------------------------------------------------------------------------------

    def encode(self, input_ids: Optional[Tensor], attention_mask: Optional[Tensor], cache: OnnxCache,
               inputs_embeds: Optional[Tensor] = None) -> None:
        """Run encoder.onnx once and keep every decoder layer's cross-attention K/V in `cache`."""
        if inputs_embeds is None:
            valid = input_ids != self.config.pad_token_id if attention_mask is None else attention_mask.bool()
        else:
            valid = (torch.ones(inputs_embeds.shape[:2], dtype=torch.bool) if attention_mask is None
                     else attention_mask.bool())
        feeds = {"attention_mask": _np(valid.long())}
        if "inputs_embeds" in self.manifest["graphs"]["encoder"]["inputs"]:
            if inputs_embeds is None:
                inputs_embeds = self.embed(input_ids)
            feeds["inputs_embeds"] = _np(inputs_embeds.float())
        else:
            feeds["input_ids"] = _np(input_ids.long())
        cache.cross = self.sessions["encoder"].run(self._cross, feeds)
        cache.cross_valid = feeds["attention_mask"]

    def _step(self, tokens: Tensor, positions: Tensor, valid: Tensor, cache: OnnxCache) -> Tensor:
        end = cache.length + tokens.shape[1]
        if end > cache.max_len:
            raise RuntimeError(f"KV cache overflow: {end} positions > max_len {cache.max_len}")
        cache.valid = torch.cat([cache.valid, valid.cpu()], dim=1)
        feeds = {"input_ids": _np(tokens.long()), "position_ids": _np(positions.long()),
                 "attention_mask": _np(cache.valid.long()), **dict(zip(self._past, cache.kv))}
        if cache.cross is not None:
            feeds["encoder_attention_mask"] = cache.cross_valid
            feeds.update(zip(self._cross, cache.cross))
        logits, *cache.kv = self.sessions["decoder"].run(["logits", *self._present], feeds)
        return torch.from_numpy(logits)


class OnnxVLM(OnnxModel):
    """An exported `MuVLM`: vision.onnx and embed.onnx build the encoder's `inputs_embeds` with the same
    splicing code as `MuVLM` (one `<image>` placeholder per image)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.vision_config = VLMConfig.from_dict(self.manifest["vision"], source=f"{self.directory / MANIFEST}: vision")
        self.lm = SimpleNamespace(transformer=SimpleNamespace(wte=self.embed))  # what MuVLM.splice reads

    @property
    def image_token_id(self) -> int:
        return self.vision_config.image_token_id

    def embed(self, input_ids: Tensor) -> Tensor:
        return torch.from_numpy(self.sessions["embed"].run(["inputs_embeds"], {"input_ids": _np(input_ids.long())})[0])

    def encode_images(self, images: Any) -> list[Tensor]:
        """Views -> one (n_views * tokens_per_view, n_embd) tensor per image (as `MuVLM.encode_images`)."""
        if isinstance(images, Tensor):
            images = list(images.unsqueeze(1))
        views = [v if v.dim() == 4 else v.unsqueeze(0) for v in images]
        counts = [v.shape[0] for v in views]
        feats = self.sessions["vision"].run(["image_features"], {"pixel_values": _np(torch.cat(views).float())})[0]
        return [f.reshape(-1, f.shape[-1]) for f in torch.from_numpy(feats).split(counts)]

    def prefill(self, input_ids: Tensor, attention_mask: Optional[Tensor], cache: OnnxCache,
                start_ids: Optional[Tensor] = None, images: Any = None) -> Tensor:
        if images is None:
            return super().prefill(input_ids, attention_mask, cache, start_ids)
        embeds, mask = self.splice(input_ids, attention_mask, self.encode_images(images))
        return super().prefill(None, mask, cache, start_ids, inputs_embeds=embeds)

    def generate(self, input_ids: Tensor, images: Any = None, **kwargs: Any) -> Tensor:
        return super().generate(input_ids, images=images, **kwargs)

    splice = MuVLM.splice  # the same code as the PyTorch VLM: it reads config, image_token_id, lm.transformer.wte


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def load(directory: str | os.PathLike, tokenizer: Any = None, threads: Optional[int] = None,
         providers: Optional[Sequence[str]] = None) -> OnnxModel:
    """Open an exported directory with onnxruntime; the tokenizer saved with it is attached (or pass one).

    threads: onnxruntime's intra-op threads (default: its own choice, one per physical core).
    providers: onnxruntime execution providers (default CPU).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if tokenizer is None:
        if has_tokenizer_files(directory):
            tokenizer = load_tokenizer(directory)
    cls = OnnxVLM if manifest.get("vision") else OnnxModel
    return cls(directory, manifest, tokenizer, threads, providers)
