"""Scores declared once: the UDFs, macros, `scores` columns, SQL help and the README table all come
from `queries.sql.specs.SPECS`, and agree with what a connection really registers."""
import inspect
import re
from pathlib import Path

import pytest
from conftest import write_image_folder

from clipsql.ingest.pipeline import ingest
from clipsql.kernels import scores as kernels
from clipsql.queries.sql import cli_query, functions, specs
from clipsql.queries.sql.db import connect
from clipsql.store.fits import fit_stats
from clipsql.store.store import Store

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def con(tmp_path, fake_encoder):
    st = Store.init(tmp_path / "s")
    ingest(st, str(write_image_folder(tmp_path / "data", 12)), model=fake_encoder.model,
           options=fake_encoder.options())
    fit_stats(st, reference_size=8, seed=1)
    c = connect(Store.open(tmp_path / "s"))
    yield c
    c.close()


def _readme_function_table() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("| function | meaning |")
    end = text.index("\n\n", start)
    return text[start:end]


def test_readme_table_is_the_generated_one():
    assert _readme_function_table() == specs.readme_table()


def test_every_registered_function_has_a_spec_and_every_spec_is_registered(con):
    rows = con.sql("SELECT DISTINCT function_name, function_type FROM duckdb_functions() WHERE "
                   "(function_type = 'macro' AND NOT internal) OR function_name LIKE '\\_clipsql%' ESCAPE '\\'"
                   ).fetchall()
    udfs = {n for n, t in rows if n.startswith("_clipsql") and t != "macro"}
    macros = {n for n, t in rows if t == "macro"} - {"_clipsql_finite"}
    d = 16   # the fake encoder's width: every score UDF is also declared on FLOAT[16]
    want_udfs = {u.name for u in specs.UDFS} | {f"{u.name}_d{d}" for u in specs.UDFS if u.returns == "DOUBLE"}
    assert udfs - {"_clipsql_nearest"} == want_udfs      # `nearest` is registered by queries.sql.nearest
    assert macros == {f.name for f in specs.FUNCTIONS}
    assert set(functions.IMPLEMENTATIONS) == {u.impl for u in specs.UDFS}
    # each macro calls its spec's UDF (or is native SQL)
    for f in specs.FUNCTIONS:
        defs = [r[0] for r in con.sql("SELECT macro_definition FROM duckdb_functions() WHERE function_name = ?",
                                      params=[f.name]).fetchall()]
        assert defs and all((f.udf in x) if f.udf else ("_clipsql_" not in x.replace("_clipsql_finite", ""))
                            for x in defs), f.name


def test_scores_view_columns_are_the_spec_columns(con):
    cols = [c[0] for c in con.sql("SELECT * FROM scores LIMIT 0").description]
    assert cols == ["id", "model", "uri", "caption", *specs.SCORE_COLUMNS]
    assert list(specs.score_expressions("'m'")) == list(specs.SCORE_COLUMNS)
    assert specs.score_expressions("'m'", "clip")["neg_siglip_loss"] == "NULL::DOUBLE"
    assert specs.score_expressions("'m'", "siglip")["neg_siglip_loss"].startswith("neg_siglip_loss(")
    assert not set(specs.POOL_COLUMNS) & set(specs.SCORE_COLUMNS)


def test_overloads_from_args():
    f = specs.SqlFunction("importance_weight", ("emb", "prompt", "scale?10.0", "model?"), "_u")
    assert f.overloads() == [(["emb", "prompt"], ["emb", "prompt", "10.0", "NULL"]),
                             (["emb", "prompt", "scale"], ["emb", "prompt", "scale", "NULL"]),
                             (["emb", "prompt", "scale", "model"], ["emb", "prompt", "scale", "model"])]
    g = specs.SqlFunction("image_info_gain", ("emb", "'image'", "model?", "id?"), "_u")
    assert [p for p, _ in g.overloads()] == [["emb"], ["emb", "model"], ["emb", "model", "id"]]
    assert g.overloads()[0][1] == ["emb", "'image'", "NULL", "NULL"]


def test_specs_name_real_kernels_sections_and_needs():
    science = (ROOT / "docs" / "science.md").read_text()
    for s in specs.SPECS:
        for k in s.kernel:
            assert inspect.isfunction(getattr(kernels, k, None)), (s.key, k)
        if s.section:
            assert re.search(rf"^## {s.section[1:]}\. ", science, re.MULTILINE), (s.key, s.section)
        assert set(s.needs) <= set(specs.NEEDS), s.key
        assert s.usage and s.meaning and s.nulls, s.key
        assert s.functions or s.pool_columns, s.key
    names = [f.name for f in specs.FUNCTIONS] + list(specs.SCORE_COLUMNS) + list(specs.POOL_COLUMNS)
    assert len(set(specs.SCORE_COLUMNS)) == len(specs.SCORE_COLUMNS)
    assert len({f.name for f in specs.FUNCTIONS}) == len(specs.FUNCTIONS) and names


def test_sql_prompt_help_lists_every_function(con, monkeypatch, capsys):
    lines = iter([".help", ".quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    cli_query._repl(con)
    out = capsys.readouterr().out
    for f in specs.FUNCTIONS:
        assert f.name in out
    assert "docs/science.md §1" in out and "NULL when:" in out


# -- recipes declared once ---------------------------------------------------------------------
def test_recipe_specs_drive_the_cli_and_the_checks():
    from dataclasses import fields

    from clipsql.cli import Recipe
    from clipsql.errors import SelectionError
    from clipsql.queries.curation import selection as sel

    assert [r.value for r in Recipe] == list(sel.RECIPES) == list(sel.RECIPE_SPECS)
    names = {f.name for f in fields(sel.SelectSpec)}
    grouped = {f for g in sel.OPTION_GROUPS for f in g}
    for r in sel.RECIPE_SPECS.values():
        assert r.options <= names and callable(r.run) and r.pool_score, r.name
        assert r.help.split(",")[0] in sel.recipe_help()
    assert grouped <= {f for r in sel.RECIPE_SPECS.values() for f in r.options}
    assert sel.DEFAULT_FRACTION == {"kl-guided": 0.25, "negclip-normsim": 0.20, "clip-score": 0.30}
    cases = [(dict(recipe="image-based", target="t", fraction=0.1), "image-based keeps whole clusters"),
             (dict(recipe="clip-score", sample=3), "`clusters` and `sample` are only used by `recipe` image-based"),
             (dict(sql="SELECT 1", target="t"), "`target` is only used by `recipe` negclip-normsim and image-based"),
             (dict(recipe="kl-guided", threshold=0.2), "`threshold` is only used by `recipe` clip-score"),
             (dict(recipe="image-based"), "the image-based recipe needs `target` NAME")]
    for kw, msg in cases:
        with pytest.raises(SelectionError, match=re.escape(msg)):
            sel.SelectSpec(**kw).check()
    sel.SelectSpec(recipe="image-based", target="t", clusters=3, sample=10, seed=1).check()
    sel.SelectSpec(recipe="kl-guided", include_own_pair=True, seed=2).check()


def test_source_kinds_are_listed_only_by_the_registry():
    from clipsql.ingest import registry

    assert set(registry.DIRECTORY_ORDER) == {k for k, v in registry.REGISTRY.items() if v.directory}
    assert set(registry.FILE_ORDER) == {k for k, v in registry.REGISTRY.items() if v.file}
    assert len(registry.DIRECTORY_ORDER) == len(set(registry.DIRECTORY_ORDER))
    assert len(registry.FILE_ORDER) == len(set(registry.FILE_ORDER))
