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

from mu.vision.config import PreprocessConfig, VLMConfig, VisionTowerConfig
from mu.vision.preprocess import ImageProcessor, load_image
from mu.vision.towers import HFVisionTower, NativeViT, hf_tower_config, load_hf_tower
from mu.vision.model import MuVLM, add_image_token, build_vlm, load_vlm
from mu.vision.data import VQAExample, load_vqa_jsonl, split_by_image, synthetic_shapes_vqa, write_vqa_jsonl
from mu.vision.metrics import normalize_answer, vqa_accuracy, vqa_score
from mu.vision.train import train_vqa
from mu.vision.recipe import VQARecipe, build_recipe_vlm, prepare_vqa_data
from mu.vision.evaluate import evaluate_vqa

__all__ = ["VisionTowerConfig", "PreprocessConfig", "VLMConfig", "ImageProcessor", "load_image", "NativeViT",
           "HFVisionTower", "hf_tower_config", "load_hf_tower", "MuVLM", "build_vlm", "load_vlm", "add_image_token",
           "VQAExample", "load_vqa_jsonl", "split_by_image", "synthetic_shapes_vqa", "write_vqa_jsonl",
           "normalize_answer", "vqa_score", "vqa_accuracy", "train_vqa", "VQARecipe", "prepare_vqa_data",
           "build_recipe_vlm", "evaluate_vqa"]
