"""Shared fixtures: a tiny open_clip model built at test time (seeded, saved as a
`local-dir:` folder so the real loading path runs) and small generated datasets.
Nothing here touches the network."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A local multi-node Ray cluster (head + 2 worker nodes, 1 CPU each, small object stores,
    no dashboard, no usage stats, loopback only), started once per session. Skips when Ray is
    not installed, unless CLIPSQL_REQUIRE_RAY=1 (.ci/run sets it)."""
    try:
        import ray
        from ray.cluster_utils import Cluster
    except ImportError:
        if os.environ.get("CLIPSQL_REQUIRE_RAY"):
            pytest.fail("the Ray tests cannot run: ray is not installed (pip install -e '.[test]')")
        pytest.skip("ray is not installed (pip install -e '.[ray]')")
    for k, v in (("RAY_AUTH_MODE", "disabled"), ("RAY_USAGE_STATS_ENABLED", "0"),
                 ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")):
        os.environ.setdefault(k, v)
    temp = tmp_path_factory.mktemp("ray")
    args = dict(num_cpus=1, object_store_memory=96 << 20, node_ip_address="127.0.0.1")
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args=dict(args, include_dashboard=False, temp_dir=str(temp)))
    workers = [cluster.add_node(**args) for _ in range(2)]
    cluster.wait_for_nodes()
    cluster.workers = workers
    yield cluster
    if ray.is_initialized():
        ray.shutdown()
    cluster.shutdown()
