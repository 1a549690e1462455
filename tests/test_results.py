"""Library calls return dataclasses (typed fields, read as attributes); what is written to disk or
printed as JSON (a select's sidecar, `--format json`) is their to_json() / as_dict(), the same
keys in the same order as before. Library messages name arguments; the CLI shows the flags."""
import json
import shutil

import pytest
from typer.testing import CliRunner

from clipsql.cli import PARAM_FLAGS, app
from clipsql.engines.engine import start_error
from clipsql.errors import ModelError, renamed
from clipsql.models.loading import INGEST_HOW
from clipsql.queries.curation.dedup import DedupReport, semdedup
from clipsql.queries.curation.selection import Selection, select
from clipsql.queries.curation.targets import add_target
from clipsql.queries.present.gallery import GallerySummary, write_gallery
from clipsql.queries.present.geometry import GeometryReport, ModalityGeometry, Separator, ThinShell, geometry_report
from clipsql.queries.present.plots import HistResult, ScatterResult, plot_hist, plot_scatter
from clipsql.queries.present.stats import ModalityStats, StatsFitInfo, StatsReport, format_report, stats_report
from clipsql.queries.search.command import SearchHit, SearchResult, search
from clipsql.queries.sql.materialize import ScoreReport, materialize_scores
from clipsql.store.maintenance import OptimizeReport, TableMaintenance, optimize
from clipsql.store.store import Store
from clipsql.store.fits import FitSummary, fit_stats
from clipsql.store.targets import TargetListing, TargetSummary, list_targets, remove_target

from _small_demo import small_demo_store

runner = CliRunner()

# the keys a select's sidecar held as a dict (SQL selection), and a target's summary, in order
SIDECAR_KEYS = {"fraction", "recipe", "sql", "model", "model_kind", "limit", "where", "rounding", "ties",
                "statistics", "output", "format", "engine", "options", "seeds", "score_columns", "counts",
                "warnings", "run_id", "created_at", "sha256", "seconds"}
TARGET_KEYS = ["name", "model", "n", "dim", "source", "created_at", "dropped_rows", "index", "recall_at_1",
               "nprobes"]
# the order `clipsql optimize --format json` printed a table's steps in
TABLE_KEYS = ["fragments_before", "version_before", "fragments_removed", "fragments_added", "compact_seconds",
              "index", "vector_index_stale", "vector_index", "index_seconds", "fragments", "versions_pruned",
              "bytes_pruned", "versions_tagged", "versions"]
# the keys `clipsql stats show --format json` printed, report.json held and `clipsql search --format json`
# printed, in order
STATS_KEYS = ["model", "rows", "covered_rows", "covered_seq", "current", "data_version", "modalities"]
STATS_MODALITY_KEYS = ["n", "mean_norm", "mean_of_normalized_norm", "rms_norm", "trace_cov", "top_eigenvalues",
                       "mean"]
STATS_FIT_KEYS = ["fit_id", "n_rows", "reference_size", "options", "rows_added_since", "share_added_since"]
GEOMETRY_KEYS = ["model", "kind", "rows", "sample", "seed", "dim", "separability", "image", "text", "separator",
                 "paper", "seconds"]
GEOMETRY_MODALITY_KEYS = ["n", "invalid", "mean_norm", "sigma_norm", "offset_ratio", "thin_shell",
                          "off_diagonal_dominance", "conformity"]
SEPARATOR_KEYS = ["features", "method", "weights_standardized", "coef", "intercept", "accuracy", "separates",
                  "accuracy_image", "accuracy_text"]
SEARCH_KEYS = ["model", "column", "method", "reason", "rows", "k", "query", "where"]


@pytest.fixture
def demo(tmp_path_factory, tmp_path):
    path = tmp_path / "store"
    shutil.copytree(small_demo_store(tmp_path_factory), path)
    return Store.open(path)


def invoke(*args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def test_select_returns_a_selection_whose_to_json_is_the_sidecar(demo, tmp_path):
    add_target(demo, "tg", query="SELECT image_embedding FROM embeddings ORDER BY id LIMIT 20")
    sel = select(demo, sql="SELECT id, clip_score FROM scores ORDER BY clip_score, id", limit=10000,
                 output=tmp_path / "a.csv")
    assert isinstance(sel, Selection) and sel.selected == sel.pool == sel.counts["selected"] == 300
    text = (tmp_path / "a.csv.json").read_text()
    assert text == json.dumps(sel.to_json(), indent=2, sort_keys=True) + "\n"
    assert set(json.loads(text)) == SIDECAR_KEYS and sel.sidecar == str(tmp_path / "a.csv.json")
    # the library's warning names the argument; the CLI's, the flag (and its sidecar, the argument)
    assert sel.warnings == ["`limit` 10000 is more than the 300 rows there are to select (pool 300): all of "
                            "them were selected"]
    r = runner.invoke(app, ["select", str(demo.path), "--sql", "SELECT id, clip_score FROM scores ORDER BY "
                            "clip_score, id", "--limit", "10000", "-o", str(tmp_path / "b.csv")])
    assert r.exit_code == 0 and "Warning: --limit 10000 is more than the 300 rows" in r.output, r.output
    cli_side = json.loads((tmp_path / "b.csv.json").read_text())
    lib_side = sel.to_json()
    for k in ("run_id", "created_at", "seconds", "output"):
        cli_side.pop(k), lib_side.pop(k)
    assert cli_side == lib_side
    # a recipe's own keys: kl-guided's fit (typed), negclip-normsim's target (a TargetSummary's dict)
    kl = select(demo, recipe="kl-guided", output=tmp_path / "kl.txt")
    assert kl.recipe_fit.made and kl.recipe_fit.fit_id == kl.statistics["fit_id"]
    assert json.loads((tmp_path / "kl.txt.json").read_text())["recipe_fit"]["fit_id"] == kl.recipe_fit.fit_id
    nn = select(demo, recipe="negclip-normsim", target="tg", output=tmp_path / "nn.txt")
    assert list(nn.details["target"]) == TARGET_KEYS and nn.recipe_fit is None


def test_library_results_are_dataclasses(demo, tmp_path):
    t = add_target(demo, "tg", query="SELECT image_embedding FROM embeddings ORDER BY id LIMIT 20")
    assert isinstance(t, TargetSummary) and t.n == 20 and t.seconds is not None
    assert list(t.as_dict()) == TARGET_KEYS + ["seconds"]
    listed = list_targets(demo)
    assert [type(r) for r in listed] == [TargetListing] and list(listed[0].as_dict()) == [
        "name", "dim", "n", "source", "created_at", "model", "dropped_rows", "index", "recall_at_1"]
    printed = json.loads(invoke("target", "list", demo.path, "--format", "json").output)
    assert printed == [r.as_dict() for r in listed] and list(printed[0]) == list(listed[0].as_dict())
    gone = remove_target(demo, "tg")
    assert isinstance(gone, TargetSummary) and gone.seconds is None and list(gone.as_dict()) == TARGET_KEYS
    g = write_gallery(demo, "SELECT id, clip_score FROM scores", tmp_path / "g.html", limit=5)
    assert isinstance(g, GallerySummary) and g.shown == 5 and g.path == str(tmp_path / "g.html") and g.bytes > 0
    h = plot_hist(demo, "clip_score", output=tmp_path / "h.png")
    s = plot_scatter(demo, "clip_score", "image_info_gain", output=tmp_path / "s.png")
    assert isinstance(h, HistResult) and isinstance(s, ScatterResult) and h.n == s.n == 300
    f = fit_stats(demo, reference_size=50, seed=1)
    assert isinstance(f, FitSummary) and f.reference_size == 50 and f.recipe is None and f.seed == 1
    m = materialize_scores(demo, ["clip_score"])
    assert isinstance(m, ScoreReport) and m.columns == ["clip_score"] and m.rows == 300 and m.tasks is None
    d = semdedup(demo, clusters=4)
    assert isinstance(d, DedupReport) and d.mode == "full" and d.fit.iterations_run >= 1
    assert d.as_dict()["fit"]["iterations_run"] == d.fit.iterations_run and "largest_cluster" in d.as_dict()


def test_optimize_returns_a_report_and_the_cli_json_is_its_as_dict(demo):
    report = optimize(demo, retention_hours=0)
    assert isinstance(report, OptimizeReport) and report.dropped_tables == [] and report.seconds is not None
    assert all(isinstance(t, TableMaintenance) for t in report.tables.values())
    d = report.as_dict()
    assert list(d) == ["tables", "dropped_tables", "seconds"]
    for name, t in d["tables"].items():
        assert list(t) == [k for k in TABLE_KEYS if k in t] and t["versions"] == report.tables[name].versions
        assert None not in t.values()
    printed = json.loads(invoke("optimize", demo.path, "--retention-hours", "0", "--format", "json").output)
    assert list(printed) == list(d) and {n: list(t) for n, t in printed["tables"].items()} == \
        {n: list(t) for n, t in d["tables"].items()}


def test_library_messages_name_arguments_and_the_cli_renames_them():
    e = start_error(RuntimeError("boom"), None)
    assert "`ray_address` auto / host:port" in str(e) and "--" not in str(e)
    assert "--ray-address auto / host:port (or RAY_ADDRESS)" in e.message(PARAM_FLAGS)
    e = start_error(RuntimeError("boom"), "h:1")
    assert e.message(PARAM_FLAGS).endswith("or pass --ray-address auto / host:port)")
    how = ModelError(INGEST_HOW)
    assert "`checkpoint` FILE (with `model` ARCH) or `model` local-dir:PATH" in str(how)
    assert "--checkpoint FILE (with --model ARCH) or --model local-dir:PATH" in how.message(PARAM_FLAGS)
    assert renamed("the next writer (or `repair=True`) migrates it", PARAM_FLAGS) == \
        "the next writer (or --repair) migrates it"


def test_stats_report_is_a_dataclass_and_the_cli_json_is_its_as_dict(demo):
    r = stats_report(demo)
    assert isinstance(r, StatsReport) and r.current and r.hint is None and r.rows == 300
    assert all(isinstance(m, ModalityStats) and m.n == 300 for m in r.modalities.values())
    assert isinstance(r.fit, StatsFitInfo) and r.fit.rows_added_since == 0 and r.fit.stale is None
    d = r.as_dict()
    assert list(d) == STATS_KEYS + ["fit"] and list(d["fit"]) == STATS_FIT_KEYS
    assert list(d["modalities"]) == ["image", "text"]
    assert all(list(m) == STATS_MODALITY_KEYS for m in d["modalities"].values())
    printed = invoke("stats", "show", demo.path, "--format", "json").output
    assert printed == json.dumps(d, indent=2) + "\n"
    assert invoke("stats", "show", demo.path).output == format_report(r) + "\n"
    # a hint and a stale fit: after the modalities, in that order; an empty modality is just its n
    r.hint, r.fit.stale, r.modalities["text"] = "h", "stale!", ModalityStats(n=0)
    d = r.as_dict()
    assert list(d) == STATS_KEYS + ["hint", "fit"] and list(d["fit"]) == STATS_FIT_KEYS + ["stale"]
    assert d["modalities"]["text"] == {"n": 0}
    assert "  ! h" in format_report(r) and "  text: no vectors" in format_report(r)


def test_search_returns_a_result_and_the_cli_json_is_its_as_dict(demo):
    res = search(demo, "a red circle", k=5)
    assert isinstance(res, SearchResult) and [type(h) for h in res.hits] == [SearchHit] * 5
    assert [h.rank for h in res.hits] == [1, 2, 3, 4, 5] and res.method == "exact" and res.note is None
    d = res.as_dict()
    assert list(d) == SEARCH_KEYS and list(d["rows"][0]) == ["rank", "id", "score", "uri", "caption"]
    printed = json.loads(invoke("search", demo.path, "a red circle", "-k", "5", "--format", "json").output)
    assert list(printed) == SEARCH_KEYS and printed == json.loads(json.dumps(d, default=str))
    # a note set before the search ran sits where the search put it (after `reason`); a filter's `allowed`
    big = search(demo, like=res.hits[0].id, k=1000, where="id >= ''").as_dict()
    assert list(big) == SEARCH_KEYS[:4] + ["note", "allowed"] + SEARCH_KEYS[4:] and len(big["rows"]) == 300


def test_geometry_report_is_a_dataclass_whose_as_dict_is_report_json(demo, tmp_path):
    rep = geometry_report(demo, output=tmp_path / "geo", sample=100, seed=1)
    assert isinstance(rep, GeometryReport) and rep.sample == 100 and rep.paths.json.endswith("report.json")
    assert isinstance(rep.image, ModalityGeometry) and isinstance(rep.image.thin_shell, ThinShell)
    assert isinstance(rep.separator, Separator) and len(rep.separator.features) == 2
    d = rep.as_dict()
    assert list(d) == GEOMETRY_KEYS + ["paths"] and list(d["separator"]) == SEPARATOR_KEYS
    assert list(d["image"]) == list(d["text"]) == GEOMETRY_MODALITY_KEYS
    del d["paths"]
    assert (tmp_path / "geo" / "report.json").read_text() == json.dumps(d, indent=1, allow_nan=False)
