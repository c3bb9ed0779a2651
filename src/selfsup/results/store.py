"""The results store: one SQLite file (WAL mode, safe for concurrent readers and a writer), one row per
(model, weights hash, dataset, split, protocol, tap, config hash, metric).

Every protocol returns ``Result`` rows; the CLI, the sweep and the report read them back from here,
never from printed output. A row already present is skipped by callers that check ``has`` first.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from selfsup.durable import check_writable
from selfsup.errors import UnknownName, UserError
from selfsup.paths import default_store

KEY = ("model", "model_hash", "dataset", "split", "protocol", "tap", "config_hash", "metric")

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    model TEXT NOT NULL, model_hash TEXT NOT NULL, dataset TEXT NOT NULL, split TEXT NOT NULL,
    protocol TEXT NOT NULL, tap TEXT NOT NULL, config_hash TEXT NOT NULL, metric TEXT NOT NULL,
    value REAL NOT NULL, ci REAL, seconds REAL, config TEXT, extra TEXT, created REAL,
    PRIMARY KEY (model, model_hash, dataset, split, protocol, tap, config_hash, metric)
);
"""


@dataclass
class Result:
    """One figure: ``value`` of ``metric`` (in %, for accuracies), ``ci`` its 95 % half-width if any."""
    model: str
    model_hash: str
    dataset: str
    split: str
    protocol: str
    tap: str
    config_hash: str
    metric: str
    value: float
    ci: float | None = None
    seconds: float = 0.0
    config: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    created: float = field(default_factory=time.time)


COLUMNS = tuple(Result.__dataclass_fields__)


class Store:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_store()
        fix = "pass --store FILE (or set SELFSUP_STORE) to a SQLite file in a folder you can write to"
        if self.path.is_dir():
            raise UserError(f"results store {self.path} is a folder, not a file; {fix}")
        check_writable(self.path.parent, "results store folder", fix)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=60)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA busy_timeout=60000")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as err:  # not a database, or a read-only one
            raise UserError(f"results store {self.path} cannot be opened ({err}); {fix}") from err

    def put(self, results: list[Result]) -> None:
        rows = [(r.model, r.model_hash, r.dataset, r.split, r.protocol, r.tap, r.config_hash, r.metric,
                 float(r.value), r.ci, r.seconds, json.dumps(r.config, default=str),
                 json.dumps(r.extra, default=str), r.created) for r in results]
        with self.db:  # one transaction: a batch of rows lands whole or not at all
            self.db.executemany("INSERT OR REPLACE INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)

    @staticmethod
    def _where(filters: dict) -> str:
        unknown = set(filters) - set(COLUMNS)
        if unknown:
            raise UnknownName(f"unknown result field(s) {sorted(unknown)}; fields: {', '.join(COLUMNS)}")
        return " AND ".join(f"{k} = ?" for k in filters) or "1"

    def has(self, **key) -> bool:
        clause = self._where(key)
        row = self.db.execute(f"SELECT 1 FROM results WHERE {clause} LIMIT 1", tuple(key.values())).fetchone()
        return row is not None

    def query(self, **filters) -> list[Result]:
        clause = self._where(filters)
        cursor = self.db.execute(f"SELECT * FROM results WHERE {clause} ORDER BY created", tuple(filters.values()))
        names = [c[0] for c in cursor.description]
        out = []
        for row in cursor.fetchall():
            values = dict(zip(names, row, strict=True))
            values["config"] = json.loads(values["config"] or "{}")
            values["extra"] = json.loads(values["extra"] or "{}")
            out.append(Result(**values))
        return out

    def close(self) -> None:
        self.db.close()


def as_dict(result: Result) -> dict:
    return asdict(result)
