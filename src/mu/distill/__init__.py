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

from mu.distill.teacher import Teacher, load_teacher, lora_target_modules
from mu.distill.vocab import check_same_tokenizer, common_vocab
from mu.distill.losses import KDLossConfig, divergence, kd_divergence
from mu.distill.targets import sample_student_targets, teacher_inputs
from mu.distill.topk import TopKCache, build_topk_cache
from mu.distill.objective import DistillObjective, SamplingConfig
from mu.distill.run import DistillConfig, distill
from mu.distill.lora import FinetuneTeacherConfig, finetune_teacher

__all__ = ["load_teacher", "Teacher", "lora_target_modules", "check_same_tokenizer", "common_vocab", "KDLossConfig",
           "kd_divergence", "divergence", "teacher_inputs", "sample_student_targets", "TopKCache", "build_topk_cache",
           "DistillObjective", "SamplingConfig", "DistillConfig", "distill", "FinetuneTeacherConfig",
           "finetune_teacher"]
