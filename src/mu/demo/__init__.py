"""`mu demo`: the paper's comparison at small scale, end to end, with no downloads.

    from mu.demo import demo_config, run_demo
    result = run_demo(demo_config("demo_out", preset="default"))
    result.report["claims"]        # architecture and distillation: {"f1_diff", "ci95", "seeds"}
    result.files                   # report.md, report.json, training_curves.png, quality.png, latency.png

    config.py    DemoConfig, its presets (quick, default, full, large), the model shapes, deconly_twin
    pipeline.py  the stages (data, train, bench, report), the runs (teacher, LR grid, seeds, KD) and run_demo
    runs.py      one training run + its evaluation, as plain data (runs in worker processes)
    report.py    report.json / report.md and the reading generated from the numbers
    plots.py     the PNGs

See docs/demo.md.
"""

from mu.demo.config import PRESETS, DemoConfig, deconly_twin, demo_config
from mu.demo.pipeline import DemoResult, Stage, run_demo

__all__ = ["DemoConfig", "PRESETS", "demo_config", "deconly_twin", "run_demo", "DemoResult", "Stage"]
