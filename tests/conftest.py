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
    from store.store import Store
    return Store.init(tmp_path / "store")
