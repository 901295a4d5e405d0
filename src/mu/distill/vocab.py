"""Teacher/student vocabulary alignment.

Distillation compares the two models' next-token distributions id by id, so both must use the
same tokenizer: the same string -> id map. Their output layers may still differ in size (the
paper: Phi-3.5 has 32064 logits, Mu 32128, both with the 32011-token Phi-3.5 tokenizer; the rest are
padding rows / sentinels). Distributions are then compared on the common ids 0..min(V_s, V_t)-1.
"""

from __future__ import annotations

from typing import Any, Optional

from mu.errors import MuError


def _describe(tok: Any, name: str) -> str:
    where = getattr(tok, "name_or_path", "") or ""
    return f"{name} tokenizer ({len(tok)} tokens{', ' + where if where else ''})"


def check_same_tokenizer(student_tok: Any, teacher_tok: Any, student_name: str = "student",
                         teacher_name: str = "teacher") -> None:
    """Raise MuError unless both tokenizers map every token string to the same id."""
    if student_tok is None or teacher_tok is None:
        return
    a, b = student_tok.get_vocab(), teacher_tok.get_vocab()
    if a == b:
        return
    only_a = sorted(set(a) - set(b), key=lambda t: a[t])
    only_b = sorted(set(b) - set(a), key=lambda t: b[t])
    moved = sorted((t for t in set(a) & set(b) if a[t] != b[t]), key=lambda t: a[t])
    if moved:
        t = moved[0]
        example = f"token {t!r} is id {a[t]} for the {student_name} but {b[t]} for the {teacher_name}"
    elif only_a:
        example = f"token {only_a[0]!r} (id {a[only_a[0]]}) exists only for the {student_name}"
    else:
        example = f"token {only_b[0]!r} (id {b[only_b[0]]}) exists only for the {teacher_name}"
    raise MuError(f"the {_describe(student_tok, student_name)} and the {_describe(teacher_tok, teacher_name)} differ "
                  f"({len(moved)} shared tokens with different ids, {len(only_a)} + {len(only_b)} tokens only in one; "
                  f"e.g. {example}). Distillation compares distributions id by id, so teacher and student need the "
                  f"same tokenizer: train/fine-tune the teacher with the student's tokenizer (`mu finetune-teacher`), "
                  f"or pick a student that uses the teacher's tokenizer")


def common_vocab(tokenizer: Optional[Any], student_vocab: int, teacher_vocab: int,
                 teacher_name: str = "teacher") -> int:
    """The number of ids both models score, checked against the tokenizer: min(V_student, V_teacher)."""
    common = min(student_vocab, teacher_vocab)
    n_tok = len(tokenizer) if tokenizer is not None else None
    if n_tok is not None and n_tok > common:
        which = "teacher" if teacher_vocab < student_vocab else "student"
        size = teacher_vocab if which == "teacher" else student_vocab
        raise MuError(f"vocabulary mismatch: the tokenizer has {n_tok} tokens but the {which} "
                      f"({teacher_name if which == 'teacher' else 'student'}) has only {size} output logits "
                      f"(student {student_vocab}, teacher {teacher_vocab}); every token id must be scored by "
                      f"both models, so use models built for this tokenizer")
    return common
