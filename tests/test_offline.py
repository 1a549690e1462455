"""Offline and the model hub: hub weights that are neither cached nor reachable fail
at once (no retries) with one line saying how to provide them for that command; cached weights
load without network calls when the hub is unreachable. Nothing here touches the network. (No
test times the failure: the hub is asked once, and "Retrying" never appears.)"""
import os
import subprocess
import sys

import pytest

from clipsql.store.store import Store

from conftest import MODEL, ROOT, cli, write_pool

CLOSED = "http://127.0.0.1:9"     # the discard port: connection refused at once


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": CLOSED}],
                         ids=["offline-flag", "unreachable"])
def test_ingest_with_uncached_hub_weights_fails_fast_in_one_line(tmp_path, image_folder, env):
    st = Store.init(tmp_path / "s")
    p = cli("ingest", str(st.path), str(image_folder), *MODEL, "--no-progress", env=env, check=False)
    err = p.stderr.decode()
    assert p.returncode == 1, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert "not cached on this machine" in err and "--checkpoint FILE" in err and "local-dir:" in err
    assert "Retrying" not in err and "Traceback" not in err


def test_query_prompt_of_an_uncached_hub_model_says_how_in_one_line(tmp_path):
    pool = tmp_path / "pool"
    write_pool(pool, shards=1, rows=50)
    st = Store.init(tmp_path / "s")
    cli("ingest", str(st.path), str(pool), *MODEL, "--id-column", "key", "--no-progress")
    p = cli("query", str(st.path), "SELECT text_embedding('a dog') AS v", env={"HF_ENDPOINT": CLOSED,
                                                                             "HF_HUB_OFFLINE": ""}, check=False)
    err = p.stderr.decode()
    assert p.returncode == 1, err
    assert len([x for x in err.splitlines() if x.strip()]) == 1, err
    assert "Hugging Face cache" in err and "--checkpoint" not in err and "Retrying" not in err
    assert "Traceback" not in err


def test_cached_weights_load_without_the_network(tmp_path):
    """Weights in the cache + an unreachable hub: huggingface_hub is switched offline (no retries)."""
    repo = tmp_path / "hub" / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "open_clip_model.safetensors").write_bytes(b"x")
    code = ("import os; from clipsql.models import loading as models; s = models.resolve('ViT-B-32', 'laion2b_s34b_b79k'); "
            "print(models.weights_cached(s)); models.check_weights_reachable(s); "
            "import huggingface_hub.constants as c; print(os.environ['HF_HUB_OFFLINE'], c.HF_HUB_OFFLINE)")
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_ENDPOINT=CLOSED, HF_HUB_OFFLINE="")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().split() == ["True", "1", "True"]
