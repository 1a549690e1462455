"""Settings, notes and messages a user meets: bad CLIPSQL_* values are refused naming the variable,
renamed metadata columns are noted, help and hints name real flags."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipsql.errors import SettingError, env_number
from clipsql.store.store import Store
from clipsql.store.tables import metadata_aliases

from conftest import MODEL, cli, write_pool


@pytest.fixture(scope="module")
def pool_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("messages")
    write_pool(tmp / "pool", shards=1, rows=30)
    st = Store.init(tmp / "s")
    cli("ingest", str(st.path), str(tmp / "pool"), *MODEL, "--id-column", "key", "--no-progress")
    return st.path


def test_env_number_refuses_bad_values_naming_the_variable():
    assert env_number("X", 8.0, environ={}) == 8.0 and env_number("X", 8.0, environ={"X": " "}) == 8.0
    assert env_number("X", 8.0, environ={"X": "0"}) == 0.0
    for raw in ("abc", "-1", "nan", "inf"):
        with pytest.raises(SettingError, match=r"^X must be a number ≥ 0; got"):
            env_number("X", 8.0, environ={"X": raw})
    with pytest.raises(SettingError, match=r"^L must be a number > 0; got '0'"):
        env_number("L", 30.0, above=True, environ={"L": "0"})


@pytest.mark.parametrize("name,value,args", [
    ("CLIPSQL_SPILL_GB", "abc", ("query", "{s}", "SELECT 1")),
    ("CLIPSQL_SPILL_GB", "-1", ("query", "{s}", "SELECT 1")),
    ("CLIPSQL_LEASE_SECONDS", "-5", ("delete", "{s}", "--where", "id = 'none'")),
])
def test_invalid_settings_are_refused_in_one_line(pool_store, name, value, args):
    p = cli(*[a.format(s=pool_store) for a in args], env={name: value}, check=False)
    err = p.stderr.decode()
    assert p.returncode == 1 and err.count("\n") == 1 and err.startswith(f"Error: {name} must be"), err


def test_metadata_columns_differing_only_in_case_get_a_note(tmp_path):
    write_pool(tmp_path / "pool", shards=1, rows=20)
    meta = tmp_path / "pool" / "metadata" / "metadata_0.parquet"
    t = pq.read_table(meta)
    t = t.append_column("Kind", pa.array(["photo"] * 20)).append_column("kind", pa.array(["art"] * 20))
    pq.write_table(t, meta)
    st = Store.init(tmp_path / "s")
    out = cli("ingest", str(st.path), str(tmp_path / "pool"), *MODEL, "--id-column", "key",
              "--no-progress").stdout.decode()
    assert "note: metadata column 'kind' is 'kind_1' in the samples view" in out, out
    got = cli("query", str(st.path), 'SELECT DISTINCT "Kind", kind_1 FROM samples', "--format", "csv").stdout
    assert got.decode().replace('"', "").split() == ["Kind,kind_1", "photo,art"]


def test_metadata_aliases_ignore_case_like_sql():
    got = metadata_aliases(["Kind", "kind", "ID", "Source", "note"])
    assert got == {"Kind": "Kind", "kind": "kind_1", "ID": "meta_ID", "Source": "meta_Source", "note": "note"}


def test_the_rejects_hint_only_with_rejects_and_with_the_real_store_path(tmp_path):
    write_pool(tmp_path / "pool", shards=1, rows=20)
    st = Store.init(tmp_path / "my store")
    out = cli("ingest", str(st.path), str(tmp_path / "pool"), *MODEL, "--id-column", "key",
              "--no-progress").stdout.decode()
    assert "rejected 0" in out and "see rejects" not in out and "STORE" not in out, out
    write_pool(tmp_path / "pool2", shards=1, rows=20)
    emb = tmp_path / "pool2" / "img_emb" / "img_emb_0.npy"
    X = np.load(emb)
    X[3] = np.nan                                           # one row rejected
    np.save(emb, X)
    st2 = Store.init(tmp_path / "other store")
    out = cli("ingest", str(st2.path), str(tmp_path / "pool2"), *MODEL, "--id-column", "key",
              "--no-progress").stdout.decode()
    line = [ln for ln in out.splitlines() if ln.startswith("see rejects with:")]
    assert line and f"clipsql query '{st2.path}' " in line[0] and "FROM rejects WHERE run_id = 1" in line[0], out


def test_a_missing_column_names_the_flag(tmp_path):
    t = tmp_path / "t.csv"
    t.write_text("path,caption\nx.png,a cat\n")
    st = Store.init(tmp_path / "s")
    p = cli("ingest", str(st.path), str(t), *MODEL, "--no-progress", check=False)
    err = p.stderr.decode()
    assert p.returncode == 1 and "set --image-column to the column that holds the image paths" in err, err


def test_target_add_from_a_datacomp_pool_takes_the_features_of_the_targets_model(tmp_path):
    from datacomp_pool import write_datacomp_pool
    write_datacomp_pool(tmp_path / "pool", n_shards=1, rows=[12], row_group_size=12)
    write_datacomp_pool(tmp_path / "target", n_shards=1, rows=[6], row_group_size=6, seed=5)
    st = Store.init(tmp_path / "s")
    cli("ingest", str(st.path), str(tmp_path / "pool"), "--no-progress")
    out = cli("target", "add", str(st.path), "t", str(tmp_path / "target"), "--model", "ViT-L-14/openai").stdout
    assert "target t of ViT-L-14/openai: 6 rows" in out.decode()
    write_pool(tmp_path / "other", shards=1, rows=20)
    cli("ingest", str(st.path), str(tmp_path / "other"), *MODEL, "--id-column", "key", "--no-progress")
    p = cli("target", "add", str(st.path), "u", str(tmp_path / "target"), "--model", "laion", check=False)
    err = p.stderr.decode()
    assert p.returncode == 1 and "--datacomp-features" not in err and "with --model set to one of them" in err, err


def test_target_query_over_several_models_suggests_the_model_filter(tmp_path):
    """The README's `target add --query "SELECT image_embedding FROM embeddings JOIN samples …"` on
    a store with a 512-d and a 768-d model returns both models' rows: the error says how to keep
    the target model's (`AND model = '…'`), naming --model, not an API argument."""
    from datacomp_pool import write_datacomp_pool
    write_datacomp_pool(tmp_path / "pool", n_shards=1, rows=[12], row_group_size=12)
    st = Store.init(tmp_path / "s")
    cli("ingest", str(st.path), str(tmp_path / "pool"), "--no-progress")
    q = "SELECT image_embedding FROM embeddings JOIN samples USING (id) WHERE source LIKE '%pool%'"
    p = cli("target", "add", str(st.path), "t", "--query", q, "--model", "ViT-B-32/openai", check=False)
    err = p.stderr.decode()
    assert p.returncode == 1 and err.count("\n") == 1, err
    assert "768 dimensions but the model has 512" in err and "AND model = 'ViT-B-32/openai'" in err, err
    assert "--model" in err and "`model`" not in err, err
    out = cli("target", "add", str(st.path), "t", "--query", q + " AND model = 'ViT-B-32/openai'",
              "--model", "ViT-B-32/openai").stdout.decode()
    assert "target t of ViT-B-32/openai: 12 rows" in out, out


def test_library_errors_name_arguments_and_the_cli_names_flags(pool_store):
    """A library caller reads its own argument names (`fraction`, `features`), with `param` set; the
    CLI shows the flag (--fraction, --datacomp-features; --for-recipe where `stats fit` names the
    fit_stats argument `recipe` differently)."""
    from clipsql.cli import PARAM_FLAGS
    from clipsql.engines import choose
    from clipsql.errors import ClipsqlError, SelectionError, SourceError
    from clipsql.ingest.datacomp import pick_features
    from clipsql.queries.curation.selection import SelectSpec
    cases = [(lambda: SelectSpec(recipe="kl-guided", fraction=1.5).check(), SelectionError, "fraction",
              "`fraction` must be in (0, 1]; got 1.5", "--fraction must be in (0, 1]; got 1.5"),
             (lambda: SelectSpec(recipe="clip-score", sample=3).check(), SelectionError, "clusters",
              "`clusters` and `sample` are only used by `recipe` image-based",
              "--clusters and --sample are only used by --recipe image-based"),
             (lambda: pick_features("b16"), SourceError, "features",
              "unknown `features` 'b16'; choose b32, l14 or all", "unknown --datacomp-features 'b16'; choose b32, l14 or all"),
             (lambda: choose("spark"), ClipsqlError, "engine",
              "`engine` must be one of local, ray; got 'spark'", "--engine must be one of local, ray; got 'spark'")]
    for call, kind, param, api, flags in cases:
        with pytest.raises(kind) as e:
            call()
        assert e.value.param == param and str(e.value) == api and e.value.message(PARAM_FLAGS) == flags
    p = cli("stats", "fit", str(pool_store), "--for-recipe", "nope", check=False)
    err = p.stderr.decode()
    assert p.returncode == 1 and err.startswith("Error: --for-recipe must be one of") and "`" not in err, err
    p = cli("select", str(pool_store), "--recipe", "clip-score", "--clusters", "3", "-o", "x.parquet", check=False)
    err = p.stderr.decode()
    assert p.returncode == 1 and err == "Error: --clusters and --sample are only used by --recipe image-based\n", err


def test_no_library_error_message_spells_a_cli_flag():
    """Library messages name arguments (`where`), never flags (`--where`): only the CLI knows its
    flags. Commands to run (`clipsql stats fit STORE --model …`) may name flags."""
    import re
    from conftest import ROOT
    flag_first = re.compile(r'(?:Error|Mismatch|Damaged)\(\s*f?"(?:[^"`]*?\s)?--[a-z]')
    found = []
    for folder in ("queries", "store", "ingest", "models", "kernels", "engines"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            found += [f"{rel}: {m.group(0)}" for m in flag_first.finditer(path.read_text())]
    assert not found, found
