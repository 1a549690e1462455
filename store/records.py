"""A model's catalog record (what the store knows of a model: its table, dimension, logit scale)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelRecord:
    model_id: str
    table_name: str
    kind: str
    dim: int
    logit_scale: float
    logit_bias: float | None
    context_length: int | None
    spec: dict

    @classmethod
    def from_row(cls, row: Any) -> "ModelRecord":
        m = row._mapping
        return cls(m["model_id"], m["table_name"], m["kind"], int(m["dim"]), float(m["logit_scale"]),
                   None if m["logit_bias"] is None else float(m["logit_bias"]), m["context_length"],
                   json.loads(m["spec"]))
