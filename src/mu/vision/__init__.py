"""Vision-language models (text + image -> text): a vision tower and projector feeding a Mu encoder.

    from mu.vision import build_vlm, load_vlm, train_vqa, evaluate_vqa, synthetic_shapes_vqa
    vlm = build_vlm("tiny", tower=VisionTowerConfig(image_size=64, patch_size=8))
    train_vqa(vlm, synthetic_shapes_vqa(500, seed=0), "runs/shapes", steps=500, lr=1e-3)
    vlm.answer(["dog.jpg"], ["What color is the dog?"])

Submodules: config (dataclasses), preprocess (PIL + numpy), towers (native ViT, CLIP, SigLIP,
projectors), model (MuVLM, build/load), data (jsonl, synthetic shapes, batches), metrics (VQA
accuracy), train (train_vqa), recipe (VQARecipe: the defaults of `mu train --task vqa`), evaluate (evaluate_vqa).
"""

from __future__ import annotations

_LAZY = {
    "VisionTowerConfig": "mu.vision.config",
    "PreprocessConfig": "mu.vision.config",
    "VLMConfig": "mu.vision.config",
    "ImageProcessor": "mu.vision.preprocess",
    "load_image": "mu.vision.preprocess",
    "NativeViT": "mu.vision.towers",
    "HFVisionTower": "mu.vision.towers",
    "hf_tower_config": "mu.vision.towers",
    "load_hf_tower": "mu.vision.towers",
    "MuVLM": "mu.vision.model",
    "build_vlm": "mu.vision.model",
    "load_vlm": "mu.vision.model",
    "add_image_token": "mu.vision.model",
    "VQAExample": "mu.vision.data",
    "load_vqa_jsonl": "mu.vision.data",
    "split_by_image": "mu.vision.data",
    "synthetic_shapes_vqa": "mu.vision.data",
    "write_vqa_jsonl": "mu.vision.data",
    "normalize_answer": "mu.vision.metrics",
    "vqa_score": "mu.vision.metrics",
    "vqa_accuracy": "mu.vision.metrics",
    "train_vqa": "mu.vision.train",
    "VQARecipe": "mu.vision.recipe",
    "prepare_vqa_data": "mu.vision.recipe",
    "build_recipe_vlm": "mu.vision.recipe",
    "evaluate_vqa": "mu.vision.evaluate",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mu.vision' has no attribute {name!r}")
