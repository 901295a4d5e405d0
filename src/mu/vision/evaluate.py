"""VQA evaluation: batched cached generation over a VQA set, scored with VQA accuracy."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from mu.errors import MuError
from mu.vision.data import ImageCache, VQAExample, load_vqa_jsonl
from mu.vision.metrics import normalize_answer, vqa_score, yes_no_by_presence


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def evaluate_vqa(model, data: Sequence[VQAExample] | str | os.PathLike, batch_size: int = 32,
                 max_new_tokens: int = 8, num_beams: int = 1, limit: Optional[int] = None,
                 predictions_file: Optional[str | os.PathLike] = None, progress: bool = False,
                 image_cache: Optional[ImageCache] = None) -> dict[str, Any]:
    """Answer every question with greedy (or beam) decoding and score it.

    model: a `MuVLM` (or a directory for `load_vlm`). data: examples or a jsonl path.
    Returns {"accuracy", "n", "seconds", "ms_per_answer", "by_answer": {normalised target: accuracy},
    "yes_no_by_presence": {"present", "absent"} (`mu.vision.metrics.yes_no_by_presence`),
    "predictions": [{"id", "question", "prediction", "answers", "score"}]}; `predictions_file` gets the
    predictions as jsonl (written atomically).
    """
    from mu.vision.model import load_vlm

    if isinstance(model, (str, os.PathLike)):
        model = load_vlm(model)
    if isinstance(data, (str, os.PathLike)):
        data = load_vqa_jsonl(data)
    data = list(data)[:limit] if limit is not None else list(data)
    if not data:
        raise MuError("evaluate_vqa: no examples to evaluate")
    if batch_size < 1:
        raise MuError(f"batch_size must be >= 1, got {batch_size}")
    cache = image_cache or ImageCache(model.processor)
    was_training = model.training
    model.eval()
    rows, seconds = [], 0.0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(data), desc="eval vqa", unit="q")
    try:
        for i in range(0, len(data), batch_size):
            batch = data[i:i + batch_size]
            views = [cache(e) for e in batch]  # preprocessing is cached, so it is outside the timing
            _sync(model.device)
            t0 = time.perf_counter()
            preds = model.answer(views, [e.question for e in batch], max_new_tokens=max_new_tokens,
                                 num_beams=num_beams)
            _sync(model.device)
            seconds += time.perf_counter() - t0
            for e, p in zip(batch, preds):
                rows.append({"id": e.id, "question": e.question, "prediction": p, "answers": e.answers,
                             "score": vqa_score(p, e.answers)})
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    by_answer: dict[str, list[float]] = {}
    for e, r in zip(data, rows):
        by_answer.setdefault(normalize_answer(e.target), []).append(r["score"])
    if predictions_file is not None:
        from mu.atomic import atomic_write_text

        atomic_write_text(Path(predictions_file), "".join(json.dumps(r) + "\n" for r in rows))
    return {"accuracy": sum(r["score"] for r in rows) / len(rows), "n": len(rows), "seconds": seconds,
            "ms_per_answer": 1000 * seconds / len(rows),
            "by_answer": {k: sum(v) / len(v) for k, v in sorted(by_answer.items())},
            "yes_no_by_presence": yes_no_by_presence(data, rows), "predictions": rows}
