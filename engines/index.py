"""`clipsql index --engine ray`: the vector index built as segments on the Ray workers.

The driver trains the IVF centroids (queries.search.index.ivf_centroids: seeded, as the local
build does), then deals the table's fragments into groups of about equal rows; each Ray task builds
the index segment of its group with those centroids (Lance's `create_index_uncommitted`: the
rows' assignment to partitions and the partitions' sub-indexes, the work that grows with the
table) and returns the segment's metadata. The driver commits every segment as one logical index
(`commit_existing_index_segments`): one Lance version, which `build_index` then records in the
ledger as the local build's. Segments share the centroids, so a query probes the same partitions
in each; ivf_pq trains a product quantizer per segment (its recall is measured after the build as
for the local one).
"""
from __future__ import annotations

from typing import Any

from clipsql.engines.engine import ray_session, worker_count
from clipsql.lazy import lance
from clipsql.lazy import ray as _ray


def fragment_groups(rows: list[tuple[int, int]], groups: int) -> list[list[int]]:
    """Fragment ids dealt into at most `groups` runs of consecutive fragments of about equal rows
    (`rows`: (fragment id, rows) in table order); no group is empty."""
    total = sum(r for _, r in rows) or 1
    per = total / max(1, groups)
    out: list[list[int]] = [[]]
    filled = 0
    for fid, r in rows:
        if out[-1] and filled >= per * len(out) and len(out) < groups:
            out.append([])
        out[-1].append(fid)
        filled += r
    return [g for g in out if g]


def index_segment(uri: str, version: int, column: str, options: dict, fragment_ids: list[int]) -> Any:
    """One task: the index segment of `fragment_ids` of the table at `uri` as of `version`."""
    ds = lance.dataset(uri, version=version)
    return ds.create_index_uncommitted(column, fragment_ids=fragment_ids, **options)


def build_vector_index_ray(ds: Any, column: str, options: dict, *, address: str | None = None) -> None:
    """Build the index `options` describe (IVF centroids given) on `column` of `ds` (its latest
    version) as one segment per group of fragments on the Ray workers; commit it as one index."""
    opts = {k: v for k, v in options.items() if k != "replace"}
    frags = [(f.fragment_id, f.count_rows()) for f in ds.get_fragments()]
    name = f"{column}_idx"
    with ray_session(address) as ray:
        groups = fragment_groups(frags, 2 * max(1, worker_count(ray)))
        task = _ray.remote(num_cpus=1, max_retries=2)(index_segment)
        segments = ray.get([task.remote(ds.uri, ds.version, column, opts, g) for g in groups])
    head = lance.dataset(ds.uri)
    if any(idx.name == name for idx in head.describe_indices()):
        head.drop_index(name)          # `replace`: the new index takes the old one's name
        head = lance.dataset(ds.uri)
    head.commit_existing_index_segments(name, column, segments)
