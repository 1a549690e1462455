"""The CLI as a user drives it: exit codes, messages, formats, Ctrl-C."""
import json
import os
import signal
import subprocess
import sys
import threading

import pytest
from typer.testing import CliRunner

from clipsql.cli import app

from conftest import MODEL, ROOT, cli, wait_for, write_image_folder, write_pool

runner = CliRunner()


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


def test_help_imports_nothing_heavy():
    """--help is instant because it imports none of the heavy libraries (what is checked: the
    imports, not a time)."""
    code = ("import sys; from clipsql import cli; from typer.testing import CliRunner; r = CliRunner().invoke(cli.app, ['--help']); "
            "assert r.exit_code == 0; heavy = [m for m in ('torch', 'open_clip', 'lancedb', 'duckdb') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         timeout=300)
    assert out.stdout.strip() == "[]"


def test_every_command_has_help():
    for cmd in (["init"], ["models"], ["ingest"], ["query"], ["sql"], ["stats", "show"], ["stats", "fit"],
                ["stats", "refresh"], ["score"], ["select"], ["target", "add"], ["target", "list"],
                ["target", "rm"], ["gallery"], ["plot"], ["geometry"], ["demo"], ["serve"]):
        r = invoke(*cmd, "--help")
        assert r.exit_code == 0 and "Usage" in r.output, cmd


def test_help_is_readable_at_80_columns():
    """At 80 columns every command's help keeps option names whole (no `--datacomp-featur…`, no
    `--id-` / `column` split), shows no Python-type placeholders (`<bool>`, `<str>`), names the
    arguments upper-case in the usage line (`STORE SOURCE`, not `{store} {source}`) and fits in
    80 columns."""
    import re
    import typer.main
    root = typer.main.get_command(app)

    def check(cmd, path):
        out = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"}).output
        assert "Usage:" in out, path
        raw = " ".join(filter(None, [cmd.help, getattr(cmd, "epilog", None)]
                              + [getattr(p, "help", None) for p in getattr(cmd, "params", [])]))
        for line in out.splitlines():
            assert len(line) <= 80, (path, line)
            assert not re.search(r"<(bool|str|int|float|path|text)\b", line, re.I), (path, line)
            for cut in re.findall(r"\S*\w…", line):             # an ellipsis the help text itself has
                assert cut.lstrip("(") in raw, (path, line)
        assert "{" not in out.split("\n\n")[0], (path, out)
        for p in getattr(cmd, "params", []):
            if p.param_type_name == "argument":
                assert p.name.upper() in out.splitlines()[0], (path, p.name)
            for opt in [*p.opts, *getattr(p, "secondary_opts", [])]:
                if p.param_type_name == "option":
                    assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", out), (path, opt, out)
        for name, sub in getattr(cmd, "commands", {}).items():
            check(sub, [*path, name])

    check(root, [])
    out = runner.invoke(app, ["ingest", "--help"], env={"COLUMNS": "80"}).output
    assert "[OPTIONS] STORE SOURCE" in out and "--datacomp-features FEATURES" in out and "--batch-size N" in out
    assert "--checkpoint PATH" in out and "--format [table|json]" in out and "webdataset" in out


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


_EXIT_PROBE = """
import atexit, sys, threading
from pathlib import Path
from clipsql import cli
mark = Path(sys.argv[1])
atexit.register(lambda: mark.write_text(mark.read_text() + "atexit;"))
if sys.argv[2] == "thread":        # a Python thread still running when the command returns
    ev = threading.Event()
    def late():
        ev.wait()
        mark.write_text(mark.read_text() + "thread;")
    threading.Thread(target=late).start()
    fast_exit = cli._exit_now
    def released(code):
        fast_exit(code)            # returns only where it does not end the process
        ev.set()
    cli._exit_now = released
sys.argv = ["clipsql", "query", sys.argv[3], sys.argv[4], "--format", "json"]
cli.main()
"""


@pytest.mark.parametrize("sql,code", [("SELECT 42 AS x", 0), ("SELECT nope", 1)])
def test_the_console_entry_ends_with_exit_handlers_run_output_flushed_and_its_exit_code(cli_store, tmp_path, sql, code):
    """main() skips the interpreter's finalization once the command is done, but only after the
    atexit handlers ran and both streams were flushed, keeping the command's exit code; with a
    Python thread still running it exits the normal way (the thread finishes first)."""
    for mode in ("plain", "thread"):
        mark = tmp_path / f"mark-{mode}-{code}"
        mark.write_text("")
        out = subprocess.run([sys.executable, "-c", _EXIT_PROBE, str(mark), mode, str(cli_store), sql],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == code, out.stderr[-3000:]
        if code == 0:
            assert json.loads(out.stdout) == [{"x": 42}]
        else:
            assert out.stderr.startswith("Error: ") and "Traceback" not in out.stderr, out.stderr
        assert mark.read_text() == ("atexit;" if mode == "plain" else "thread;atexit;"), mode


def test_a_query_that_reads_no_table_imports_nothing_heavy(cli_store):
    """`clipsql query STORE "SELECT 1"` (a fresh process's fixed cost) opens no Lance table and imports
    neither the model libraries nor Lance (nor pandas, which pyarrow's datasets import), Pillow, nor
    the pydantic that typer 0.29 imports to parse arguments; a query over
    a view still opens what it reads. What is checked: the imports, not a time."""
    heavy = ("torch", "open_clip", "ray", "matplotlib", "lance", "lancedb", "pandas", "PIL", "pydantic")
    code = ("import atexit, runpy, sys; sys.argv = ['clipsql', 'query', sys.argv[1], sys.argv[2], '--format', 'json']\n"
            f"atexit.register(lambda: print(sorted(m for m in {heavy!r} if m in sys.modules), file=sys.stderr))\n"
            "runpy.run_module('clipsql', run_name='__main__')")
    run = [sys.executable, "-c", code, str(cli_store)]
    out = subprocess.run([*run, "SELECT 1 AS one"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout) == [{"one": 1}]
    assert out.stderr.strip().splitlines()[-1] == "[]", out.stderr
    out = subprocess.run([*run, "SELECT (SELECT count(*) FROM samples) AS n"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout) == [{"n": 30}] and "lance" in out.stderr.splitlines()[-1]


def test_reads_no_table_is_the_parsers_word():
    from clipsql.queries.sql.db import reads_no_table
    assert reads_no_table("SELECT 1") and reads_no_table("SELECT 1 + 2 AS x, [1, 2], lower('A')")
    for sql in ["SELECT * FROM samples", "SELECT (SELECT count(*) FROM scores)", "SELECT * FROM duckdb_views()",
                "SHOW TABLES", "DESCRIBE samples", "WITH a AS (SELECT 1) SELECT * FROM a",
                "SELECT * FROM (VALUES (1)) t(x)", "COPY (SELECT 1) TO 'x.csv'", "SELEC nonsense",
                "SELECT 1 WHERE 1 IN (SELECT id FROM tags)"]:
        assert not reads_no_table(sql), sql


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


# -- the SQL prompt, cancelling, clean errors ------------------------
def test_sql_prompt_reports_errors_raised_while_a_query_runs(tmp_path, tiny_model):
    invoke("init", tmp_path / "s")
    data = write_image_folder(tmp_path / "d", 4)
    invoke("ingest", tmp_path / "s", data, "--model", tiny_model, "--workers", "0", "--no-progress")
    # no `stats fit` yet: the score function raises inside DuckDB; then a cast error; then a
    # statement that still runs after both
    r = runner.invoke(app, ["sql", str(tmp_path / "s")],
                      input="SELECT image_info_gain(image_embedding) FROM embeddings;\n"
                            "SELECT CAST(caption AS INTEGER) FROM samples;\nSELECT 40 + 2 AS answer;\n")
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output
    assert "Error: no fitted statistics for model" in r.output          # the clipsql message alone
    assert "Python exception occurred" not in r.output
    assert "Error: Conversion Error" in r.output
    assert "42" in r.output


def test_score_function_errors_are_the_librarys_own_line_in_every_command(tmp_path, tiny_model):
    """A score function's error raised inside DuckDB reached the user in DuckDB's words ("selection
    failed: Invalid Input Error: Python exception occurred while executing the UDF: StatsError: …");
    every command now shows clipsql's own message alone."""
    invoke("init", tmp_path / "s")
    data = write_image_folder(tmp_path / "d", 4)
    invoke("ingest", tmp_path / "s", data, "--model", tiny_model, "--workers", "0", "--no-progress")
    s, gain = tmp_path / "s", "image_info_gain(image_embedding)"     # no `stats fit` yet
    for args in (("select", s, "--sql", "SELECT id FROM scores ORDER BY image_info_gain", "-o", tmp_path / "a.txt"),
                 ("select", s, "--sql", "SELECT id FROM samples", "--where", f"id IN (SELECT id FROM embeddings "
                  f"WHERE {gain} > 0)", "-o", tmp_path / "b.txt"),
                 ("select", s, "--recipe", "clip-score", "--where", f"id IN (SELECT id FROM embeddings "
                  f"WHERE {gain} > 0)", "-o", tmp_path / "c.txt"),
                 ("target", "add", s, "t", "--query", f"SELECT image_embedding FROM embeddings WHERE {gain} > 0"),
                 ("plot", s, "hist", "image_info_gain", "-o", tmp_path / "p.png"),
                 ("gallery", s, "SELECT id, image_info_gain FROM scores", "-o", tmp_path / "g.html"),
                 ("query", s, f"SELECT {gain} FROM embeddings")):
        r = invoke(*args)
        lines = [x for x in r.output.splitlines() if x.strip()]
        assert r.exit_code == 1, (args, r.output)
        assert lines == [lines[0]] and lines[0].startswith("Error: no fitted statistics for model"), (args, r.output)


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


# A query that runs for many minutes unless it is cancelled.
LONG_QUERY = "SELECT sum(a.range * b.range) FROM range(100000) a, range(1000000) b"

# Loaded (as sitecustomize) by the `python -m clipsql` processes below, before anything of clipsql:
# it writes a line to CLIPSQL_PROBE_MARKER when the process reaches the point a test waits for,
# so that the test sends its SIGINT at that point, not after a guessed time. At
# CLIPSQL_PROBE_BLOCK_IMPORT it holds the import of that module until the signal arrives; at
# CLIPSQL_PROBE_THREAD it marks the start of the thread of that name. Test code, not clipsql's.
PROBE = """
import os, sys, threading, time
_marker = os.environ["CLIPSQL_PROBE_MARKER"]
_block, _thread = os.environ.get("CLIPSQL_PROBE_BLOCK_IMPORT"), os.environ.get("CLIPSQL_PROBE_THREAD")

def _mark(what):
    with open(_marker, "a") as f:
        f.write(what + "\\n")

class _Hold:
    def find_spec(self, name, path=None, target=None):
        if name == _block:
            sys.meta_path.remove(self)
            _mark("importing " + name)
            for _ in range(6000):             # the test's SIGINT ends the wait (10 minutes at most)
                time.sleep(0.1)
        return None

if _block:
    sys.meta_path.insert(0, _Hold())
if _thread:
    _start = threading.Thread.start

    def _marked_start(self, *args, **kwargs):
        _start(self, *args, **kwargs)
        if self.name == _thread:
            _mark("started " + self.name)
    threading.Thread.start = _marked_start
"""


def probed_clipsql(tmp_path, args, **probe):
    """`python -m clipsql ARGS` with the probe; returns (process, marker file)."""
    folder = tmp_path / "probe"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(PROBE)
    marker = folder / "marker"
    env = dict(os.environ, CLIPSQL_PROBE_MARKER=str(marker),
               PYTHONPATH=os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])]),
               **{f"CLIPSQL_PROBE_{k.upper()}": v for k, v in probe.items()})
    p = subprocess.Popen([sys.executable, "-m", "clipsql", *map(str, args)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return p, marker


def interrupt_at_marker(p, marker):
    """SIGINT once the probe has marked its point; (returncode, stderr). The deadlines guard a hang."""
    try:
        wait_for(lambda: p.poll() is not None or marker.exists() and marker.read_text().endswith("\n"),
                 "the probe's marker", deadline=300)
        assert p.poll() is None, p.communicate()[1].decode()
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    return p.returncode, err.decode()


def test_sigint_cancels_a_long_query(cli_store, tmp_path):
    """SIGINT once the query runs (its thread has started): cancelled, exit 130, one line."""
    p, marker = probed_clipsql(tmp_path, ["query", cli_store, LONG_QUERY], thread="clipsql-query")
    rc, err = interrupt_at_marker(p, marker)
    assert marker.read_text() == "started clipsql-query\n"
    assert rc == 130, err
    assert "query cancelled" in err and "Traceback" not in err


@pytest.mark.parametrize("module", ["clipsql.cli", "clipsql.queries.sql.cli_query"],
                         ids=["importing-the-cli", "in-the-command-before-the-query"])
def test_sigint_during_start_up_is_one_line_and_exit_130(cli_store, tmp_path, module):
    """SIGINT before the query starts: while `python -m clipsql` imports its command line (a
    traceback and a death by signal before), or inside the command before its library call (exit
    130 without a word before): exit 130 and one line saying it was interrupted."""
    p, marker = probed_clipsql(tmp_path, ["query", cli_store, LONG_QUERY], block_import=module)
    rc, err = interrupt_at_marker(p, marker)
    assert marker.read_text() == f"importing {module}\n"
    assert rc == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert [line for line in err.splitlines() if line.strip()] == ["Error: interrupted"], err


def test_ctrl_c_in_the_prompt_cancels_the_query_and_keeps_the_prompt(cli_store, capsys, monkeypatch):
    """The SIGINT comes once the query's thread is running (not after a guessed time)."""
    from clipsql.queries.sql.cli_query import repl
    lines = iter([LONG_QUERY + ";", "SELECT 7 * 6 AS x;"])
    sent = []

    def interrupt_the_query():
        wait_for(lambda: any(t.name == "clipsql-query" for t in threading.enumerate()), "the query's thread",
                 deadline=300)
        sent.append(True)
        os.kill(os.getpid(), signal.SIGINT)

    def fake_input(prompt=""):
        line = next(lines, None)
        if line is None:
            raise EOFError
        if "range" in line:
            threading.Thread(target=interrupt_the_query, daemon=True).start()
        return line
    monkeypatch.setattr("builtins.input", fake_input)
    repl(cli_store)
    out = capsys.readouterr().out
    assert sent and "cancelled" in out and "42" in out


def test_sql_prompt_dot_commands_and_eof_on_an_unfinished_statement(cli_store):
    """`clipsql sql STORE` fed on stdin: .tables lists the views a user queries (not the internal
    `_lance_*` ones), .schema NAME gives columns and types, .help lists the dot commands too, an
    unknown dot command says so; Ctrl-D (end of input) on a continuation line drops the unfinished
    statement with a note instead of running it (a DELETE-like statement half typed must not run)."""
    script = "\n".join([".tables", ".schema samples", ".schema nope", ".bogus", ".help",
                        "CREATE TEMP TABLE mine AS SELECT 41 AS x;", ".tables", "SELECT x + 1 AS answer",
                        "FROM mine"]) + "\n"
    p = subprocess.run([sys.executable, "-m", "clipsql", "sql", str(cli_store)], input=script, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    out = p.stdout
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    tables = out.split("sql> ")[1]
    for view in ("samples", "embeddings", "scores", "stats", "rejects"):
        assert f"{view} " in tables and "view" in tables, tables
    assert "_lance" not in out and "mine" not in tables
    schema = out.split("sql> ")[2]
    assert schema.startswith("samples:") and "id" in schema and "VARCHAR" in schema and "caption" in schema
    assert "no table or view named 'nope'" in out and "unknown command .bogus" in out
    help_ = out.split("sql> ")[5]
    assert ".tables" in help_ and ".schema" in help_ and ".quit" in help_ and "image_info_gain" in help_
    assert "mine" in out.split("sql> ")[7]
    assert "42" not in out and "answer" not in out, out
    assert "the unfinished statement was not run" in out, out


def test_init_errors_are_one_line(tmp_path):
    """tracebacks for /proc/x and a file; --catalog silently ignored on an existing store."""
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
    """`score` without columns, a misspelt bundled model, the MySQL driver hint."""
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
    """No --help sends the reader to a document outside the repository."""
    import re
    from typer.testing import CliRunner
    from clipsql.cli import app
    runner = CliRunner()
    commands = ["", "init", "models", "models list", "models default", "models rm", "ingest", "delete", "undelete",
                "optimize", "stats", "stats show", "stats refresh", "stats fit", "query", "sql", "score", "target add",
                "target list", "target rm", "select", "gallery", "plot", "geometry", "demo", "serve"]
    for c in commands:
        res = runner.invoke(app, [*c.split(), "--help"])
        assert res.exit_code == 0, (c, res.output)
        assert not re.search(r"SCIENCE|§", res.output), (c, res.output)
    assert "offset ratio" in runner.invoke(app, ["geometry", "--help"]).output


def test_precomputed_without_model_is_refused_and_score_prints_no_lance_warning(tmp_path):
    """precomputed vectors are never filed under the demo model because no --model was
    given (even when the dimension matches); 10.12/11.20: no Lance WARN line on the first `score`."""
    run = cli
    pool = tmp_path / "pool"
    write_pool(pool, shards=1, rows=100, dim=64)          # the demo model's dimension
    st = tmp_path / "s"
    run("init", str(st))
    p = run("ingest", str(st), str(pool), "--no-progress", check=False)
    assert p.returncode == 1 and "name the model that made them" in p.stderr.decode()
    assert "Traceback" not in p.stderr.decode()
    pool512 = tmp_path / "pool512"
    write_pool(pool512, shards=1, rows=100)
    run("ingest", str(st), str(pool512), *MODEL, "--no-progress")
    run("stats", "fit", str(st), "--reference-size", "50")
    p = run("score", str(st), "--columns", "image_info_gain")
    assert "WARN" not in p.stderr.decode() and "lance" not in p.stderr.decode().lower(), p.stderr.decode()
