"""`mu export hf`: a Hugging Face directory that loads with `trust_remote_code=True` where mu is not installed.

    OUT/config.json              mu's fields + auto_map (+ custom_pipelines for text2text-generation)
    OUT/model.safetensors        the model's weights, copied byte for byte
    OUT/generation_config.json   decoder start / pad / EOS ids from the tokenizer
    OUT/configuration_mu.py, modeling_mu.py, pipeline_mu.py   the classes (they import only torch and transformers)
    OUT/tokenizer files, README.md (model card)

The model card states what the model directory records: parameters from the weights; training data
and validation scores from the `train_config.json` / `result.json` that `mu train` writes beside (or
above) the model directory; test scores from `mu eval --out` files passed with `--eval`. Whatever is
not recorded is said to be "not recorded".
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

from mu.atomic import atomic_directory
from mu.errors import MuError
from mu.model.io import CONFIG_FILE, WEIGHTS_FILE, load_model

HERE = Path(__file__).resolve().parent
CODE_FILES = ("configuration_mu.py", "modeling_mu.py", "pipeline_mu.py")
MARKER = "modeling_mu.py"  # what marks a directory as an earlier `mu export hf` output
README = "README.md"
NOT_RECORDED = "not recorded"


def export_hf(model_dir: str | os.PathLike, out: str | os.PathLike,
              eval_results: Sequence[str | os.PathLike] = ()) -> Path:
    """Write the remote-code directory for the mu model directory `model_dir` into `out` (atomically)."""
    model_dir = Path(model_dir)
    if not (model_dir / CONFIG_FILE).is_file():
        raise MuError(f"{model_dir}: not a mu model directory (no {CONFIG_FILE}); `mu export hf` takes a directory "
                      "written by mu's save_pretrained / mu train")
    model_type = _read_json(model_dir / CONFIG_FILE).get("model_type")
    if model_type != "mu":
        raise MuError(f"{model_dir / CONFIG_FILE}: model_type {model_type!r} cannot be exported to transformers; "
                      "`mu export hf` takes mu text models (model_type 'mu': encoder-decoder or decoder-only)")
    model = load_model(model_dir)  # validates config and weights
    evals = [_read_eval(p) for p in eval_results]
    tok = model.tokenizer
    config = _hf_config(model.config.to_dict(), model.config.arch)
    generation = {"decoder_start_token_id": _token_id(tok, "bos_token_id", 1),
                  "bos_token_id": _token_id(tok, "bos_token_id", 1), "pad_token_id": model.config.pad_token_id,
                  "eos_token_id": _token_id(tok, "eos_token_id", None)}
    if model.config.arch == "deconly":
        del generation["decoder_start_token_id"]
    with atomic_directory(out) as tmp:
        shutil.copy2(model_dir / WEIGHTS_FILE, tmp / WEIGHTS_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        for name in CODE_FILES:
            shutil.copy2(HERE / name, tmp / name)
        if tok is not None:
            tok.save_pretrained(tmp)
        (tmp / README).write_text(model_card(model, model_dir, evals, generation["eos_token_id"]))
    return Path(out)


def _hf_config(mu_fields: dict[str, Any], arch: str) -> dict[str, Any]:
    auto = "AutoModelForSeq2SeqLM" if arch == "encdec" else "AutoModelForCausalLM"
    cls = "MuForConditionalGeneration" if arch == "encdec" else "MuForCausalLM"
    config = {"model_type": "mu", "mu_format": 1, **mu_fields,
              "auto_map": {"AutoConfig": "configuration_mu.MuHFConfig", auto: f"modeling_mu.{cls}"}}
    if arch == "encdec":
        config["custom_pipelines"] = {"text2text-generation": {
            "impl": "pipeline_mu.MuText2TextGenerationPipeline", "pt": ["AutoModelForSeq2SeqLM"], "type": "text"}}
    return config


def _token_id(tok: Any, name: str, default: Optional[int]) -> Optional[int]:
    value = getattr(tok, name, None) if tok is not None else None
    return value if value is not None else default


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MuError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(obj, dict):
        raise MuError(f"{path}: expected a JSON object")
    return obj


def _read_eval(path: str | os.PathLike) -> dict[str, Any]:
    result = _read_json(Path(path))
    if not isinstance(result.get("metrics"), dict):
        raise MuError(f"{path}: not a `mu eval --out` result (no 'metrics' object)")
    return result


def _recorded(model_dir: Path, name: str) -> Optional[dict[str, Any]]:
    """`name` from the model directory or the run directory above it (mu train: RUN/final, RUN/best)."""
    for d in (model_dir, model_dir.resolve().parent):
        if (d / name).is_file():
            try:
                return _read_json(d / name)
            except MuError:
                return None
    return None


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(model: Any, model_dir: Path, evals: Sequence[dict[str, Any]], eos: Optional[int]) -> str:
    """README.md: what the model is, its parameters, training data and scores as recorded."""
    c = model.config
    encdec = c.arch == "encdec"
    n = model.num_parameters()
    train = _recorded(model_dir, "train_config.json")
    result = _recorded(model_dir, "result.json")
    auto = "AutoModelForSeq2SeqLM" if encdec else "AutoModelForCausalLM"
    name = model_dir.resolve().name if model_dir.resolve().name not in ("final", "best") else \
        f"{model_dir.resolve().parent.name}/{model_dir.resolve().name}"
    lines = [
        "---",
        "library_name: transformers",
        f"pipeline_tag: {'text2text-generation' if encdec else 'text-generation'}",
        "tags: [mu, " + ("encoder-decoder" if encdec else "decoder-only") + "]",
        "---",
        "",
        f"# {name}",
        "",
        ("A Mu encoder-decoder (\"Return of the Encoder\": 2/3 encoder, 1/3 decoder layers)" if encdec else
         "The decoder-only twin of a Mu model (the same blocks without an encoder)") +
        ", trained with mu and exported by `mu export hf`.",
        "",
        "## Model",
        "",
        f"- parameters: {n:,} ({n / 1e6:.2f}M; {model.num_parameters(exclude_embeddings=True) / 1e6:.2f}M "
        "without the tied embedding)",
        "- layers: " + (f"{c.n_encoder_layer} encoder + {c.n_decoder_layer} decoder" if encdec else
                         f"{c.n_decoder_layer} decoder"),
        f"- width {c.n_embd}, {c.n_head} query / {c.n_kv_head} key-value heads of {c.head_dim}, MLP {c.hidden_dim}, "
        f"vocabulary {c.vocab_size}, trained context {c.block_size}",
        f"- weights: `model.safetensors` as mu wrote it ({str(model.dtype).replace('torch.', '')})",
        "",
        "## Training data",
        "",
    ]
    if train:
        data = train.get("train_data") or NOT_RECORDED
        limit = f" (first {train['train_limit']} examples)" if train.get("train_limit") else ""
        lines += [f"- task: {train.get('task', NOT_RECORDED)}, objective: {train.get('objective', NOT_RECORDED)}",
                  f"- training data: `{data}`{limit}",
                  f"- validation data: `{train.get('val_data')}`" if train.get("val_data") else
                  "- validation data: none",
                  f"- preset {train.get('preset')}, tokenizer {train.get('tokenizer') or 'byte'}, "
                  f"seed {train.get('seed')}"]
    else:
        lines.append(f"- {NOT_RECORDED} (no train_config.json beside the model directory)")
    if result:
        lines.append(f"- run: {result.get('steps')} steps, {result.get('examples', 0):,} examples, "
                     f"{result.get('flops', 0):.3g} training FLOPs, stopped by {result.get('stop_reason')}")
    lines += ["", "## Measured scores", ""]
    scores = []
    if result and (result.get("val_loss") is not None or result.get("val_metrics")):
        metrics = {"val_loss": result.get("val_loss"), **(result.get("val_metrics") or {})}
        where = f" on `{train['val_data']}`" if train and train.get("val_data") else ""
        limit = f" (first {train['val_limit']} examples)" if train and train.get("val_limit") else ""
        scores.append(f"- validation at the end of training{where}{limit}: " +
                      ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items() if v is not None))
    for e in evals:
        scores.append(f"- `mu eval` on `{e.get('data')}` (task {e.get('task')}): " +
                      ", ".join(f"{k} {_fmt(v)}" for k, v in e["metrics"].items() if isinstance(v, (int, float))))
    lines += scores or [f"- {NOT_RECORDED} (no result.json beside the model directory and no `--eval` results)"]
    eos_note = f"EOS id {eos}" if eos is not None else "no EOS id (generation runs to max_new_tokens)"
    lines += [
        "",
        "## Use",
        "",
        "```python",
        f"from transformers import AutoTokenizer, {auto}",
        "",
        "tok = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)",
        f"model = {auto}.from_pretrained(DIR, trust_remote_code=True)",
        "ids = tok(\"your text\", return_tensors=\"pt\")",
        "out = model.generate(**ids, max_new_tokens=64)",
        "print(tok.decode(out[0], skip_special_tokens=True))",
        "```",
        "",
        ("`pipeline(\"text2text-generation\", model=DIR, trust_remote_code=True)` works too. " if encdec else
         "`pipeline(\"text-generation\", model=DIR, trust_remote_code=True)` works too. ") +
        f"Greedy decoding gives mu's tokens (mu's tests check it). The generation config holds {eos_note}.",
        "",
    ]
    return "\n".join(lines)
