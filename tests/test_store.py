import sqlite3

import numpy as np
import pytest

from clipsql.store import catalog as cat
from clipsql.errors import DimensionMismatch, StoreLocked, StoreNotFound
from clipsql.kernels.moments import RunningMoments
from clipsql.store.runs import start_run
from clipsql.store.stats import saved_stats, sync_stats, uncovered_rows
from clipsql.store.store import Store
from clipsql.store.writer import write_batch


def test_init_creates_store_with_migrations(tmp_path):
    st = Store.init(tmp_path / "s")
    assert (tmp_path / "s" / "clipsql.json").exists()
    assert (tmp_path / "s" / "lance").is_dir()
    assert cat.schema_version(st.engine) == cat.SCHEMA_VERSION
    with sqlite3.connect(tmp_path / "s" / "catalog.sqlite") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == [m[0] for m in cat.MIGRATIONS]
    # re-init is harmless, re-open works
    Store.init(tmp_path / "s")
    assert Store.open(tmp_path / "s").list_models() == []


def test_open_missing_store_says_how_to_fix(tmp_path):
    with pytest.raises(StoreNotFound, match="clipsql init"):
        Store.open(tmp_path / "nope")


def test_init_refuses_non_empty_directory(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("hi")
    with pytest.raises(StoreNotFound):
        Store.init(tmp_path / "x")


def test_catalog_url_option(tmp_path):
    url = f"sqlite:///{tmp_path / 'elsewhere.sqlite'}"
    Store.init(tmp_path / "s", catalog_url=url)
    st = Store.open(tmp_path / "s")
    assert str(st.engine.url) == url
    assert (tmp_path / "elsewhere.sqlite").exists()
    assert not (tmp_path / "s" / "catalog.sqlite").exists()


def test_second_writer_gets_clear_error(store):
    with store.lock():
        with pytest.raises(StoreLocked, match="one writer per store"):
            with Store.open(store.path).lock():
                pass
    with store.lock():  # released
        pass


def test_register_model_refuses_dim_change(store):
    store.register_model(model_id="m", kind="clip", dim=8, logit_scale=100.0, logit_bias=None,
                         context_length=77, spec={})
    with pytest.raises(DimensionMismatch):
        store.register_model(model_id="m", kind="clip", dim=16, logit_scale=100.0, logit_bias=None,
                             context_length=77, spec={})


def test_write_batch_refuses_wrong_dim(store):
    rec = store.register_model(model_id="m", kind="clip", dim=8, logit_scale=100.0, logit_bias=None,
                               context_length=77, spec={})
    run = start_run(store.engine, "m", "src", "folder")
    with pytest.raises(DimensionMismatch, match="dim 8"):
        write_batch(store, rec, samples=None, ids=["a"], image=np.ones((1, 7)), text=np.ones((1, 7)), seq=1,
                          run_id=run, source="src", rejects=[], meta_types={})


def test_running_moments_shifted_sums_are_stable():
    rng = np.random.default_rng(0)
    X = 1e4 + rng.normal(size=(5000, 6)) * 1e-2     # mean ≫ spread: unshifted sums would lose ~8 digits
    rm = RunningMoments(6)
    for chunk in np.array_split(X, 17):
        rm.update(chunk)
    assert rm.n == 5000
    np.testing.assert_allclose(rm.mean, X.mean(0), rtol=1e-12)
    np.testing.assert_allclose(rm.cov, np.cov(X, rowvar=False, bias=True), rtol=1e-9, atol=0)
    np.testing.assert_allclose(rm.sum, X.sum(0), rtol=1e-12)


def test_stats_roundtrip_through_catalog(store):
    rec = store.register_model(model_id="m", kind="clip", dim=4, logit_scale=1.0, logit_bias=None,
                               context_length=None, spec={})
    rng = np.random.default_rng(1)
    img, txt = rng.normal(size=(10, 4)), rng.normal(size=(10, 4))
    run = start_run(store.engine, "m", "src", "precomputed")
    write_batch(store, rec, samples=None, ids=[str(i) for i in range(10)], image=img, text=txt, seq=1, run_id=run,
                      source="src", rejects=[], meta_types={})
    # nothing saved the statistics (as if killed right after the Lance commit): sync folds the batch in
    state = sync_stats(store, rec)
    assert state.n == 10 and state.covered_seq == 1
    again = saved_stats(store, rec)
    np.testing.assert_allclose(again.moments[("image", "raw")].mean, img.astype(np.float32).mean(0), rtol=1e-6)
    assert uncovered_rows(store, rec) == 0


@pytest.mark.parametrize("url, message", [
    ("postgresql+pg8000://u:secret@localhost/x", "needs the pg8000 driver, which is not installed: pip install"),
    ("postgresql+psycopg://u:secret@127.0.0.1:1/x", "cannot reach the catalog at postgresql\\+psycopg://u:\\*\\*\\*@"),
    ("nosuch://x", "unknown database dialect"),
    ("not a url", "is not a SQLAlchemy URL"),
])
def test_bad_catalog_url_is_a_clear_error_and_leaves_nothing_behind(tmp_path, url, message):
    from clipsql.errors import CatalogError
    with pytest.raises(CatalogError, match=message) as e:
        Store.init(tmp_path / "s", catalog_url=url)
    assert "secret" not in str(e.value)
    assert not (tmp_path / "s").exists()
    (tmp_path / "empty").mkdir()                       # an empty directory given: emptied again
    with pytest.raises(CatalogError):
        Store.init(tmp_path / "empty", catalog_url=url)
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


def test_one_catalog_database_holds_one_store(tmp_path, monkeypatch):
    from clipsql.errors import CatalogError
    url = f"sqlite:///{tmp_path / 'team.sqlite'}"
    first = Store.init(tmp_path / "a", catalog_url=url)
    first.register_model(model_id="m", kind="clip", dim=8, logit_scale=100.0, logit_bias=None,
                         context_length=77, spec={})
    with pytest.raises(CatalogError, match="already holds a store .*its own database"):
        Store.init(tmp_path / "b", catalog_url=url)
    assert not (tmp_path / "b").exists()
    assert [m.model_id for m in Store.open(tmp_path / "a").list_models()] == ["m"]
    # a store opened against another store's catalog is refused, not silently mixed
    Store.init(tmp_path / "c")
    monkeypatch.setenv("CLIPSQL_CATALOG_URL", url)
    with pytest.raises(CatalogError, match="belong to different stores"):
        Store.open(tmp_path / "c")
    assert Store.open(tmp_path / "a").list_models()[0].model_id == "m"
