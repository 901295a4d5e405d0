"""Knowledge distillation: a decoder-only teacher (optionally with a LoRA adapter) -> a Mu encoder-decoder.

    teacher.py    load_teacher(...) -> Teacher (HF causal LM dir, + PEFT adapter merged, mu decoder-only, teacher.pt)
    vocab.py      same-tokenizer check, common vocabulary (32064 vs 32128 -> compare the first 32064 ids)
    targets.py    teacher inputs aligned with the student's decoder positions; on-policy sampling
    losses.py     forward KL / reverse KL / generalised JSD at temperature tau; alpha * KD + (1 - alpha) * CE
    topk.py       precomputed teacher top-k logits for the gold targets, reused across epochs
    objective.py  DistillObjective: the trainer's loss_fn
    run.py        DistillConfig, distill(config): `mu distill` on the trainer's loop
    lora.py       finetune_teacher(...): LoRA fine-tuning of a causal-LM teacher (`mu finetune-teacher`)

See docs/distillation.md.
"""

_LAZY = {
    "load_teacher": "mu.distill.teacher",
    "Teacher": "mu.distill.teacher",
    "lora_target_modules": "mu.distill.teacher",
    "check_same_tokenizer": "mu.distill.vocab",
    "common_vocab": "mu.distill.vocab",
    "KDLossConfig": "mu.distill.losses",
    "kd_divergence": "mu.distill.losses",
    "divergence": "mu.distill.losses",
    "teacher_inputs": "mu.distill.targets",
    "sample_student_targets": "mu.distill.targets",
    "TopKCache": "mu.distill.topk",
    "build_topk_cache": "mu.distill.topk",
    "DistillObjective": "mu.distill.objective",
    "SamplingConfig": "mu.distill.objective",
    "DistillConfig": "mu.distill.run",
    "distill": "mu.distill.run",
    "FinetuneTeacherConfig": "mu.distill.lora",
    "finetune_teacher": "mu.distill.lora",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mu.distill' has no attribute {name!r}")
