"""The stage manifest: which stages of a demo directory are finished, and with which settings.

`DIR/demo_manifest.json` maps each stage to {"hash", "status" ("running" | "done"), "seconds", "summary"}.
A stage's hash covers its own settings and the hashes of the stages it reads from, so a changed
setting redoes that stage and every stage after it that depends on it; an unchanged, finished stage is
reused. A stage that was interrupted ("running" with the same hash) is resumed where its tool can
(the trainer continues from its last checkpoint); one whose hash changed starts from an empty directory.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from mu.errors import MuError
from mu.atomic import atomic_write_text

MANIFEST_FILE = "demo_manifest.json"
FORMAT = 1


class Manifest:
    def __init__(self, out: Path):
        self.path = out / MANIFEST_FILE
        self.stages: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except json.JSONDecodeError as e:
                raise MuError(f"{self.path}: not valid JSON ({e}); remove it to start the demo afresh") from None
            if data.get("format") == FORMAT:
                self.stages = dict(data.get("stages", {}))

    def _save(self) -> None:
        atomic_write_text(self.path, json.dumps({"format": FORMAT, "stages": self.stages}, indent=1) + "\n")

    def is_done(self, stage: str, hash_: str) -> bool:
        entry = self.stages.get(stage)
        return bool(entry and entry.get("hash") == hash_ and entry.get("status") == "done")

    def entry(self, stage: str) -> Optional[dict[str, Any]]:
        return self.stages.get(stage)

    def begin(self, stage: str, hash_: str, directory: Optional[Path]) -> bool:
        """Mark `stage` as running with `hash_`; -> True when an interrupted run of the same settings may resume.

        A directory left by other settings (or by no recorded run) is emptied first, so tools that resume
        from what they find there (the trainer) never mix two runs.
        """
        entry = self.stages.get(stage)
        resumable = bool(entry and entry.get("hash") == hash_ and entry.get("status") == "running")
        if directory is not None and directory.exists() and not resumable:
            shutil.rmtree(directory)
        self.stages[stage] = {"hash": hash_, "status": "running", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "seconds": (entry or {}).get("seconds", 0.0) if resumable else 0.0}
        self._save()
        return resumable

    def finish(self, stage: str, seconds: float, summary: Optional[dict[str, Any]] = None) -> None:
        entry = self.stages[stage]
        entry.update(status="done", seconds=entry.get("seconds", 0.0) + seconds, summary=summary or {},
                     finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        self._save()

    def add_seconds(self, stage: str, seconds: float) -> None:
        """Time spent in an interrupted attempt (kept so the report's timings add up over resumes)."""
        entry = self.stages.get(stage)
        if entry is not None and entry.get("status") == "running":
            entry["seconds"] = entry.get("seconds", 0.0) + seconds
            self._save()
