#!/usr/bin/env python
"""Train the tiny demo CLIP / SigLIP model shipped in models/fixture_models/.

    python training/train_demo_model.py --kind clip   --out models/fixture_models/demo-clip
    python training/train_demo_model.py --kind siglip --out models/fixture_models/demo-sig

The model is an ordinary open_clip ``CLIP`` (ModifiedResNet vision tower,
2-layer text transformer, SimpleTokenizer) built by open_clip itself from the
config written to ``open_clip_config.json``; it is trained on fresh samples of
``ingest.demo.generate_samples`` with ``open_clip.loss.ClipLoss`` or
``open_clip.loss.SigLipLoss``.  The output folder is an open_clip
``local-dir:`` model folder:

    open_clip_config.json         {"model_cfg": ..., "preprocess_cfg": ...}
    open_clip_model.safetensors   fp16 weights, unused token-embedding rows zeroed
    provenance.json               recipe, versions, wall time, held-out accuracy

Same ``--seed`` and ``--threads`` reproduce the weights bit-for-bit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import open_clip  # noqa: E402
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD  # noqa: E402

from clipsql.ingest import demo  # noqa: E402

# Seeds of the data streams.  Training batch ``step`` of run ``--seed s`` uses
# generate_samples(batch, TRAIN_DATA_SEED_BASE * (s + 1) + step); the held-out
# set uses EVAL_DATA_SEED, which no training run touches (train seeds >= 1e6).
TRAIN_DATA_SEED_BASE = 1_000_000
EVAL_DATA_SEED = 999
EVAL_N = 1000
EVAL_GROUP = 100

DEGENERATE_KINDS = ("blank", "placeholder", "generic_caption")


def model_config(kind: str, init_logit_bias: float = -10.0) -> dict:
    """The ``open_clip_config.json`` content for ``kind`` ('clip' | 'siglip')."""
    model_cfg = {
        "embed_dim": 64,
        "vision_cfg": {
            "image_size": demo.IMAGE_SIZE,
            "layers": [1, 1, 1, 1],  # ModifiedResNet
            "width": 8,
            "head_width": 64,  # attnpool: 8 * 32 = 256 features, 4 heads
            "patch_size": None,
        },
        "text_cfg": {
            "context_length": 32,  # longest demo caption is 32 tokens incl. SOT/EOT
            "vocab_size": 49408,  # SimpleTokenizer
            "width": 64,
            "heads": 4,
            "layers": 2,
        },
    }
    if kind == "siglip":
        model_cfg["init_logit_scale"] = math.log(10.0)
        model_cfg["init_logit_bias"] = float(init_logit_bias)
    elif kind != "clip":
        raise ValueError(kind)
    preprocess_cfg = {
        "size": demo.IMAGE_SIZE,
        "mode": "RGB",
        "mean": list(OPENAI_DATASET_MEAN),
        "std": list(OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


_MEAN = torch.tensor(OPENAI_DATASET_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(OPENAI_DATASET_STD, dtype=torch.float32).view(3, 1, 1)


def images_to_tensor(images) -> torch.Tensor:
    """uint8 (N, 64, 64, 3) -> normalized float (N, 3, 64, 64).

    Same arithmetic as open_clip's eval preprocess (Resize/CenterCrop are
    no-ops on 64x64 inputs, ToTensor = permute + float/255, Normalize = sub
    mean, div std), so the result is bit-identical to ``preprocess(PIL)``.
    """
    x = torch.from_numpy(np.ascontiguousarray(np.stack(list(images))))
    x = x.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
    return (x - _MEAN) / _STD


def repair_degenerate(samples, rng: np.random.Generator):
    """Images and captions of the batch; degenerate items re-paired at random.

    The captions of all degenerate items in the batch are shuffled among them,
    so a degenerate image/caption pair carries no information.
    """
    images = [s.image for s in samples]
    captions = [s.caption for s in samples]
    idx = [i for i, s in enumerate(samples) if s.kind in DEGENERATE_KINDS]
    if len(idx) > 1:
        perm = rng.permutation(len(idx))
        shuffled = [captions[idx[p]] for p in perm]
        for i, c in zip(idx, shuffled):
            captions[i] = c
    return images, captions


@torch.no_grad()
def retrieval_top1(model, tokenizer, samples, group: int = EVAL_GROUP, preprocess=None) -> dict:
    """Top-1 retrieval inside groups of ``group`` candidates.

    For each group of ``group`` consecutive samples, image->text picks the
    caption with the highest cosine similarity among the group's captions,
    text->image the image among the group's images.

    ``image_to_text_top1`` / ``text_to_image_top1``: a pick is a hit when the
    picked caption correctly describes the query image (resp. the query
    caption correctly describes the picked image), judged against what is
    drawn (``demo.caption_matches``) -- captions drop size/position at random,
    so e.g. "a green circle" and "a large green circle on the left" can both
    be right for one image.  ``*_exact``: a hit only when the picked item's
    caption string equals the query's.
    """
    model.eval()
    hit = {"i2t": 0, "t2i": 0, "i2t_exact": 0, "t2i_exact": 0}
    total = 0
    for g0 in range(0, len(samples), group):
        chunk = samples[g0:g0 + group]
        if preprocess is None:
            x = images_to_tensor([s.image for s in chunk])
        else:
            from PIL import Image

            x = torch.stack([preprocess(Image.fromarray(s.image)) for s in chunk])
        caps = [s.caption for s in chunk]
        img = model.encode_image(x, normalize=True)
        txt = model.encode_text(tokenizer(caps), normalize=True)
        sim = img @ txt.T
        i2t = sim.argmax(dim=1).tolist()
        t2i = sim.argmax(dim=0).tolist()
        hit["i2t_exact"] += sum(caps[j] == caps[i] for i, j in enumerate(i2t))
        hit["t2i_exact"] += sum(caps[j] == caps[i] for i, j in enumerate(t2i))
        hit["i2t"] += sum(demo.caption_matches(caps[j], chunk[i].scene) for i, j in enumerate(i2t))
        hit["t2i"] += sum(demo.caption_matches(caps[i], chunk[j].scene) for i, j in enumerate(t2i))
        total += len(chunk)
    return {
        "image_to_text_top1": hit["i2t"] / total,
        "text_to_image_top1": hit["t2i"] / total,
        "image_to_text_top1_exact": hit["i2t_exact"] / total,
        "text_to_image_top1_exact": hit["t2i_exact"] / total,
        "n": total,
    }


def heldout_normal(n: int = EVAL_N, seed: int = EVAL_DATA_SEED):
    """The first ``n`` samples of kind 'normal' in the stream of ``seed``."""
    out, m = [], n
    while len(out) < n:
        m = int(m * 1.3) + 16
        out = [s for s in demo.generate_samples(m, seed) if s.kind == "normal"]
    return out[:n]


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "bn" in name or "ln" in name or "logit_" in name or "embedding" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def train(kind: str, out: Path, steps: int, batch: int, lr: float, seed: int, threads: int,
          warmup: int, weight_decay: float, init_logit_bias: float = -10.0, log_every: int = 50) -> dict:
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    cfg = model_config(kind, init_logit_bias)

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
        torch.manual_seed(seed)
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp}")
    assert isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer), type(tokenizer)

    # our tensor preprocessing == open_clip's preprocess, bit for bit
    from PIL import Image

    probe = demo.generate_samples(8, seed=EVAL_DATA_SEED + 1)
    ref = torch.stack([preprocess(Image.fromarray(s.image)) for s in probe])
    assert torch.equal(ref, images_to_tensor([s.image for s in probe])), "preprocess mismatch"

    if kind == "clip":
        loss_fn = open_clip.loss.ClipLoss()
    else:
        loss_fn = open_clip.loss.SigLipLoss()
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)

    def lr_at(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * 0.5 * (1 + math.cos(math.pi * t))

    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{kind}] {n_params / 1e6:.2f}M params, {steps} steps x {batch}, lr {lr}, threads {threads}", flush=True)
    seen_tokens: set[int] = set()
    pair_rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0xBA7C])))
    load_start = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        samples = demo.generate_samples(batch, seed=TRAIN_DATA_SEED_BASE * (seed + 1) + step)
        images, captions = repair_degenerate(samples, pair_rng)
        x = images_to_tensor(images)
        tok = tokenizer(captions)
        seen_tokens.update(torch.unique(tok).tolist())
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        outputs = model(x, tok)
        loss = loss_fn(*outputs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"[{kind}] step {step:4d} loss {loss.item():.4f} scale {model.logit_scale.exp().item():.2f}"
                  + (f" bias {model.logit_bias.item():.2f}" if model.logit_bias is not None else "")
                  + f" t={time.perf_counter() - t0:.0f}s", flush=True)
    wall = time.perf_counter() - t0

    model.eval()
    heldout = heldout_normal()
    acc_fp32 = retrieval_top1(model, tokenizer, heldout)
    print(f"[{kind}] held-out (fp32): {acc_fp32}", flush=True)

    # ---- save: fp16, unused token rows zeroed
    seen_tokens.discard(0)  # padding
    sot = tokenizer.sot_token_id
    eot = tokenizer.eot_token_id
    keep = sorted(seen_tokens | {sot, eot})
    state = {
        k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach().clone()).contiguous()
        for k, v in model.state_dict().items()  # BatchNorm num_batches_tracked stays int64
    }
    emb = state["token_embedding.weight"]
    mask = torch.zeros(emb.shape[0], dtype=torch.bool)
    mask[keep] = True
    emb[~mask] = 0

    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(state, str(out / "open_clip_model.safetensors"))
    (out / "open_clip_model.safetensors").chmod(0o644)

    # ---- reload through open_clip's local-dir loader and re-evaluate
    reloaded, _, pp = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tk = open_clip.get_tokenizer(f"local-dir:{out}")
    acc_saved = retrieval_top1(reloaded, tk, heldout, preprocess=pp)
    print(f"[{kind}] held-out (saved fp16, via local-dir + preprocess): {acc_saved}", flush=True)

    prov = {
        "model": out.name,
        "kind": kind,
        "loss": type(loss_fn).__name__,
        "recipe": {
            "seed": seed,
            "steps": steps,
            "batch": batch,
            "lr": lr,
            "schedule": f"linear warmup {warmup} steps, then cosine to 0",
            "optimizer": f"AdamW(betas=(0.9, 0.98), eps=1e-6, weight_decay={weight_decay} on non-norm/bias/embedding weights)",
            "threads": threads,
            "init_logit_scale": round(float(cfg["model_cfg"].get("init_logit_scale", math.log(1 / 0.07))), 4),
            "init_logit_bias": cfg["model_cfg"].get("init_logit_bias"),
            "degenerate_pairs": "captions of blank/placeholder/generic_caption items shuffled among them each batch",
        },
        "data": {
            "generator": "ingest.demo.generate_samples",
            "generator_version": demo.GENERATOR_VERSION,
            "train_seeds": f"{TRAIN_DATA_SEED_BASE * (seed + 1)} + step (one call of generate_samples(batch, .) per step)",
            "eval_seed": EVAL_DATA_SEED,
        },
        "n_params": n_params,
        "token_rows_kept": len(keep),
        "train_wall_time_s": round(wall, 1),
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_avg_1m_at_start": load_start,
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
            "platform": platform.platform(),
        },
        "heldout_eval": {
            "protocol": (f"first {EVAL_N} samples of kind 'normal' from generate_samples(., seed={EVAL_DATA_SEED}), "
                         f"in {EVAL_N // EVAL_GROUP} consecutive groups of {EVAL_GROUP}; top-1 by cosine similarity "
                         f"among the group's {EVAL_GROUP} candidates (images normalized exactly like the "
                         "local-dir preprocess). image_to_text/text_to_image_top1: a hit when the retrieved "
                         "caption correctly describes the query image (resp. the query caption the retrieved "
                         "image), judged against the drawn scene with ingest.demo.caption_matches (captions "
                         "drop size/position at random, so several captions in a group can be right). "
                         "*_exact: a hit only when the retrieved item's caption string equals the query's."),
            "fp32_in_training": acc_fp32,
            "saved_fp16_via_local_dir": acc_saved,
            "image_to_text_top1": acc_saved["image_to_text_top1"],
            "text_to_image_top1": acc_saved["text_to_image_top1"],
            "image_to_text_top1_exact": acc_saved["image_to_text_top1_exact"],
            "text_to_image_top1_exact": acc_saved["text_to_image_top1_exact"],
        },
        "versions": {
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
    }
    (out / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
    return prov


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=["clip", "siglip"], required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--init-logit-bias", type=float, default=-10.0, help="siglip only")
    args = ap.parse_args(argv)
    if "siglip" in args.out.name.lower():
        # get_tokenizer() would pick the HF SigLIP tokenizer for such names
        ap.error("keep 'siglip' out of the output folder name (use e.g. demo-sig)")
    prov = train(args.kind, args.out, args.steps, args.batch, args.lr, args.seed, args.threads,
                 args.warmup, args.weight_decay, args.init_logit_bias)
    print(json.dumps(prov["heldout_eval"], indent=2))


if __name__ == "__main__":
    main()
