"""Model identity and loading, in open_clip terms.

A model is named the way open_clip names it:
  * ``ViT-B-32`` + ``--pretrained laion2b_s34b_b79k``   → id ``ViT-B-32/laion2b_s34b_b79k``
  * ``hf-hub:timm/ViT-B-16-SigLIP``                      → id ``hf-hub:timm/ViT-B-16-SigLIP``
  * ``local-dir:PATH`` (``open_clip_config.json`` + weights) → id ``local-dir:NAME@<sha256[:12]>``
  * ``ARCH`` + ``--checkpoint FILE``                     → id ``ARCH@file:<sha256[:12]>``
  * ``clipsql-demo`` / ``clipsql-demo-sig``: the small models shipped with clipsql
    (trained here on generated shapes; real work wants a real CLIP).

`resolve` validates a name without loading weights, so an unknown model or a
missing file fails before anything is written; `load` builds the network.
"""
from __future__ import annotations

import ast
import difflib
import hashlib
import importlib.util
import json
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from clipsql import lazy
from clipsql.errors import DimensionMismatch, ModelError
from clipsql.files import sha256_file
from clipsql.lazy import huggingface_hub, open_clip, torch

FIXTURE_DIR = Path(__file__).resolve().parent / "fixture_models"
BUNDLED = {"clipsql-demo": "demo-clip", "clipsql-demo-sig": "demo-sig"}
DEFAULT_MODEL = "clipsql-demo"
DEMO_NOTICE = ("using clipsql's bundled demo model (a 3.6M-parameter CLIP trained on generated shapes); "
               "real work wants a real CLIP, e.g. --model ViT-B-32 --pretrained laion2b_s34b_b79k")


@dataclass(frozen=True)
class ModelSpec:
    """How to load a model, and the canonical id the store keys it by."""
    model_id: str
    open_clip_name: str              # what open_clip.create_model gets as model_name
    pretrained: str | None = None    # a tag or a checkpoint path
    local: bool = False              # weights on disk (no download needed)
    config: dict = field(default_factory=dict, compare=False)
    given: str | None = None         # the name as the user gave it (e.g. the bundled alias)

    def to_json(self) -> dict:
        return {"open_clip_name": self.open_clip_name, "pretrained": self.pretrained, "local": self.local,
                "given": self.given}


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: Any
    preprocess: Any
    tokenizer: Any
    device: str
    kind: str
    dim: int
    logit_scale: float
    logit_bias: float | None
    context_length: int | None

    def record_fields(self) -> dict:
        return dict(model_id=self.spec.model_id, kind=self.kind, dim=self.dim, logit_scale=self.logit_scale,
                    logit_bias=self.logit_bias, context_length=self.context_length, spec=self.spec.to_json())


def _sha(path: Path) -> str:
    return sha256_file(path)[:12]


def _find_weights(folder: Path) -> Path | None:
    for pattern in ("*.safetensors", "*.bin", "*.pth", "*.pt"):
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    return None


def resolve(name: str | None, pretrained: str | None = None, checkpoint: str | None = None) -> ModelSpec:
    """Validate a model name; raise ModelError saying how to fix it. Loads no weights."""
    name = name or DEFAULT_MODEL
    if name in BUNDLED:
        spec = resolve(f"local-dir:{FIXTURE_DIR / BUNDLED[name]}")
        return ModelSpec(spec.model_id.replace(f"local-dir:{BUNDLED[name]}@", f"{name}@"), spec.open_clip_name,
                         None, True, spec.config, name)
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):]).expanduser()
        cfg_path = folder / "open_clip_config.json"
        if not folder.is_dir():
            raise ModelError(f"local-dir model folder {folder} does not exist")
        if not cfg_path.is_file():
            raise ModelError(f"{folder} has no open_clip_config.json; a local-dir: model is a folder with "
                             "open_clip_config.json (keys model_cfg, preprocess_cfg) and its weights")
        try:
            config = json.loads(cfg_path.read_text())
        except ValueError as e:
            raise ModelError(f"{cfg_path} is not valid JSON: {e}") from None
        if "model_cfg" not in config:
            raise ModelError(f"{cfg_path} lacks the 'model_cfg' key open_clip needs")
        weights = _find_weights(folder)
        if weights is None:
            raise ModelError(f"{folder} has no weights (*.safetensors, *.bin, *.pth); "
                             "random weights would make every score meaningless")
        digest = hashlib.sha256((_sha(weights) + cfg_path.read_text()).encode()).hexdigest()[:12]
        return ModelSpec(f"local-dir:{folder.resolve().name}@{digest}", f"local-dir:{folder.resolve()}",
                         None, True, config["model_cfg"])
    if name.startswith("hf-hub:"):
        if pretrained or checkpoint:
            raise ModelError("hf-hub: models carry their own weights; drop `pretrained`/`checkpoint`", param="pretrained")
        return ModelSpec(name, name, None, False)

    arch = name.replace("/", "-")
    if not checkpoint and pretrained:
        found = _known_without_open_clip(arch, pretrained)
        if found is not None:       # a known ARCH + tag, named from open_clip's files without importing it
            return ModelSpec(f"{arch}/{pretrained}", arch, pretrained, False, found)
    known = open_clip.list_models()
    if arch not in known:
        close = difflib.get_close_matches(arch, known + list(BUNDLED), n=5)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See `open_clip.list_models()`."
        raise ModelError(f"unknown model {name!r}.{hint} Other forms: hf-hub:ORG/REPO, local-dir:PATH, "
                         "or ARCH --checkpoint FILE.")
    config = open_clip.get_model_config(arch) or {}
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise ModelError(f"checkpoint file {path} does not exist")
        return ModelSpec(f"{arch}@file:{_sha(path)}", arch, str(path.resolve()), True, config)
    if not pretrained:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ModelError(f"{arch} needs weights: pass `pretrained` TAG (one of: {', '.join(tags) or 'none known'}) "
                         "or `checkpoint` FILE", param="pretrained")
    if Path(pretrained).expanduser().is_file():
        path = Path(pretrained).expanduser()
        return ModelSpec(f"{arch}@file:{_sha(path)}", arch, str(path.resolve()), True, config)
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if pretrained not in tags:
        raise ModelError(f"unknown pretrained tag {pretrained!r} for {arch}; known tags: {', '.join(tags) or 'none'}")
    return ModelSpec(f"{arch}/{pretrained}", arch, pretrained, False, config)


def _open_clip_files() -> Path | None:
    """open_clip's package folder, found without importing it (importing it imports torch, ~1.5 s)."""
    try:
        found = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    folders = list(found.submodule_search_locations or []) if found is not None else []
    return Path(folders[0]) if folders else None


def _pretrained_tags(source: str) -> dict[str, list[str]]:
    """{architecture: [pretrained tag]} from the text of open_clip's pretrained.py, read as data:
    `_PRETRAINED = {"ARCH": _NAME, …}` with `_NAME = dict(tag=…, …)` (or a dict literal); the
    `-quickgelu` architectures get the tags marked `quick_gelu=True`, as open_clip derives them.
    {} when the file does not have that shape."""
    tree = ast.parse(source)
    tables: dict[str, dict[str, bool]] = {}
    archs: dict[str, dict[str, bool]] = {}

    def quick(value: ast.AST) -> bool:
        return isinstance(value, ast.Call) and any(
            k.arg == "quick_gelu" and isinstance(k.value, ast.Constant) and k.value.value is True
            for k in value.keywords)

    def table(value: ast.AST) -> dict[str, bool] | None:
        """{tag: quick_gelu} of `dict(tag=…)`, `{"tag": …}` or a name assigned one of them earlier."""
        if isinstance(value, ast.Name):
            return tables.get(value.id)
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "dict" \
                and not value.args:
            return {k.arg: quick(k.value) for k in value.keywords if k.arg}
        if isinstance(value, ast.Dict) and all(isinstance(k, ast.Constant) and isinstance(k.value, str)
                                               for k in value.keys):
            return {k.value: quick(v) for k, v in zip(value.keys, value.values)}
        return None

    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        target, value = node.targets[0].id, node.value
        if target == "_PRETRAINED" and isinstance(value, ast.Dict):
            for k, v in zip(value.keys, value.values):
                tags = table(v)
                if isinstance(k, ast.Constant) and isinstance(k.value, str) and tags is not None:
                    archs[k.value] = tags
        else:
            tags = table(value)
            if tags is not None:
                tables[target] = tags
    out = {arch: list(tags) for arch, tags in archs.items()}
    for arch, table_ in archs.items():
        tags = [t for t, q in table_.items() if q]
        if tags:
            out.setdefault(arch + "-quickgelu", tags)
    return out


def _known_without_open_clip(arch: str, pretrained: str) -> dict | None:
    """The model config of ARCH when open_clip's files name ARCH with the tag `pretrained`, read
    without importing open_clip; None when they do not (or cannot be read): the caller then asks
    open_clip itself, which also words the error."""
    folder = _open_clip_files()
    if folder is None:
        return None
    try:
        config = json.loads((folder / "model_configs" / f"{arch}.json").read_text(encoding="utf-8"))
        tags = _pretrained_tags((folder / "pretrained.py").read_text(encoding="utf-8"))
    except (OSError, ValueError, SyntaxError):
        return None
    if not all(k in config for k in ("embed_dim", "vision_cfg", "text_cfg")) or pretrained not in tags.get(arch, []):
        return None
    return config


def resolve_known(name: str | None, pretrained: str | None, checkpoint: str | None,
                  known: list[tuple[str, dict]]) -> ModelSpec | None:
    """An ARCH + pretrained tag that a store already holds, without importing open_clip (~1.5 s):
    `known` is [(model_id, spec json)] of the store's models. None when it is not one of them."""
    if not name or checkpoint or not pretrained or ":" in name or Path(pretrained).expanduser().exists():
        return None
    arch = name.replace("/", "-")
    for model_id, spec in known:
        if (spec.get("open_clip_name") == arch and spec.get("pretrained") == pretrained and not spec.get("local")
                and model_id == f"{arch}/{pretrained}"):
            return ModelSpec(model_id, arch, pretrained, False, {}, spec.get("given"))
    return None


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("`device` cuda was asked for but torch sees no CUDA device; use `device` auto or cpu",
                         param="device")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ModelError(f"unknown device {device!r}: use auto, cpu or cuda")
    return device


HUB_CONNECT_TIMEOUT = 3.0     # seconds: an unreachable hub is known in this, not after minutes of retries
INGEST_HOW = ("download them on a connected machine and pass `checkpoint` FILE (with `model` ARCH) or "
              "`model` local-dir:PATH (a folder with open_clip_config.json and the weights), or copy that "
              "machine's ~/.cache/huggingface here")


def hub_files(spec: ModelSpec) -> list[tuple[str, str]]:
    """[(repo_id, filename)] open_clip would fetch the weights from (any one of them suffices)."""
    weights = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    if spec.local:
        return []
    if spec.open_clip_name.startswith("hf-hub:"):
        return [(spec.open_clip_name[len("hf-hub:"):], f) for f in weights]
    cfg = open_clip.get_pretrained_cfg(spec.open_clip_name, spec.pretrained or "") or {}
    hub = cfg.get("hf_hub") or ""
    if not hub:
        return []
    repo, filename = os.path.split(hub)
    if filename:
        stem = filename.rsplit(".", 1)[0]
        return [(repo, stem + ".safetensors"), (repo, filename)]
    return [(repo, f) for f in weights]


def weights_cached(spec: ModelSpec) -> bool:
    """Whether the weights are already in this machine's Hugging Face cache."""
    files = hub_files(spec)
    if not files:
        return spec.local
    return any(isinstance(huggingface_hub.try_to_load_from_cache(repo, f), str) for repo, f in files)


def hub_reachable(timeout: float = HUB_CONNECT_TIMEOUT) -> bool:
    """One TCP connect to the hub (HF_ENDPOINT), no retries; False at once under HF_HUB_OFFLINE."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def _go_offline() -> None:
    """Make huggingface_hub use its cache without asking the network (and without retrying)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        lazy.load("huggingface_hub.constants").HF_HUB_OFFLINE = True
    except ImportError:
        pass


def check_weights_reachable(spec: ModelSpec, how: str = INGEST_HOW) -> None:
    """Fail in seconds, in one line, when hub weights are neither cached nor downloadable; when the
    hub is unreachable but the weights are cached, load them from the cache without network calls."""
    if spec.local or not hub_files(spec):
        return
    if hub_reachable():
        return
    if weights_cached(spec):
        _go_offline()
        return
    endpoint = os.environ.get("HF_ENDPOINT") or "huggingface.co"
    why = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE") else f"{endpoint} cannot be reached"
    raise ModelError(f"the weights of {spec.model_id} are not cached on this machine and {why}: {how}")


def load(spec: ModelSpec, device: str = "auto", how: str = INGEST_HOW) -> LoadedModel:
    """Build the open_clip model with its weights; ModelError (with a fix: `how`) when that fails."""
    check_weights_reachable(spec, how)
    device = pick_device(device)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.open_clip_name, pretrained=spec.pretrained, device=device)
        tokenizer = open_clip.get_tokenizer(spec.open_clip_name)
    except Exception as e:  # open_clip raises RuntimeError/ValueError/HF errors
        first = " ".join(str(e).split())
        first = first if len(first) <= 240 else first[:first.rfind(" ", 0, 240)] + " …"
        fix = how if not spec.local else "check the model's files"
        raise ModelError(f"could not load {spec.model_id}: {e.__class__.__name__}: {first} — {fix}") from None
    model.eval()
    with torch.no_grad():
        dim = int(model.encode_text(tokenizer(["a"]).to(device)).shape[-1])
    bias = getattr(model, "logit_bias", None)
    return LoadedModel(
        spec=spec, model=model, preprocess=preprocess, tokenizer=tokenizer, device=device,
        kind="siglip" if bias is not None else "clip", dim=dim,
        logit_scale=float(model.logit_scale.exp().item()),
        logit_bias=None if bias is None else float(bias.item()),
        context_length=getattr(tokenizer, "context_length", None))


def record_without_weights(spec: ModelSpec, dim: int) -> dict:
    """Model fields for precomputed embeddings when the weights are not needed (nor available)."""
    cfg = spec.config or {}
    cfg_dim = cfg.get("embed_dim")
    if cfg_dim is not None and int(cfg_dim) != dim:
        raise DimensionMismatch(f"{spec.model_id} produces {cfg_dim}-d embeddings but the source has {dim}-d vectors")
    siglip = "init_logit_bias" in cfg
    scale = math.exp(cfg["init_logit_scale"]) if siglip and "init_logit_scale" in cfg else 100.0
    return dict(model_id=spec.model_id, kind="siglip" if siglip else "clip", dim=dim, logit_scale=scale,
                logit_bias=float(cfg["init_logit_bias"]) if siglip else None,
                context_length=(cfg.get("text_cfg") or {}).get("context_length"), spec=spec.to_json())
