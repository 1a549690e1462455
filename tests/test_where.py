"""Every `where` (delete, undelete, select, search, the app) is parsed as ONE SQL condition before it
runs: text that closes the parenthesis the library wraps it in (`1=0) OR (1=1`) once widened a
delete to every row."""
import pytest

from clipsql.errors import ClipsqlError, QueryError
from clipsql.queries.curation.delete import delete_where, undelete_where
from clipsql.queries.curation.selection import select
from clipsql.queries.search.command import search
from clipsql.queries.sql.condition import ConditionError, check_condition
from clipsql.store.store import Store

from conftest import MODEL, cli, sample_ids, write_pool

INJECTIONS = [
    "1=0) OR (1=1",
    ") OR (1=1",
    "true; DELETE FROM samples",
    "1=0) UNION SELECT * FROM samples WHERE (1=1",
    "1=0) ORDER BY (1",
    "1=0) GROUP BY (id",
    "1=0 --",
    "id = ?",
]
LEGIT = [
    ("caption LIKE '%000001)%' OR (id IN (SELECT id FROM samples WHERE meta_width < 3))", 3),   # ')' in a literal,
    ("(meta_width < 2) OR (caption = 'a photo number 000000007')", 3),                         # a subquery
    ("meta_width IN (10, 11) -- a comment inside the condition\n  AND true", 2),
]


@pytest.fixture(scope="module")
def pool_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("where")
    write_pool(tmp / "pool", shards=1, rows=40)
    st = Store.init(tmp / "s")
    cli("ingest", str(st.path), str(tmp / "pool"), *MODEL, "--id-column", "key", "--no-progress")
    return st.path


@pytest.mark.parametrize("text", INJECTIONS)
def test_check_condition_refuses_anything_but_one_condition(text):
    with pytest.raises(ConditionError) as e:
        check_condition(None, text)
    assert "\n" not in str(e.value) and "`where`" in str(e.value) and e.value.param == "where"
    assert isinstance(e.value, QueryError)


@pytest.mark.parametrize("text,_", LEGIT)
def test_check_condition_keeps_legitimate_conditions(text, _):
    assert check_condition(None, text) == text.strip()


def test_delete_where_injection_deletes_nothing(pool_store, tmp_path):
    st = Store.open(pool_store)
    before = sorted(sample_ids(st))
    for text in INJECTIONS:
        for dry in ((), ("--dry-run",)):
            p = cli("delete", str(pool_store), "--where", text, *dry, check=False)
            err = p.stderr.decode()
            assert p.returncode == 1, (text, p.stdout.decode())
            assert err.count("\n") == 1 and "--where" in err and "`where`" not in err and "Traceback" not in err
        with pytest.raises(ConditionError):
            delete_where(st, text)
    assert sorted(sample_ids(Store.open(pool_store))) == before
    for text in INJECTIONS:            # the deletions record is guarded the same way
        with pytest.raises(ConditionError):
            undelete_where(st, text, dry_run=True)
        p = cli("undelete", str(pool_store), "--where", text, "--dry-run", check=False)
        assert p.returncode == 1 and "--where" in p.stderr.decode()


def test_select_and_search_refuse_injections(pool_store, tmp_path):
    st = Store.open(pool_store)
    out = tmp_path / "ids.txt"
    for text in INJECTIONS:
        with pytest.raises(ClipsqlError, match="`where`"):
            select(st, recipe="clip-score", fraction=0.5, where=text, output=out)
        with pytest.raises(ConditionError, match="`where`"):
            search(st, like="000000001", k=5, where=text)
    assert not out.exists()
    p = cli("select", str(pool_store), "--recipe", "clip-score", "--fraction", "0.5", "--where", INJECTIONS[0],
            "--output", out, check=False)
    assert p.returncode == 1 and "--where takes one SQL condition" in p.stderr.decode() and not out.exists()
    p = cli("search", str(pool_store), "--like", "000000001", "--where", INJECTIONS[0], check=False)
    assert p.returncode == 1 and "--where takes one SQL condition" in p.stderr.decode()


def test_legitimate_conditions_still_select_the_same_rows(pool_store, tmp_path):
    st = Store.open(pool_store)
    for text, n in LEGIT:
        assert delete_where(st, text, dry_run=True).samples == n, text
        side = select(st, recipe="clip-score", fraction=1.0, where=text, output=tmp_path / "x.txt")
        assert side.counts["selected"] == n, text
        res = search(st, like="000000001", k=40, where=text)
        assert len(res.hits) == n, text


def test_delete_and_undelete_return_typed_results(pool_store):
    """delete_where / undelete_where return dataclasses (attributes, not string keys), with a
    JSON-ready to_dict."""
    import json
    from clipsql.store.deletions import RestoreResult
    from clipsql.store.manage import DeleteResult
    st = Store.open(pool_store)
    out = delete_where(st, "meta_width IN (10, 11)", dry_run=True)
    assert isinstance(out, DeleteResult) and out.dry_run and out.samples == 2 and out.stale_fits == []
    assert list(out.rows.values()) == [2] and out.recorded == 0
    assert json.loads(json.dumps(out.to_dict()))["samples"] == 2
    back = undelete_where(st, "id = 'none'", dry_run=True)
    assert isinstance(back, RestoreResult) and back.to_dict() == {"ids": 0, "units": 0, "sources": [],
                                                                  "dry_run": True}
