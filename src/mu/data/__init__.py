"""Data: task formats and file reading (`tasks`), synthetic reading comprehension (`synthetic`),
batching and collation for training (`batching`)."""

from mu.data.tasks import NO_ANSWER, TASKS, Example, Task, encode_source, get_task, iter_text, load_examples
from mu.data.synthetic import synthetic_reading_comprehension, write_synthetic_splits

__all__ = ["NO_ANSWER", "TASKS", "Example", "Task", "encode_source", "get_task", "iter_text", "load_examples",
           "synthetic_reading_comprehension", "write_synthetic_splits"]
