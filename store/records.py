"""A model's catalog record (what the store knows of a model: its table, dimension, logit scale), and
the choice of one by name among a store's models."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from clipsql.errors import ModelError


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

    @property
    def storage(self) -> str:
        """How the model's vectors are stored: float32 (the default; every model recorded before the
        choice existed) or float16 (`spec["storage"]`, chosen when the model was first ingested)."""
        return self.spec.get("storage") or "float32"

    @classmethod
    def from_row(cls, row: Any) -> "ModelRecord":
        m = row._mapping
        return cls(m["model_id"], m["table_name"], m["kind"], int(m["dim"]), float(m["logit_scale"]),
                   None if m["logit_bias"] is None else float(m["logit_bias"]), m["context_length"],
                   json.loads(m["spec"]))


def pick_model(models: list[ModelRecord], default: str | None, name: str | None, path: Any) -> ModelRecord:
    """The model `name` (an id, or a unique part of one) among `models`; None → `default` (else the first)."""
    if not models:
        raise ModelError(f"store {path} has no models yet: ingest data first "
                         "(`clipsql ingest STORE SOURCE --model …`)")
    if name is None:
        name = default or models[0].model_id
    exact = [m for m in models if m.model_id == name]
    if exact:
        return exact[0]
    partial = [m for m in models if name in m.model_id]
    if len(partial) == 1:
        return partial[0]
    known = ", ".join(m.model_id for m in models)
    if partial:
        raise ModelError(f"model {name!r} is ambiguous in this store; one of: {known}")
    raise ModelError(f"model {name!r} is not in this store; known models: {known}")
