"""Append-style logs (metrics.jsonl, probe.jsonl) that still obey "every file is written atomically".

Records are kept in memory and the whole file is rewritten atomically (temp file + rename) every
`flush_every` records, at every checkpoint and at the end. A crash loses at most the records since the last
flush, never earlier ones, and a reader never sees a torn line. On resume the file is read back and records
after the checkpoint's step are dropped: the resumed run writes them again.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from sdlora.util import atomic


def _clean(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


class JsonlLog:
    def __init__(self, path: str | Path, *, resume_step: int | None = None, flush_every: int = 50):
        self.path = Path(path)
        self.flush_every = flush_every
        self.records: list[dict] = []
        self._unflushed = 0
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # cannot happen with atomic rewrites; tolerate a file from an older version
                if isinstance(rec, dict) and rec.get("step", 0) <= resume_step:
                    self.records.append(rec)

    def append(self, step: int, values: dict) -> None:
        self.records.append({"step": step, **{k: _clean(v) for k, v in values.items()}})
        self._unflushed += 1
        if self._unflushed >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self.records and not self.path.exists():
            return
        atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        self._unflushed = 0
