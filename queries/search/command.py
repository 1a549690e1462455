"""`clipsql search`: similarity search for people who don't write SQL.

    search(st, "a red circle", k=50)              # text → image: the prompt through the text tower
    search(st, like="r0042", k=20)                # image → image from a stored row
    search(st, "a dog", where="width >= 256", gallery="dogs.html")

The prompt goes through the same encoder path as the SQL function `text_embedding` (it *is*
that function, on a connection over the store); the top-k is `nearest`'s (queries.sql.nearest).
Returns a SearchResult: `hits` (SearchHit rank, id, score, uri, caption), how the search ran
(`method`, `reason`, `note`, the index's `nprobes` / `recall`), `model`, `query`; `as_dict()` is
what `--format json` prints.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from clipsql.errors import QueryError
from clipsql.lazy import duckdb
from clipsql.queries.present.gallery import GallerySummary, write_gallery
from clipsql.queries.sql.db import connect, open_store
from clipsql.queries.sql.functions import one_blas_thread, udf_error
from clipsql.queries.sql.nearest import Searcher, allowed_ids
from clipsql.store import vector_index as vindex
from clipsql.store.store import Store


@dataclass
class SearchHit:
    """One row found, best first (rank 1), with its samples' uri and caption."""
    rank: int
    id: str
    score: float
    uri: str | None
    caption: str | None


# the keys of how a search ran (queries.sql.nearest.Searcher.last), in the order it sets them
HOW_KEYS = ("model", "column", "method", "reason", "note", "allowed", "nprobes", "recall", "recall_by_query")


@dataclass
class SearchResult:
    """The k best rows of a search and how it ran: `method` exact or `index KIND` (with the index's
    `nprobes`, `recall` for this query's modality and `recall_by_query`), `reason` why it fell back to
    exact, `note`s, `allowed` rows under a `where`; `gallery` when one was written."""
    model: str
    column: str
    method: str
    reason: str | None
    hits: list[SearchHit]
    k: int
    query: str
    where: str | None
    note: str | None = None
    allowed: int | None = None
    nprobes: int | None = None
    recall: float | None = None
    recall_by_query: dict[str, Any] | None = None
    gallery: GallerySummary | None = None
    how: tuple[str, ...] = field(default=HOW_KEYS[:4], repr=False)   # which of HOW_KEYS the search set, in order

    def as_dict(self) -> dict[str, Any]:
        """The JSON form `clipsql search --format json` prints: how it ran (the keys the search set,
        in its order), rows, k, query, where, and the gallery's path when one was written."""
        out: dict[str, Any] = {key: getattr(self, key) for key in self.how}
        out.update(rows=[asdict(h) for h in self.hits], k=self.k, query=self.query, where=self.where)
        if self.gallery:
            out["gallery"] = self.gallery.path
        return out


def _query_vector(con: Any, rec: Any, prompt: str | None, like: str | None, modality: str) -> np.ndarray:
    if (prompt is None) == (like is None):
        raise QueryError("give exactly one of a `prompt` (text to search by) or `like` (the id of a stored row)",
                         param="prompt")
    try:
        if prompt is not None:
            if not prompt.strip():
                raise QueryError("the prompt is empty: give text to search by, e.g. \"a red circle\"")
            row = con.execute("SELECT text_embedding(?, ?)::FLOAT[]", [prompt, rec.model_id]).fetchall()[0]
            return np.asarray(row[0], dtype=np.float64)[None, :]
        column = vindex.column_for(modality)
        rows = con.execute(f"SELECT {column}::FLOAT[] FROM embeddings WHERE id = ? AND model = ? LIMIT 1",
                           [like, rec.model_id]).fetchall()
        row = rows[0] if rows else None
    except duckdb.Error as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise udf_error(e, con) or QueryError(f"cannot embed the query: {first}") from None
    if row is None:
        raise QueryError(f"no stored row has id {like!r} for model {rec.model_id} (`like` takes an id of the "
                         "samples / embeddings views)", param="like")
    if row[0] is None:
        raise QueryError(f"row {like!r} has no {modality} embedding to search by")
    return np.asarray(row[0], dtype=np.float64)[None, :]


def search(store: Store | str, prompt: str | None = None, *, like: str | None = None, k: int = 50,
           model: str | None = None, modality: str = "image", where: str | None = None, exact: bool = False,
           gallery: str | None = None, con: Any = None) -> SearchResult:
    """The k best stored rows for a prompt or a stored row (see the module doc)."""
    if k is None or int(k) < 1:
        raise QueryError(f"-k must be a positive integer; got {k}")
    st = open_store(store)
    own = con is None
    con = con if con is not None else connect(st)
    try:
        rec = st.model(model)
        vindex.column_for(modality)
        with one_blas_thread():
            q = _query_vector(con, rec, prompt, like, modality)
        searcher = Searcher(st)
        allowed = allowed_ids(con, where) if where is not None else None
        ids, scores = searcher.search(q, int(k), rec.model_id, modality, allowed, exact,
                                      query_modality="text" if prompt is not None else modality)[0]
        res = pa.table({"rank": pa.array(np.arange(1, len(ids) + 1), pa.int32()),
                        "id": pa.array(ids.tolist(), pa.string()), "score": pa.array(scores, pa.float64())})
        con.register("_clipsql_search_result", res)
        tbl = con.sql("SELECT r.rank, r.id, r.score, s.uri, s.caption FROM _clipsql_search_result r "
                      "LEFT JOIN samples s USING (id) ORDER BY r.rank").to_arrow_table()   # a relation: no
        # DB-API copy, and no UserWarning about one on stderr (it broke `--format json` piped output)
        tbl = tbl.read_all() if hasattr(tbl, "read_all") else tbl
        how = searcher.last
        out = SearchResult(**how, hits=[SearchHit(**r) for r in tbl.to_pylist()], k=int(k),
                           query=prompt if prompt is not None else f"like {like}", where=where, how=tuple(how))
        if gallery:
            title = f"clipsql search: {out.query}" + (f" where {where}" if where else "")
            con.register("_clipsql_search_rows", tbl)
            out.gallery = write_gallery(st, "SELECT id, round(score, 4) AS score, uri, caption FROM "
                                        "_clipsql_search_rows ORDER BY rank", gallery, limit=None, title=title,
                                        con=con)
        return out
    finally:
        if own:
            con.close()


def format_search(res: SearchResult, fmt: str = "table") -> str:
    """The report `clipsql search` prints: json, or a header line, a table and notes."""
    if fmt == "json":
        return json.dumps(res.as_dict(), default=str, indent=1)
    head = f"{len(res.hits)} nearest {res.column.split('_')[0]}s of {res.model} to {res.query!r}"
    head += f" ({res.method}" + (f", nprobes {res.nprobes}, recall@10 {res.recall:.3f}"
                                 if res.nprobes and res.recall is not None else "") + ")"
    # (recall: the index's recall@10 measured for queries of this search's modality)
    if res.where:
        head += f"; filter {res.where!r}: {res.allowed} allowed rows"
    names = ["rank", "id", "score", "uri", "caption"]
    grid = [[_cell(getattr(h, n)) for n in names] for h in res.hits]
    widths = [max([len(n)] + [len(g[i]) for g in grid]) for i, n in enumerate(names)]
    lines = [head, " | ".join(n.ljust(w) for n, w in zip(names, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(g, widths)) for g in grid]
    for note in (res.reason, res.note):
        if note:
            lines.append(f"note: {note}")
    if res.gallery:
        lines.append(f"gallery: {res.gallery.path} ({res.gallery.shown} images)")
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    s = "NULL" if v is None else str(v)
    return s if len(s) <= 60 else s[:57] + "…"
