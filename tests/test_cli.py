"""The CLI as a user drives it: exit codes, messages, formats."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipsql.cli import app

from conftest import write_image_folder

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("cli")
    data = write_image_folder(root / "data", 30)
    r = invoke("init", root / "s")
    assert r.exit_code == 0, r.output
    r = invoke("ingest", root / "s", data, "--model", tiny_model, "--workers", "0", "--no-progress",
               "--batch-size", "8")
    assert r.exit_code == 0, r.output
    assert "added 30" in r.output and "rows/s" in r.output
    r = invoke("stats", "fit", root / "s", "--reference-size", "20")
    assert r.exit_code == 0, r.output
    return root / "s"


def test_help_is_instant_and_imports_nothing_heavy():
    code = ("import sys; from clipsql import cli; from typer.testing import CliRunner; r = CliRunner().invoke(cli.app, ['--help']); "
            "assert r.exit_code == 0; heavy = [m for m in ('torch', 'open_clip', 'lancedb', 'duckdb') "
            "if m in sys.modules]; print(heavy)")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert time.perf_counter() - t0 < 10


def test_every_command_has_help():
    for cmd in (["init"], ["models"], ["ingest"], ["query"], ["sql"], ["stats", "show"], ["stats", "fit"],
                ["stats", "refresh"], ["score"], ["select"], ["target", "add"], ["target", "list"],
                ["target", "rm"], ["gallery"], ["plot"], ["geometry"], ["demo"]):
        r = invoke(*cmd, "--help")
        assert r.exit_code == 0 and "Usage" in r.output, cmd


def test_models_lists_the_model(cli_store):
    r = invoke("models", cli_store, "--format", "json")
    rows = json.loads(r.output)
    assert len(rows) == 1 and rows[0]["rows"] == 30 and rows[0]["dim"] == 16 and rows[0]["default"]


def test_rerun_adds_nothing(cli_store, tmp_path):
    data = write_image_folder(tmp_path / "data", 30)
    r = invoke("ingest", cli_store, data, "--workers", "0", "--no-progress", "--format", "json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output[r.output.index("{"):])
    assert summary["added"] == 0 and summary["skipped"] == 30


def test_query_formats(cli_store, tmp_path):
    sql = "SELECT uri, caption, image_info_gain FROM scores ORDER BY image_info_gain LIMIT 3"
    r = invoke("query", cli_store, sql)
    assert r.exit_code == 0, r.output
    assert "image_info_gain" in r.output and "(3 rows)" in r.output
    r = invoke("query", cli_store, sql, "--format", "json")
    assert len(json.loads(r.output)) == 3
    r = invoke("query", cli_store, sql, "--format", "csv")
    assert r.output.splitlines()[0].replace('"', "") == "uri,caption,image_info_gain"
    out = tmp_path / "x.parquet"
    r = invoke("query", cli_store, "SELECT * FROM embeddings", "--format", "parquet", "--output", out)
    assert r.exit_code == 0, r.output
    import pyarrow.parquet as pq
    assert pq.read_table(out).num_rows == 30


def test_sql_error_exits_1_with_duckdb_message(cli_store):
    r = invoke("query", cli_store, "SELEC nonsense")
    assert r.exit_code == 1
    assert "syntax error" in r.output.lower()


def test_unknown_model_exits_1_before_writing(tmp_path):
    invoke("init", tmp_path / "s")
    data = write_image_folder(tmp_path / "d", 3)
    r = invoke("ingest", tmp_path / "s", data, "--model", "ViT-Q-99")
    assert r.exit_code == 1 and "unknown model" in r.output
    r = invoke("models", tmp_path / "s", "--format", "json")
    assert json.loads(r.output) == []


def test_missing_store_exits_1(tmp_path):
    r = invoke("query", tmp_path / "nothing", "SELECT 1")
    assert r.exit_code == 1 and "clipsql init" in r.output


def test_stats_show_json_and_refresh(cli_store):
    r = invoke("stats", "show", cli_store, "--format", "json")
    rep = json.loads(r.output)
    assert rep["current"] and rep["modalities"]["image"]["n"] == 30 and rep["fit"]["reference_size"] == 20
    r = invoke("stats", "refresh", cli_store)
    assert r.exit_code == 0 and "30 rows" in r.output


def test_rejects_view(tmp_path, tiny_model):
    invoke("init", tmp_path / "s")
    data = write_image_folder(tmp_path / "d", 3)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (data / "broken.txt").write_text("broken")
    r = invoke("ingest", tmp_path / "s", data, "--model", tiny_model, "--workers", "0", "--no-progress")
    assert r.exit_code == 0 and "corrupt_image" in r.output
    r = invoke("query", tmp_path / "s", "SELECT reason FROM rejects", "--format", "json")
    assert json.loads(r.output) == [{"reason": "corrupt_image"}]


def test_interactive_sql_prompt(cli_store):
    r = runner.invoke(app, ["sql", str(cli_store)],
                      input="SELECT count(*) AS n\nFROM samples;\nSELEC broken;\n.quit\n")
    assert r.exit_code == 0, r.output
    assert "30" in r.output and "(1 rows)" in r.output
    assert "Error:" in r.output          # a bad statement reports and the prompt goes on


# -- issue 10 items 5–7, 11: the SQL prompt, cancelling, clean errors ------------------------
def test_sql_prompt_reports_errors_raised_while_a_query_runs(tmp_path, tiny_model):
    invoke("init", tmp_path / "s")
    data = write_image_folder(tmp_path / "d", 4)
    invoke("ingest", tmp_path / "s", data, "--model", tiny_model, "--workers", "0", "--no-progress")
    # no `stats fit` yet: the score function raises inside DuckDB; then a cast error; then a last
    # statement without ';' that runs at end of input
    r = runner.invoke(app, ["sql", str(tmp_path / "s")],
                      input="SELECT image_info_gain(image_embedding) FROM embeddings;\n"
                            "SELECT CAST(caption AS INTEGER) FROM samples;\nSELECT 40 + 2 AS answer\n")
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output
    assert "Error: no fitted statistics for model" in r.output          # the clipsql message alone
    assert "Python exception occurred" not in r.output
    assert "Error: Conversion Error" in r.output
    assert "42" in r.output


def test_query_errors_name_the_fix(tmp_path, tiny_model):
    invoke("init", tmp_path / "empty")
    r = invoke("query", tmp_path / "empty", "SELECT * FROM scores")
    assert r.exit_code == 1 and "no models yet: ingest data first" in r.output
    invoke("init", tmp_path / "s")
    data = write_image_folder(tmp_path / "d", 3)
    invoke("ingest", tmp_path / "s", data, "--model", tiny_model, "--workers", "0", "--no-progress")
    r = invoke("query", tmp_path / "s", "SELECT text_info_gain(text_embedding) FROM embeddings")
    assert r.exit_code == 1 and "Python exception" not in r.output and "clipsql stats fit" in r.output
    r = invoke("query", tmp_path / "s", f"COPY samples TO '{tmp_path / 'out.csv'}'")
    assert r.exit_code == 1 and "--allow-external-access" in r.output
    assert not (tmp_path / "out.csv").exists()


def test_sigint_cancels_a_long_query_promptly(cli_store):
    p = subprocess.Popen([sys.executable, "-m", "clipsql", "query", str(cli_store),
                          "SELECT sum(a.range * b.range) FROM range(100000) a, range(1000000) b"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(4)                    # imports, connect, and the query is running
    assert p.poll() is None
    t0 = time.time()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130, err.decode()
    assert time.time() - t0 < 5
    assert b"query cancelled" in err and b"Traceback" not in err


def test_ctrl_c_in_the_prompt_cancels_the_query_and_keeps_the_prompt(cli_store, capsys, monkeypatch):
    import threading

    from clipsql.queries.sql.cli_query import repl
    lines = iter(["SELECT sum(a.range * b.range) FROM range(100000) a, range(1000000) b;", "SELECT 7 * 6 AS x;"])

    def fake_input(prompt=""):
        line = next(lines, None)
        if line is None:
            raise EOFError
        if "range" in line:
            threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        return line
    monkeypatch.setattr("builtins.input", fake_input)
    t0 = time.time()
    repl(cli_store)
    out = capsys.readouterr().out
    assert "cancelled" in out and "42" in out
    assert time.time() - t0 < 20


def test_init_errors_are_one_line(tmp_path):
    """Issue 10.10: tracebacks for /proc/x and a file; --catalog silently ignored on an existing store."""
    r = invoke("init", "/proc/x/store")
    assert r.exit_code == 1 and "cannot create the store directory" in r.output and "Traceback" not in r.output
    f = tmp_path / "some-file.py"
    f.write_text("print(1)\n")
    r = invoke("init", f)
    assert r.exit_code == 1 and "is a file, not a directory" in r.output
    assert invoke("init", tmp_path / "s").exit_code == 0
    r = invoke("init", tmp_path / "s", "--catalog", f"sqlite:///{tmp_path / 'other.sqlite'}")
    assert r.exit_code == 1 and "already a store" in r.output and "CLIPSQL_CATALOG_URL" in r.output
    assert invoke("init", tmp_path / "s").exit_code == 0          # re-running init is still fine


def test_small_messages_say_what_to_do(tmp_path, cli_store):
    """Issue 10.12 (part): `score` without columns, a misspelt bundled model, the MySQL driver hint."""
    r = invoke("score", cli_store)
    assert r.exit_code == 1 and "[]" not in r.output and "name the scores to store: --columns" in r.output
    invoke("init", tmp_path / "s")
    r = invoke("ingest", tmp_path / "s", tmp_path, "--model", "clipsql-dmeo", "--no-progress")
    assert r.exit_code == 1 and "Did you mean: clipsql-demo" in r.output
    import builtins
    from unittest import mock

    from clipsql.store.catalog import make_engine
    from clipsql.errors import CatalogError
    real = builtins.__import__

    def no_mysqldb(name, *a, **k):
        if name == "MySQLdb":
            raise ImportError("No module named 'MySQLdb'", name="MySQLdb")
        return real(name, *a, **k)
    with mock.patch("builtins.__import__", no_mysqldb), pytest.raises(CatalogError, match="pip install 'mysqlclient'"):
        make_engine("mysql://u:p@localhost/db")


def test_help_texts_explain_themselves_without_science_md():
    """Issue 10.12: a clone has no SCIENCE.md, so no --help may send the reader there."""
    import re
    from typer.testing import CliRunner
    from clipsql.cli import app
    runner = CliRunner()
    commands = ["", "init", "models", "models list", "models default", "models rm", "ingest", "delete", "undelete",
                "optimize", "stats", "stats show", "stats refresh", "stats fit", "query", "sql", "score", "target add",
                "target list", "target rm", "select", "gallery", "plot", "geometry", "demo"]
    for c in commands:
        res = runner.invoke(app, [*c.split(), "--help"])
        assert res.exit_code == 0, (c, res.output)
        assert not re.search(r"SCIENCE|§", res.output), (c, res.output)
    assert "offset ratio" in runner.invoke(app, ["geometry", "--help"]).output


def test_precomputed_without_model_is_refused_and_score_prints_no_lance_warning(tmp_path):
    """Issue 10.12: precomputed vectors are never filed under the demo model because no --model was
    given (even when the dimension matches); 10.12/11.20: no Lance WARN line on the first `score`."""
    from test_ledger import MODEL, cli as run
    import test_ledger as tl
    pool = tmp_path / "pool"
    old = tl.D
    tl.D = 64                                   # the demo model's dimension
    try:
        tl.write_pool(pool, shards=1, rows=100)
    finally:
        tl.D = old
    st = tmp_path / "s"
    run("init", str(st))
    p = run("ingest", str(st), str(pool), "--no-progress", check=False)
    assert p.returncode == 1 and "name the model that made them" in p.stderr.decode()
    assert "Traceback" not in p.stderr.decode()
    pool512 = tmp_path / "pool512"
    tl.write_pool(pool512, shards=1, rows=100)
    run("ingest", str(st), str(pool512), *MODEL, "--no-progress")
    run("stats", "fit", str(st), "--reference-size", "50")
    p = run("score", str(st), "--columns", "image_info_gain")
    assert "WARN" not in p.stderr.decode() and "lance" not in p.stderr.decode().lower(), p.stderr.decode()
