"""Every Lance table of a store: its name and its schema, in one registry.

    samples                                   one row per sample (`samples_schema`)
    emb_<slug>_<hash>                         one model's embeddings (`embeddings_schema`)
    scores_<model table>                      `clipsql score`: stored score columns
    semdedup_<model table>                    `clipsql dedup`: semdedup_cluster, semdedup_max_sim
    semdedup_<model table>_centroids          … and its k-means centroids
    target_<slug>_<hash>_<build>              `clipsql target add`: one build of a target set

A model table is named from its model id and a target table from the target's name by the same
rule, `table_name_for(kind, name)`: a lower-case slug (≤ 40 characters) and 8 hex digits of the
name's sha256, so names never collide and stay valid file names. A model's derived tables
(`derived_tables`) are dropped with it (`clipsql models rm`). Nothing else in clipsql spells a
table name or prefix.
"""
from __future__ import annotations

import hashlib
import re

import pyarrow as pa

SAMPLES = "samples"
DELETIONS = "deletions"
TAGS = "tags"                 # the curation app's tags (store.tags)       # ids `clipsql delete` removed, kept so no ingest brings them back
EMBEDDINGS = "emb"          # prefix of a model's table
TARGET = "target"           # prefix of a target set's tables
STORED_SCORES = "scores_"   # + model table
DEDUP = "semdedup_"         # + model table (and + "_centroids")
CENTROIDS_SUFFIX = "_centroids"

# computed from the caption at ingest (ingest.captions; `clipsql backfill` for older stores)
CAPTION_FEATURES = ("caption_lang", "caption_lang_score", "caption_words", "caption_tokens", "caption_chars")
SAMPLE_COLUMNS = ("id", "uri", "caption", "width", "height", "source", "location",
                  "caption_truncated", "metadata") + CAPTION_FEATURES


def table_name_for(kind: str, name: str) -> str:
    """The table of `name` (a model id for kind EMBEDDINGS, a target name for TARGET)."""
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:40]
    return f"{kind}_{slug}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def embeddings_table_name(model_id: str) -> str:
    return table_name_for(EMBEDDINGS, model_id)


def target_table_name(name: str, build: str) -> str:
    """One build of target `name` (each build is a new table, switched to in one catalog transaction)."""
    return f"{table_name_for(TARGET, name)}_{build}"


def stored_table_name(model_table: str) -> str:
    """The stored score columns of a model (`clipsql score`; view `stored_scores`)."""
    return STORED_SCORES + model_table


def dedup_table_name(model_table: str) -> str:
    """The Lance table of a model's SemDeDup columns (id, semdedup_cluster, semdedup_max_sim, computed_at)."""
    return DEDUP + model_table


def centroids_table_name(model_table: str) -> str:
    return DEDUP + model_table + CENTROIDS_SUFFIX


def derived_tables(model_table: str) -> list[str]:
    """The tables computed from a model's table, dropped with the model."""
    return [stored_table_name(model_table), dedup_table_name(model_table), centroids_table_name(model_table)]


def is_embeddings_table(name: str) -> bool:
    return name.startswith(EMBEDDINGS + "_")


def is_target_table(name: str) -> bool:
    return name.startswith(TARGET + "_")


def samples_schema() -> pa.Schema:
    return pa.schema([
        ("id", pa.string()), ("uri", pa.string()), ("caption", pa.string()),
        ("width", pa.int32()), ("height", pa.int32()), ("source", pa.string()),
        ("location", pa.string()), ("caption_truncated", pa.bool_()), ("metadata", pa.string()),
    ] + caption_feature_fields())


def caption_feature_fields() -> list[pa.Field]:
    """The samples columns of CAPTION_FEATURES (NULL where the caption is NULL)."""
    return [pa.field("caption_lang", pa.string()), pa.field("caption_lang_score", pa.float32()),
            pa.field("caption_words", pa.int32()), pa.field("caption_tokens", pa.int32()),
            pa.field("caption_chars", pa.int32())]


STORAGE_TYPES = {"float32": pa.float32(), "float16": pa.float16()}   # a model's vector storage


def embeddings_schema(dim: int, storage: str = "float32") -> pa.Schema:
    """One model's table. uri and caption are copied from `samples` (≈4% of a row at d = 512) so
    the `scores` view is one scan, with no join whose hash table would grow with the store.
    `storage` float16 halves the vectors (HALF_FLOAT[d]); readers widen them to float32."""
    value = STORAGE_TYPES[storage]
    return pa.schema([
        ("id", pa.string()),
        ("uri", pa.string()),
        ("caption", pa.string()),
        ("image_embedding", pa.list_(value, dim)),
        ("text_embedding", pa.list_(value, dim)),
        ("seq", pa.int64()),
    ])


def metadata_aliases(names: list[str]) -> dict[str, str]:
    """{metadata key: its column name in the `samples` view}. SQL names ignore case, so a key that is a
    samples column (id, uri, caption, …, in any case: `ID`, `Source`) becomes meta_<key>; if that is
    taken too, meta_<key>_2, _3, … (sorted keys: the same store always gives the same names). A key
    that differs from an earlier key only in case (`Kind`, then `kind`) becomes <key>_1, _2, … (the
    name DuckDB itself would give), in the order of `names`."""
    samples = {c.lower() for c in SAMPLE_COLUMNS}
    taken = {n.lower() for n in SAMPLE_COLUMNS} | {n.lower() for n in names}
    out: dict[str, str] = {}
    for name in sorted(names):
        if name.lower() not in samples:
            continue
        alias, k = f"meta_{name}", 2
        while alias.lower() in taken:
            alias, k = f"meta_{name}_{k}", k + 1
        taken.add(alias.lower())
        out[name] = alias
    seen: set[str] = set()
    for name in names:
        if name in out:
            continue
        alias, k = name, 1
        while alias.lower() in seen:
            alias, k = f"{name}_{k}", k + 1
            while alias.lower() in taken:
                alias, k = f"{name}_{k}", k + 1
        seen.add(alias.lower())
        taken.add(alias.lower())
        out[name] = alias
    return out
