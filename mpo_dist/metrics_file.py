"""The one reader of a run's `metrics.jsonl`: one JSON object per logged step, written by
metrics.MetricLogger on rank 0 (a training step's window, a held-out evaluation, or both).
The study, the benchmark and the tests read it here."""

from __future__ import annotations

import json
from pathlib import Path

from mpo_dist.metric_names import TOKENS_PER_S

METRICS_FILE = "metrics.jsonl"


def parse_records(text: str) -> list[dict]:
    """The records of a metrics.jsonl's text, in file order; a line cut by a crash is skipped."""
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl, or of the one in a run's folder; none when there is no file."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return parse_records(path.read_text()) if path.is_file() else []


def training_records(records: list[dict]) -> list[dict]:
    """The records of training step windows (an eval-only record holds no throughput), by step."""
    return sorted((record for record in records if TOKENS_PER_S in record), key=lambda record: record["step"])
