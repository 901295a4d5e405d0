"""MuVLM: vision tower + projector + a Mu encoder-decoder, image features spliced into the encoder input.

    prompt  "<image>\nWhat color is the dog?"   ->  ids  [IMG, \n, W, h, a, t, ...]
    encoder input embeddings:  [f_1 .. f_N, emb(\n), emb(W), ...]     (N = views x tokens_per_view)

Each `<image>` placeholder is replaced by its image's projected features (LLaVA's scheme, done in the
encoder, as the paper's Mu-vision model does); rows are right-padded again and the attention mask is
extended to match. The decoder and the cached generation loop are the text model's, unchanged:
`MuVLM` offers the attributes `mu.generation.generate` uses (`config`, `device`, `dtype`, `tokenizer`,
`new_cache`, `prefill`, `decode_step`), and its `prefill` does the splicing, so

    mu.generation.generate(vlm, input_ids, images=pixel_views, eos_token_id=eos, max_new_tokens=16)

runs the usual prefill + decode loop (greedy, sampling, beams, streaming).
`vlm.config` is the text model's `MuConfig`; the vision settings are `vlm.vision_config` (`VLMConfig`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from mu.config import MuConfig
from mu.errors import MuError
from mu.model.base import ModelOutput, lm_loss
from mu.model.io import CONFIG_FILE, WEIGHTS_FILE, read_config_json, write_model_dir
from mu.vision.config import PreprocessConfig, VisionTowerConfig, VLMConfig
from mu.vision.preprocess import ImageProcessor
from mu.vision.towers import build_projector, build_tower

MODEL_TYPE = "mu-vlm"
FORMAT_VERSION = 1

Images = Sequence[Tensor] | Tensor  # per image (n_views, 3, S, S), or one view each (N, 3, S, S)


class MuVLM(nn.Module):
    def __init__(self, vision_config: VLMConfig, lm: nn.Module, tower: Optional[nn.Module] = None,
                 tokenizer: Any = None):
        super().__init__()
        if lm.config.arch != "encdec":
            raise MuError("a Mu VLM needs an encoder-decoder text model (arch='encdec'); the image features go "
                          "into its encoder")
        if not 0 <= vision_config.image_token_id < lm.config.vocab_size:
            raise MuError(f"image_token_id {vision_config.image_token_id} is outside the text model's vocabulary "
                          f"(vocab_size {lm.config.vocab_size}); add {vision_config.image_token!r} to the tokenizer "
                          f"and build the text model with vocab_size >= len(tokenizer)")
        self.vision_config = vision_config
        self.lm = lm
        self.tower = tower if tower is not None else build_tower(vision_config.tower)
        self.projector = build_projector(vision_config.projector, self.tower.hidden_size, lm.config.n_embd)
        self.tokenizer = tokenizer
        self.processor = ImageProcessor(vision_config.tower, vision_config.preprocess)

    # -- what generate() needs ------------------------------------------------------------------

    @property
    def config(self) -> MuConfig:
        return self.lm.config

    @property
    def device(self) -> torch.device:
        return self.lm.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.dtype

    @property
    def image_token_id(self) -> int:
        return self.vision_config.image_token_id

    def new_cache(self, batch: int, max_len: int):
        return self.lm.new_cache(batch, max_len)

    def decode_step(self, tokens: Tensor, cache) -> Tensor:
        return self.lm.decode_step(tokens, cache)

    def greedy_step(self, tokens: Tensor, cache) -> tuple[Tensor, Tensor]:
        return self.lm.greedy_step(tokens, cache)

    def greedy_tokens(self, tokens: Tensor, cache, n: int, eos_token_id: Optional[int] = None,
                      on_token=None) -> Optional[Tensor]:
        return self.lm.greedy_tokens(tokens, cache, n, eos_token_id, on_token)

    def prefill(self, input_ids: Tensor, attention_mask: Optional[Tensor], cache, start_ids: Tensor,
                images: Optional[Images] = None) -> Tensor:
        """Splice the images into the prompt, then the text model's prefill (encode once, cross K/V once)."""
        if images is None:
            return self.lm.prefill(input_ids, attention_mask, cache, start_ids)
        embeds, mask = self.embed_inputs(input_ids, attention_mask, images)
        return self.lm.prefill(None, mask, cache, start_ids, inputs_embeds=embeds)

    def generate(self, input_ids: Tensor, images: Optional[Images] = None, **kwargs: Any) -> Tensor:
        from mu.generation import generate

        return generate(self, input_ids, images=images, **kwargs)

    # -- images -> encoder input ----------------------------------------------------------------

    def num_image_tokens(self, n_views: int = 1) -> int:
        """Encoder positions one image of `n_views` views takes (known before anything runs)."""
        return n_views * self.vision_config.tower.tokens_per_view

    def encode_images(self, images: Images) -> list[Tensor]:
        """Views -> one (n_views * tokens_per_view, n_embd) tensor of projected features per image."""
        if isinstance(images, Tensor):
            if images.dim() != 4:
                raise MuError(f"images: expected (N, 3, S, S) or a list of (n_views, 3, S, S), "
                              f"got {tuple(images.shape)}")
            images = list(images.unsqueeze(1))
        views = [v if v.dim() == 4 else v.unsqueeze(0) for v in images]
        counts = [v.shape[0] for v in views]
        pixels = torch.cat(views).to(device=self.device, dtype=self.dtype)
        feats = self.projector(self.tower(pixels))  # (total_views, tokens_per_view, n_embd)
        return [f.reshape(-1, f.shape[-1]) for f in feats.split(counts)]

    def splice(self, input_ids: Tensor, attention_mask: Optional[Tensor], image_features: Sequence[Tensor]
               ) -> tuple[Tensor, Tensor]:
        """Replace each `<image>` token (in reading order over the batch) by one image's features.

        input_ids (B, S) right-padded; returns embeddings (B, S', n_embd) and a bool mask (B, S'),
        right-padded with zero vectors, S' = the longest row after expansion.
        """
        pad, img = self.config.pad_token_id, self.image_token_id
        valid = input_ids != pad if attention_mask is None else attention_mask.bool()
        is_img = (input_ids == img) & valid
        n_placeholders = int(is_img.sum())
        if n_placeholders != len(image_features):
            raise MuError(f"the prompts hold {n_placeholders} {self.vision_config.image_token!r} placeholder(s) "
                          f"but {len(image_features)} image(s) were given; put one placeholder per image")
        text = self.lm.transformer.wte(input_ids.masked_fill(is_img | ~valid, pad))  # (B, S, n_embd)
        feats = iter(image_features)
        rows = []
        for b in range(input_ids.shape[0]):
            pieces, start = [], 0
            positions = valid[b].nonzero().squeeze(-1)
            for p in positions[is_img[b, positions]].tolist():
                pieces += [text[b, start:p][valid[b, start:p]], next(feats).to(text.dtype)]
                start = p + 1
            pieces.append(text[b, start:][valid[b, start:]])
            rows.append(torch.cat(pieces))
        width = max(r.shape[0] for r in rows)
        embeds = text.new_zeros(len(rows), width, text.shape[-1])
        mask = torch.zeros(len(rows), width, dtype=torch.bool, device=text.device)
        for b, r in enumerate(rows):
            embeds[b, :r.shape[0]] = r
            mask[b, :r.shape[0]] = True
        return embeds, mask

    def embed_inputs(self, input_ids: Tensor, attention_mask: Optional[Tensor], images: Images
                     ) -> tuple[Tensor, Tensor]:
        return self.splice(input_ids, attention_mask, self.encode_images(images))

    # -- training forward -----------------------------------------------------------------------

    def forward(self, input_ids: Tensor, images: Images, decoder_input_ids: Tensor, targets: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, decoder_attention_mask: Optional[Tensor] = None
                ) -> ModelOutput:
        embeds, mask = self.embed_inputs(input_ids, attention_mask, images)
        enc_out, enc_valid = self.lm.encode(inputs_embeds=embeds, attention_mask=mask)
        logits = self.lm.lm_head(self.lm.decode(decoder_input_ids, enc_out, enc_valid, decoder_attention_mask))
        loss = lm_loss(logits, targets, self.config.pad_token_id) if targets is not None else None
        return ModelOutput(logits=logits, loss=loss)

    # -- convenience: questions in, answers out -------------------------------------------------

    def prompt(self, question: str) -> str:
        return f"{self.vision_config.image_token}\n{question.strip()}"

    def tokenize_prompts(self, questions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Questions -> right-padded prompt ids (B, S) and mask, each with one `<image>` placeholder."""
        if self.tokenizer is None:
            raise MuError("this VLM has no tokenizer attached; load it from a directory that holds one")
        rows = [self.tokenizer(self.prompt(q), add_special_tokens=False)["input_ids"] for q in questions]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.config.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
        return ids.to(self.device), (ids != self.config.pad_token_id).to(self.device)

    @torch.inference_mode()
    def answer(self, images: Sequence[Any], questions: Sequence[str], max_new_tokens: int = 16,
               num_beams: int = 1) -> list[str]:
        """Answer one question per image (PIL images, paths or preprocessed view tensors), greedy by default."""
        if len(images) != len(questions):
            raise MuError(f"got {len(images)} image(s) but {len(questions)} question(s); give one question per image")
        views = [im if isinstance(im, Tensor) else self.processor(im) for im in images]
        ids, mask = self.tokenize_prompts(questions)
        eos = self.tokenizer.eos_token_id
        out = self.generate(ids, images=views, attention_mask=mask, max_new_tokens=max_new_tokens,
                            eos_token_id=eos, num_beams=num_beams)
        return [self.decode_answer(row) for row in out[:, 1:].tolist()]

    def timed_answer(self, image: Any, question: str, **generate: Any) -> tuple[str, float]:
        """(answer, seconds) for one question: what `mu vqa --time` and the seed script print. The time covers
        preprocessing (and loading, for a path) and generation, with the GPU synchronised."""
        import time

        t0 = time.perf_counter()
        answer = self.answer([image], [question], **generate)[0]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return answer, time.perf_counter() - t0

    def decode_answer(self, ids: Sequence[int]) -> str:
        eos = self.tokenizer.eos_token_id
        if eos in ids:
            ids = ids[:ids.index(eos)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    # -- saving ---------------------------------------------------------------------------------

    def num_parameters(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in part.parameters())
                for name, part in (("tower", self.tower), ("projector", self.projector), ("lm", self.lm))}

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write config.json (text + vision config) + model.safetensors (+ tokenizer files) atomically."""
        config = {"model_type": MODEL_TYPE, "mu_format": FORMAT_VERSION, "text": self.config.to_dict(),
                  "vision": self.vision_config.to_dict()}
        return write_model_dir(directory, self.state_dict(), config, self.tokenizer,
                               skip=("lm.lm_head.weight",))  # tied to lm.transformer.wte.weight


# ---------------------------------------------------------------------------------------------
# Building and loading


def add_image_token(tokenizer, image_token: str = "<image>") -> int:
    """Make `image_token` a special token of `tokenizer` (appended after its vocabulary) and return its id."""
    vocab = tokenizer.get_vocab()
    if image_token not in vocab:
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    return tokenizer.convert_tokens_to_ids(image_token)


def build_vlm(text: str | MuConfig | nn.Module = "tiny", tower: VisionTowerConfig | nn.Module | str | None = None,
              tokenizer: Any = None, projector: str = "mlp2x_gelu", preprocess: Optional[PreprocessConfig] = None,
              image_token: str = "<image>", weight_init: str = "paper", **text_overrides: Any) -> MuVLM:
    """A VLM from parts, each given as an object or by name (so a CLI can pass strings straight through).

    text: a preset name, a `MuConfig`, a text model directory (`mu.load_model`) or a built model.
    tower: a `VisionTowerConfig`, a built tower, "native" (the default small ViT) or a local CLIP / SigLIP
    directory (`load_hf_tower`, feature layer -2, patch tokens). tokenizer: a tokenizer, "byte" (default)
    or a tokenizer directory. The tokenizer gets `image_token`; a text model built here from a preset or
    config gets `vocab_size = len(tokenizer)` unless `vocab_size` is overridden, and `weight_init`
    ("paper" or "fan_in", see `mu.model.layers.init_linear_and_embedding`).
    """
    from mu.checkpoint import build_model, load_model
    from mu.config import PRESETS
    from mu.tokenizer import byte_tokenizer, load_tokenizer

    if isinstance(text, (str, os.PathLike)) and str(text) not in PRESETS:
        text = load_model(text)  # a directory: its own tokenizer comes along unless one is given
        if tokenizer is None:
            tokenizer = text.tokenizer
    if tokenizer is None or tokenizer == "byte":
        tokenizer = byte_tokenizer()
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    if isinstance(tower, (str, os.PathLike)):
        if str(tower) == "native":
            tower = VisionTowerConfig()
        else:
            from mu.vision.towers import load_hf_tower

            tower = load_hf_tower(tower)
    image_token_id = add_image_token(tokenizer, image_token)
    if isinstance(text, nn.Module):
        if weight_init != "paper" or text_overrides:
            raise MuError("build_vlm: weight_init and text overrides apply to a text model built here, "
                          "not to a given or loaded one")
        lm = text
    else:
        text_overrides.setdefault("vocab_size", len(tokenizer))
        lm = build_model(text, arch="encdec", weight_init=weight_init, **text_overrides)
    lm.tokenizer = tokenizer
    tower_module = tower if isinstance(tower, nn.Module) else None
    tower_config = tower_module.config if tower_module is not None else (tower or VisionTowerConfig())
    config = VLMConfig(tower=tower_config, preprocess=preprocess or PreprocessConfig(), projector=projector,
                       image_token=image_token, image_token_id=image_token_id)
    return MuVLM(config, lm, tower_module, tokenizer)


def read_vlm_config(path: Path) -> tuple[MuConfig, VLMConfig]:
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise MuError(f"{path}: missing {CONFIG_FILE} (a VLM directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    raw = read_config_json(cfg_file)
    if not isinstance(raw, dict) or raw.get("model_type") != MODEL_TYPE:
        found = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise MuError(f"{cfg_file}: model_type is {found!r}, expected {MODEL_TYPE!r} (a vision-language model "
                      f"saved by mu); text-only models load with `mu.load_model`")
    for key in ("text", "vision"):
        if not isinstance(raw.get(key), dict):
            raise MuError(f"{cfg_file}: missing the {key!r} section")
    return (MuConfig.from_dict(raw["text"], source=f"{cfg_file}: text"),
            VLMConfig.from_dict(raw["vision"], source=f"{cfg_file}: vision"))


def load_vlm(path: str | os.PathLike, device: Optional[str | torch.device] = None,
             dtype: Optional[str | torch.dtype] = None) -> MuVLM:
    """Load a VLM directory written by `MuVLM.save_pretrained` (or `train_vqa`), in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mu.checkpoint import build_model, parse_dtype
    from mu.tokenizer import has_tokenizer_files, load_tokenizer

    path = Path(path)
    if not path.is_dir():
        raise MuError(f"no model directory at {str(path)!r}: expected a directory written by `train_vqa` or "
                      f"`MuVLM.save_pretrained` (config.json + model.safetensors)")
    text_config, vision_config = read_vlm_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise MuError(f"{path}: missing {WEIGHTS_FILE}")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise MuError(f"{weights}: not a readable safetensors file ({e})") from None
    tokenizer = load_tokenizer(path) if has_tokenizer_files(path) else None
    model = MuVLM(vision_config, build_model(text_config), tokenizer=tokenizer)
    state["lm.lm_head.weight"] = state.get("lm.transformer.wte.weight")
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as e:
        raise MuError(f"{weights}: weights do not match {path / CONFIG_FILE}: {e}") from None
    model.lm.tie_weights()
    model.lm.tokenizer = tokenizer
    model.to(device=device, dtype=parse_dtype(dtype))
    return model.eval()
