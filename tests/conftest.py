"""Shared fixtures and data factories. Nothing here touches the network.

* models: a tiny open_clip model built at test time (seeded, saved as a `local-dir:` folder so
  the real loading path runs) for the tests where loading or running open_clip is the point, and
  `fake_encoder`, a deterministic torch-free encoder (through IngestOptions.encoder_factory) for
  the pipeline and ledger tests, which counts what it encoded;
* data: image folders, clip-retrieval pools of precomputed vectors, CLIP-like vectors;
* reading a store back (`stored_vectors`, `sample_ids`) and an independent check of its running
  statistics (`assert_stats_match_vectors`, plain numpy);
* the external tools: a throwaway PostgreSQL server (`pg_server`) and a local multi-node Ray
  cluster (`ray_cluster`), each skipped with the reason when the tool is missing unless
  CLIPSQL_REQUIRE_<TOOL>=1 (.ci/run sets them).

Markers (pyproject.toml): `ray`, `s3`, `postgres`, `browser` name the tool a test needs, `slow`
the tests that the default run leaves to `pytest -m slow`. A test that takes a tool's fixture
without its marker is a collection error (see `pytest_collection_modifyitems`)."""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the exact-search vector cache (store.vector_cache) of this test session: an empty folder of its
# own, never the user's ~/.cache (tests see what a fresh machine sees, and leave nothing there)
os.environ["CLIPSQL_CACHE_DIR"] = tempfile.mkdtemp(prefix="clipsql-test-cache-")
atexit.register(shutil.rmtree, os.environ["CLIPSQL_CACHE_DIR"], True)

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k"]   # precomputed: no weights needed
D = 512                                                                # its dimension

# fixture -> the marker a test taking it must carry
TOOL_FIXTURES = {"ray_cluster": "ray", "ray_tmpdir": "ray", "s3": "s3", "pg_server": "postgres"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, marker in TOOL_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()) and item.get_closest_marker(marker) is None:
                raise pytest.UsageError(f"{item.nodeid} uses the {fixture} fixture but is not marked "
                                        f"@pytest.mark.{marker}")


# --------------------------------------------------------------------------- models
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8, "patch_size": None},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def build_tiny_model(folder: Path, seed: int = 0, kind: str = "clip") -> Path:
    import open_clip
    import torch
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(json.dumps(TINY_CFG))
    if kind == "siglip":
        cfg["init_logit_bias"] = -10.0
        cfg["init_logit_scale"] = float(np.log(10.0))
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**cfg)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": cfg,
        "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)},
    }))
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return "local-dir:" + str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-clip"))


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory) -> str:
    return "local-dir:" + str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sig", kind="siglip"))


class FakeTokenizer:
    """Captions stay strings; `encode` splits on whitespace, so a caption of more than
    context_length − 2 words counts as truncated (as open_clip's tokenizer would say)."""
    context_length = 16

    def encode(self, text: str) -> list[str]:
        return text.split()

    def __call__(self, texts: list[str]) -> list[str]:
        return list(texts)


class FakeEncoder:
    """A deterministic encoder without torch, for IngestOptions.encoder_factory.

    It is registered as a real `local-dir:` model (a folder with open_clip_config.json and a
    "weights" file holding its seed, so `models.resolve` gives it an id and a store keys it like
    any model), but nothing loads open_clip: `preprocess` keeps an image's decoded bytes,
    the tokenizer keeps the caption, and a vector is a seeded normal draw (scaled and shifted:
    raw vectors, not unit) from the SHA-256 of what is encoded. The counters say what ran:
    `loads` (factory calls), `images`, `texts` (rows encoded) and `captions` (every text encoded)."""

    def __init__(self, folder: Path, dim: int = 16, seed: int = 0, kind: str = "clip"):
        self.dim, self.seed, self.kind = dim, seed, kind
        folder.mkdir(parents=True, exist_ok=True)
        cfg = {"embed_dim": dim, "text_cfg": {"context_length": FakeTokenizer.context_length}}
        if kind == "siglip":
            cfg.update(init_logit_bias=-10.0, init_logit_scale=float(np.log(10.0)))
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
        (folder / "fake.safetensors").write_text(f"fake encoder seed={seed} kind={kind} dim={dim}")
        self.model = f"local-dir:{folder}"
        self.loads = self.images = self.texts = 0
        self.captions: list[str] = []

    # -- the factory and the encoder it returns (this object itself)
    def __call__(self, spec, device):  # noqa: ANN001, ANN204 - encoder_factory(spec, device)
        from clipsql.models.loading import LoadedModel
        self.loads += 1
        siglip = self.kind == "siglip"
        self.loaded = LoadedModel(spec=spec, model=None, preprocess=self.preprocess, tokenizer=FakeTokenizer(),
                                  device="cpu", kind=self.kind, dim=self.dim,
                                  logit_scale=10.0 if siglip else 100.0, logit_bias=-10.0 if siglip else None,
                                  context_length=FakeTokenizer.context_length)
        return _FakeRun(self)

    @staticmethod
    def preprocess(image) -> bytes:  # noqa: ANN001
        return f"{image.mode} {image.size}".encode() + image.tobytes()

    def vector(self, kind: str, data: bytes) -> np.ndarray:
        digest = hashlib.sha256(f"{self.seed}:{kind}:".encode() + data).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        return (3.0 * rng.standard_normal(self.dim) + 1.0).astype(np.float32)

    def options(self, **kw):  # noqa: ANN003, ANN201
        """IngestOptions with this encoder (no progress bar, no DataLoader workers by default)."""
        from clipsql.ingest.pipeline import IngestOptions
        kw.setdefault("progress", False)
        kw.setdefault("workers", 0)
        return IngestOptions(encoder_factory=self, **kw)


class _FakeRun:
    """The encoder a FakeEncoder hands the pipeline (`.loaded`, `__call__`, `.text`)."""

    def __init__(self, fake: FakeEncoder):
        self.fake, self.loaded = fake, fake.loaded

    def text(self, tokens: list) -> np.ndarray:
        self.fake.texts += len(tokens)
        self.fake.captions += list(tokens)
        rows = [self.fake.vector("text", t.encode()) for t in tokens]
        return np.array(rows, np.float32).reshape(len(tokens), self.fake.dim)

    def __call__(self, pixels: list, tokens: list) -> tuple[np.ndarray, np.ndarray]:
        self.fake.images += len(pixels)
        img = np.array([self.fake.vector("image", p) for p in pixels], np.float32).reshape(len(pixels), -1)
        txt = np.full(img.shape, np.nan, np.float32)
        have = [i for i, t in enumerate(tokens) if t is not None]
        if have:
            txt[have] = self.text([tokens[i] for i in have])
        return img, txt


@pytest.fixture
def fake_encoder(tmp_path_factory) -> FakeEncoder:
    """A fresh FakeEncoder (16-d, seed 0): `ingest(st, src, model=fake.model, options=fake.options())`."""
    return FakeEncoder(tmp_path_factory.mktemp("fake") / "fake-clip")


@pytest.fixture
def fake_siglip(tmp_path_factory) -> FakeEncoder:
    return FakeEncoder(tmp_path_factory.mktemp("fake") / "fake-sig", seed=1, kind="siglip")


# --------------------------------------------------------------------------- data
def write_image_folder(folder: Path, n: int, seed: int = 0, size: int = 24) -> Path:
    """n small random RGB PNGs with sidecar captions, deterministic."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "green", "circle", "square", "small", "large", "left", "right", "cat", "dog"]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img{i:04d}.png")
        (folder / f"img{i:04d}.txt").write_text(" ".join(rng.choice(words, 4)) + f" {i}")
    return folder


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "data", 40)


@pytest.fixture
def store(tmp_path):
    from clipsql.store.store import Store
    return Store.init(tmp_path / "store")


def write_pool(folder: Path, shards: int, rows: int, seed: int = 0, row_group: int = 250, dim: int = D) -> None:
    """A clip-retrieval layout: img_emb/*.npy, text_emb/*.npy, metadata/*.parquet (with row groups);
    row i of shard s has the key f"{s:03d}{i:06d}"."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(seed)
    for sub in ("img_emb", "text_emb", "metadata"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        base = rng.normal(size=(rows, dim)).astype(np.float32)
        np.save(folder / "img_emb" / f"img_emb_{s}.npy", base + 0.3 * rng.normal(size=(rows, dim)).astype(np.float32))
        np.save(folder / "text_emb" / f"text_emb_{s}.npy", base + 0.3 * rng.normal(size=(rows, dim)).astype(np.float32))
        keys = [f"{s:03d}{i:06d}" for i in range(rows)]
        pq.write_table(pa.table({"key": keys, "url": [f"http://x/{k}.jpg" for k in keys],
                                 "caption": [f"a photo number {k}" for k in keys],
                                 "width": np.arange(rows, dtype=np.int64)}),
                       folder / "metadata" / f"metadata_{s}.parquet", row_group_size=row_group)


def clip_like(n: int, rng: np.random.Generator, d: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Paired image/text vectors with CLIP-like geometry: offset modality means, anisotropic spread."""
    shared = rng.normal(size=(n, d)) * np.linspace(1.5, 0.2, d)
    img = 2.0 * np.eye(d)[0] + shared + 0.3 * rng.normal(size=(n, d))
    txt = -2.0 * np.eye(d)[1] + shared + 0.3 * rng.normal(size=(n, d))
    return (img * 3).astype(np.float32), (txt * 5).astype(np.float32)


def cli(*args, env=None, check=True, timeout=300) -> subprocess.CompletedProcess:
    """`python -m clipsql ARGS` in a subprocess (stdout / stderr as bytes)."""
    e = dict(os.environ, **(env or {}))
    p = subprocess.run([sys.executable, "-m", "clipsql", *map(str, args)], cwd=ROOT, capture_output=True, env=e,
                       timeout=timeout)
    if check:
        assert p.returncode == 0, p.stderr.decode()[-2000:]
    return p


def wait_for(condition, what: str, deadline: float = 120.0, every: float = 0.02):  # noqa: ANN001, ANN201
    """Poll `condition()` until it returns something truthy (returned); the deadline only guards
    a hang (it is not what a test measures)."""
    end = time.monotonic() + deadline
    while True:
        got = condition()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what} after {deadline:.0f} s")
        time.sleep(every)


# --------------------------------------------------------------------------- float64 brute forces
# Information Gain (docs/science.md §1) written from the definition, one row at a time, sharing no
# code with clipsql: the references the score kernels and their device path are tested against.
def np_unit(V):
    V = np.asarray(V, dtype=np.float64)
    return V / np.linalg.norm(V, axis=1, keepdims=True)


def np_log_softmax(L):
    L = L - L.max(axis=-1, keepdims=True)
    return L - np.log(np.exp(L).sum(axis=-1, keepdims=True))


def np_logits(C, a, b, kind):
    """log-weights of §1: a·cos (CLIP softmax) or log σ(a·cos + b) (SigLIP normalized sigmoid)."""
    return a * C if kind == "clip" else -np.logaddexp(0.0, -(a * C + b))


def np_prior(Qref, Rref, a, b, kind, prior="posterior-mean"):
    """§1 prior over the rows of Rref: the mean posterior of the rows of Qref, or uniform."""
    M_ = len(Rref)
    if prior == "uniform":
        return np.full(M_, 1.0 / M_)
    return np.exp(np_log_softmax(np_logits(np_unit(Qref) @ np_unit(Rref).T, a, b, kind))).mean(axis=0)


def np_info_gain(Q, R, prior, a, b, kind, reverse=False, own=None):
    """float64 brute force of §1, one row at a time: π over the rows of R; a row with own[i] = j ≥ 0
    leaves reference row j out of its posterior and of the (renormalized) prior."""
    Qh, Rh = np_unit(Q), np_unit(R)
    out = []
    for i, q in enumerate(Qh):
        keep = np.ones(len(Rh), bool)
        if own is not None and own[i] >= 0:
            keep[own[i]] = False
        lq = np_log_softmax(np_logits(Rh[keep] @ q, a, b, kind))
        p = prior[keep] / prior[keep].sum()
        lp = np.log(p)
        out.append(float(p @ (lp - lq)) if reverse else float(np.exp(lq) @ (lq - lp)))
    return np.array(out)


def wide_pairs(m: int, n: int, d: int = 512, seed: int = 7):
    """Seeded CLIP-like float32 pairs (as stored), offsets where a float32 GEMM loses digits:
    (X_ref, Y_ref) of m rows and (X_query, Y_query) of n rows."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(m + n, d))
    X = (shared + 0.8 * rng.normal(size=shared.shape) + 2.0).astype(np.float32)
    Y = (shared + 0.8 * rng.normal(size=shared.shape) - 1.0).astype(np.float32)
    return X[:m], Y[:m], X[m:], Y[m:]


# --------------------------------------------------------------------------- reading a store back
def to_array(column) -> np.ndarray:  # noqa: ANN001
    """An Arrow FixedSizeList column as a float array (NULL rows: NaN), written here with pyarrow only."""
    import pyarrow as pa
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = col.type.list_size
    values = col.flatten().to_numpy(zero_copy_only=False) if col.null_count == 0 else None
    if values is not None:
        return values.reshape(len(col), width)
    rows = [np.full(width, np.nan) if v is None else np.asarray(v, dtype=np.float64) for v in col.to_pylist()]
    return np.array(rows).reshape(len(col), width)


def stored_vectors(st, model=None) -> tuple[list, np.ndarray, np.ndarray]:  # noqa: ANN001
    """(ids, image, text) of a model's embeddings, sorted by id."""
    from clipsql.store.reads import read_embeddings
    rec = st.model(model)
    tbl = read_embeddings(st, rec).sort_by("id")
    return tbl.column("id").to_pylist(), to_array(tbl.column("image_embedding")), \
        to_array(tbl.column("text_embedding"))


def sample_ids(st) -> list:  # noqa: ANN001
    tbl = st.samples_table()
    return sorted(tbl.to_table(columns=["id"]).column("id").to_pylist()) if tbl is not None else []


def assert_stats_match_vectors(st, model=None) -> None:  # noqa: ANN001
    """The store's running statistics equal numpy over its vectors: count, mean and covariance of
    the raw vectors, mean of the unit vectors (each modality; NULL text rows left out)."""
    from clipsql.store.stats import saved_stats
    rec = st.model(model)
    _, img, txt = stored_vectors(st, model)
    state = saved_stats(st, rec)
    assert state.n == len(img)
    for modality, X in (("image", img), ("text", txt)):
        X = X[~np.isnan(X[:, 0])].astype(np.float64)     # NULL text embeddings are not in the statistics
        if len(X) == 0:
            assert state.moments[(modality, "raw")].n == 0
            continue
        unit = X / np.sqrt((X * X).sum(axis=1))[:, None]
        for space, V in (("raw", X), ("normalized", unit)):
            m = state.moments[(modality, space)]
            np.testing.assert_allclose(m.mean, V.mean(0), rtol=1e-9, atol=1e-12)
            if space == "raw":    # normalized vectors keep their mean only
                centred = V - V.mean(0)
                np.testing.assert_allclose(m.cov, centred.T @ centred / len(V), rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- PostgreSQL
@pytest.fixture(scope="session")
def pg_server():
    """A throwaway PostgreSQL server (tests/pg.py) for the whole session."""
    import pg
    reason = pg.why_unavailable()
    if reason:
        if os.environ.get("CLIPSQL_REQUIRE_POSTGRES"):      # .ci/run sets it: never skipped in CI
            pytest.fail(f"PostgreSQL catalog tests cannot run: {reason}")
        pytest.skip(reason)
    srv = pg.PostgresServer().start()
    yield srv
    srv.stop()


# --------------------------------------------------------------------------- Ray
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _require_ray() -> None:
    try:
        import ray  # noqa: F401
        from ray.cluster_utils import Cluster  # noqa: F401
    except ImportError:
        if os.environ.get("CLIPSQL_REQUIRE_RAY"):
            pytest.fail("the Ray tests cannot run: ray is not installed (pip install -e '.[test]')")
        pytest.skip("ray is not installed (pip install -e '.[ray]')")


def processes_naming(path: str) -> list[int]:
    """Pids of the processes whose command line names `path` or that run with RAY_TMPDIR=`path`,
    and of their descendants (Ray's node processes carry their session folder in the command line;
    its workers and agents rename themselves "ray::…" but inherit the environment, and stay after
    their parent is gone): exactly what a fixture started in its own folder."""
    if not os.path.isdir("/proc"):
        return []
    needle, env, me = os.fsencode(path), b"\0RAY_TMPDIR=" + os.fsencode(path) + b"\0", os.getpid()
    found, parent = set(), {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if needle in f.read():
                    found.add(pid)
            with open(f"/proc/{pid}/environ", "rb") as f:
                if env in b"\0" + f.read():
                    found.add(pid)
            with open(f"/proc/{pid}/stat") as f:
                parent[pid] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    grew = True
    while grew:
        more = {pid for pid, ppid in parent.items() if ppid in found and pid not in found and pid != me}
        found |= more
        grew = bool(more)
    return sorted(found)


def stop_processes(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL what is still there after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        end = time.monotonic() + grace
        while pids and time.monotonic() < end:
            pids = [p for p in pids if os.path.exists(f"/proc/{p}") and not _zombie(p)]
            time.sleep(0.1)
        if not pids:
            return


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture(scope="session")
def ray_tmpdir(request):
    """A fresh, short RAY_TMPDIR for this session (Ray's socket paths are length-limited, and its
    default folder exists only after some earlier Ray run): set in the environment, so the CLI's
    subprocesses use it too. Afterwards every process naming it is stopped and it is deleted."""
    _require_ray()
    folder = tempfile.mkdtemp(prefix="r", dir="/tmp")
    os.makedirs(os.path.join(folder, "ray"))
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", *RAY_ENV)}

    def finish() -> None:
        stop_processes(processes_naming(folder))
        shutil.rmtree(folder, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    request.addfinalizer(finish)
    os.environ["RAY_TMPDIR"] = folder
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    return folder


@pytest.fixture(scope="session")
def ray_cluster(ray_tmpdir, request):
    """A local multi-node Ray cluster (head + 2 worker nodes, 1 CPU each, small object stores,
    no dashboard, no usage stats, loopback only) in its own RAY_TMPDIR, started once per session.
    Whatever happens (also a set-up that fails half way) its processes are stopped afterwards."""
    import ray
    from ray.cluster_utils import Cluster
    started = []

    def finish() -> None:
        if ray.is_initialized():
            ray.shutdown()
        for cluster in started:
            try:
                cluster.shutdown()
            except Exception:  # noqa: BLE001 - what is left is stopped by ray_tmpdir's finaliser
                pass
    request.addfinalizer(finish)
    args = dict(num_cpus=1, object_store_memory=96 << 20, node_ip_address="127.0.0.1")
    cluster = Cluster(initialize_head=False, connect=False)
    started.append(cluster)
    cluster.add_node(**args, include_dashboard=False, temp_dir=os.path.join(ray_tmpdir, "ray"))
    cluster.workers = [cluster.add_node(**args) for _ in range(2)]
    cluster.wait_for_nodes()
    return cluster


def assert_same_store(st, ref) -> None:  # noqa: ANN001
    """Two stores hold the same rows, vectors and samples, and `st`'s statistics are current."""
    ids, img, txt = stored_vectors(st)
    rids, rimg, rtxt = stored_vectors(ref)
    assert ids == rids
    np.testing.assert_array_equal(img, rimg)
    np.testing.assert_array_equal(txt, rtxt)
    assert sample_ids(st) == sample_ids(ref)
    assert_stats_match_vectors(st)
