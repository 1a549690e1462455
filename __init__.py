"""clipsql: a LanceDB store of CLIP/SigLIP embeddings whose dataset-curation scores are DuckDB SQL.

The installed package is this repository's root: ``clipsql.errors``, ``clipsql.kernels``,
``clipsql.models``, ``clipsql.store``, ``clipsql.ingest``, ``clipsql.queries``,
``clipsql.engines`` and ``clipsql.cli`` (layers that import only downward; see the README's
"Code layout" and the import-linter contract in ``pyproject.toml``).
"""
from __future__ import annotations

__version__ = "0.2.0"
