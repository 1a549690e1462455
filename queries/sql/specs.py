"""Every score and SQL function clipsql adds to DuckDB, declared once, as data.

`SPECS` is the one list. From it come:
* the UDF registrations and SQL macros (`queries.sql.functions.register`: each `Udf` names the
  Arrow implementation `functions.IMPLEMENTATIONS[impl]` that calls the spec's kernel);
* the columns of the `scores` view and the scores `clipsql score` can store (`SCORE_COLUMNS`,
  `score_expressions`), and the pool-only stored scores (`POOL_COLUMNS`);
* the function table of the SQL help (`.help` in `clipsql sql`) and of the README (`help_table`,
  `readme_table`; tests/test_specs.py checks the README's table is the generated one).

A SQL function's `args` are the arguments of the UDF it calls, in order: a parameter (`emb`), an
optional parameter (`model?`: NULL when left out; `scale?10.0`: 10.0 when left out; optional
parameters are trailing and each one adds an overload) or a constant (`'image'`, `NULL`). The
parameters `emb`, `img` and `txt` are embeddings: when every model of the store has one width d
each overload is also declared on FLOAT[d] (no ARRAY → LIST cast on the scan).
"""
from __future__ import annotations

from dataclasses import dataclass

F, V, D = "FLOAT[]", "VARCHAR", "DOUBLE"
EMBEDDING_PARAMS = ("emb", "img", "txt")
NEEDS = ("fit", "reference", "running", "target", "prompt", "siglip")


@dataclass(frozen=True)
class Udf:
    """A DuckDB Arrow UDF: its name, parameter types, the key of its implementation in
    `queries.sql.functions.IMPLEMENTATIONS`, and its result type (DOUBLE: a score; FLOAT[]: a vector)."""
    name: str
    params: tuple[str, ...]
    impl: str
    returns: str = D


@dataclass(frozen=True)
class SqlFunction:
    """A SQL macro: over `udf` with `args` (see the module doc), or native SQL `body` over `args`."""
    name: str
    args: tuple[str, ...]
    udf: str | None = None
    body: str | None = None

    def params(self) -> tuple[list[str], list[tuple[str, str]]]:
        """(required parameter names, [(optional name, default)])."""
        req, opt = [], []
        for a in self.args:
            if _constant(a):
                continue
            if "?" in a:
                name, default = a.split("?", 1)
                opt.append((name, default or "NULL"))
            else:
                req.append(a)
        return req, opt

    def overloads(self) -> list[tuple[list[str], list[str]]]:
        """[(SQL parameters, UDF call arguments)], one per number of optional parameters given."""
        req, opt = self.params()
        out = []
        for k in range(len(opt) + 1):
            given = {name for name, _ in opt[:k]}
            call = []
            for a in self.args:
                name, optional, default = a.partition("?")
                call.append(a if _constant(a) else name if (not optional or name in given) else (default or "NULL"))
            out.append((req + [name for name, _ in opt[:k]], call))
        return out


@dataclass(frozen=True)
class Column:
    """A column of the `scores` view (and a score `clipsql score` can store): its SQL expression over
    `{i}` (e.image_embedding), `{t}` (e.text_embedding), `{m}` (the model literal) and e.id;
    `siglip_only`: NULL for a CLIP model."""
    name: str
    expr: str
    siglip_only: bool = False


@dataclass(frozen=True)
class ScoreSpec:
    """One score (or vector function): how it is called, what it computes and when it is NULL."""
    key: str
    usage: str                          # the SQL forms, as the help and README show them
    meaning: str                        # one line
    section: str                        # docs/science.md section ("" for none)
    kernel: tuple[str, ...]             # the kernels.scores functions it calls ("" entries: native SQL)
    needs: tuple[str, ...]              # of NEEDS: a fit, its reference sample, running statistics, …
    nulls: str                          # when it is NULL
    udfs: tuple[Udf, ...] = ()
    functions: tuple[SqlFunction, ...] = ()
    columns: tuple[Column, ...] = ()
    pool_columns: tuple[str, ...] = ()  # stored-only columns (a property of the whole pool)


def _constant(a: str) -> bool:
    return a == "NULL" or a.startswith("'") or a[:1].isdigit()


_VECTOR_NULL = "NULL, zero or non-finite vector"
_IG_FN = ("emb", "model?", "id?")


def _ig(key: str, udf: str, usage: str, meaning: str, reverse: bool) -> ScoreSpec:
    return ScoreSpec(
        key, usage, meaning, "§1", ("info_gain",), ("fit", "reference"),
        f"{_VECTOR_NULL}; no fit", udfs=(Udf(udf, (F, V, V, V), "info_gain_reverse" if reverse else "info_gain"),),
        functions=tuple(SqlFunction(f"{m}_{key}", (_IG_FN[0], f"'{m}'") + _IG_FN[1:], udf) for m in ("image", "text")),
        # the row's id: a reference row leaves its own pair out (docs/science.md §1)
        columns=tuple(Column(f"{m}_{key}", f"{m}_{key}({{{m[0]}}}, {{m}}, e.id)") for m in ("image", "text")))


SPECS: tuple[ScoreSpec, ...] = (
    _ig("info_gain", "_clipsql_info_gain", "`image_info_gain(emb [, model [, id]])`, `text_info_gain`",
        "KL(posterior ‖ prior) over the reference sample; pass the row's `id` so that a reference row leaves "
        "its own pair out (the `scores` view does; without it the row is scored as one outside the reference)",
        reverse=False),
    _ig("info_gain_reverse", "_clipsql_info_gain_reverse",
        "`image_info_gain_reverse`, `text_info_gain_reverse` (same arguments)", "KL(prior ‖ posterior)",
        reverse=True),
    ScoreSpec(
        "info_gain_approx", "`image_info_gain_approx`, `text_info_gain_approx`",
        "½a²(x̂−ū)ᵀG(x̂−ū), the covariance-weighted norm; for SigLIP G is the Fisher metric of the normalized "
        "sigmoid, the other modality's vectors scaled by 1 − σ(a⟨ū, ·⟩ + b) (slope 0.97 / 0.99 against the "
        "exact KL on the shipped SigLIP model at a = 1; 4.1 without the scaling)",
        "§2", ("info_gain_approx",), ("fit",), f"{_VECTOR_NULL}; no fit",
        udfs=(Udf("_clipsql_info_gain_approx", (F, V, V), "info_gain_approx"),),
        functions=tuple(SqlFunction(f"{m}_info_gain_approx", ("emb", f"'{m}'", "model?"), "_clipsql_info_gain_approx")
                        for m in ("image", "text")),
        columns=tuple(Column(f"{m}_info_gain_approx", f"{m}_info_gain_approx({{{m[0]}}}, {{m}})")
                      for m in ("image", "text"))),
    ScoreSpec(
        "centered_norm", "`centered_norm(emb, modality [, model])`", "a²‖x̂−ū‖²", "§2", ("centered_norm",),
        ("fit",), f"{_VECTOR_NULL}; no fit",
        udfs=(Udf("_clipsql_centered_norm", (F, V, V), "centered_norm"),),
        functions=(SqlFunction("centered_norm", ("emb", "modality", "model?"), "_clipsql_centered_norm"),),
        columns=tuple(Column(f"{m}_centered_norm", f"centered_norm({{{m[0]}}}, '{m}', {{m}})")
                      for m in ("image", "text"))),
    ScoreSpec(
        "raw_norm", "`raw_norm(emb)`", "‖x‖² of the raw vector", "§2", ("raw_norm",), (), _VECTOR_NULL,
        functions=(SqlFunction("raw_norm", ("emb",), body=(
            "CASE WHEN emb IS NOT NULL AND list_dot_product(emb::FLOAT[], emb::FLOAT[]) > 0 THEN "
            "_clipsql_finite(list_dot_product(emb::FLOAT[], emb::FLOAT[])::DOUBLE) END")),),
        columns=tuple(Column(f"{m}_raw_norm", f"raw_norm({{{m[0]}}})") for m in ("image", "text"))),
    ScoreSpec(
        "conformity", "`image_conformity(emb [, model])`, `text_conformity`",
        "mean cosine to every other stored vector", "§3", ("conformity",), ("running",), _VECTOR_NULL,
        udfs=(Udf("_clipsql_conformity", (F, V, V), "conformity"),),
        functions=tuple(SqlFunction(f"{m}_conformity", ("emb", f"'{m}'", "model?"), "_clipsql_conformity")
                        for m in ("image", "text")),
        columns=tuple(Column(f"{m}_conformity", f"{m}_conformity({{{m[0]}}}, {{m}})") for m in ("image", "text"))),
    ScoreSpec(
        "conformity_estimate", "`conformity_estimate(emb, modality [, model])`",
        "cos(x, m), m the mean of the normalized vectors: an exact affine function of conformity", "§3",
        ("conformity_estimate",), ("running",), _VECTOR_NULL,
        udfs=(Udf("_clipsql_conformity_estimate", (F, V, V), "conformity_estimate"),),
        functions=(SqlFunction("conformity_estimate", ("emb", "modality", "model?"), "_clipsql_conformity_estimate"),),
        columns=tuple(Column(f"{m}_conformity_estimate", f"conformity_estimate({{{m[0]}}}, '{m}', {{m}})")
                      for m in ("image", "text"))),
    ScoreSpec(
        "conformity_estimate_raw", "`conformity_estimate_raw(emb, modality [, model])`",
        "cos(x, raw mean): a different quantity (Pearson ≈ 0.88 with conformity when raw norms vary), kept "
        "under its own name", "§3", ("conformity_estimate_raw",), ("running",), _VECTOR_NULL,
        udfs=(Udf("_clipsql_conformity_estimate_raw", (F, V, V), "conformity_estimate_raw"),),
        functions=(SqlFunction("conformity_estimate_raw", ("emb", "modality", "model?"),
                               "_clipsql_conformity_estimate_raw"),)),
    ScoreSpec(
        "clip_score", "`clip_score(img, txt)`", "cos(image, text)", "§4", ("clip_score",), (),
        "either vector NULL, zero or non-finite",
        functions=(SqlFunction("clip_score", ("img", "txt"), body=(
            "CASE WHEN img IS NOT NULL AND txt IS NOT NULL "
            "THEN _clipsql_finite(list_cosine_similarity(img::FLOAT[], txt::FLOAT[])) END")),),
        columns=(Column("clip_score", "clip_score({i}, {t})"),)),
    ScoreSpec(
        "neg_clip_loss", "`neg_clip_loss(img, txt [, model])`, `neg_siglip_loss`",
        "negCLIPLoss / negated SigLIP loss against fixed seeded reference batches (see Curation)", "§5",
        ("neg_clip_loss", "neg_siglip_loss"), ("fit", "reference", "siglip"),
        "either vector NULL, zero or non-finite; no fit; neg_siglip_loss: NULL in `scores` for a CLIP model",
        udfs=(Udf("_clipsql_neg_clip_loss", (F, F, V), "neg_clip_loss"),
              Udf("_clipsql_neg_siglip_loss", (F, F, V), "neg_siglip_loss")),
        functions=tuple(SqlFunction(n, ("img", "txt", "model?"), f"_clipsql_{n}")
                        for n in ("neg_clip_loss", "neg_siglip_loss")),
        columns=(Column("neg_clip_loss", "neg_clip_loss({i}, {t}, {m})"),
                 Column("neg_siglip_loss", "neg_siglip_loss({i}, {t}, {m})", siglip_only=True))),
    ScoreSpec(
        "norm_sim", "`norm_sim_2(img, 'TARGET')`, `norm_sim_inf(img, 'TARGET')`",
        "NormSim against a named target set", "§6", ("norm_sim_2", "norm_sim_inf"), ("target",),
        f"{_VECTOR_NULL}; NULL target",
        udfs=(Udf("_clipsql_norm_sim_2", (F, V), "norm_sim_2"), Udf("_clipsql_norm_sim_inf", (F, V), "norm_sim_inf")),
        functions=tuple(SqlFunction(n, ("emb", "target"), f"_clipsql_{n}") for n in ("norm_sim_2", "norm_sim_inf"))),
    ScoreSpec(
        "text_embedding", "`text_embedding('a prompt' [, model])`", "the prompt's raw text embedding, `FLOAT[d]`",
        "", (), ("prompt",), "NULL prompt",
        udfs=(Udf("_clipsql_text_embedding", (V, V), "text_embedding", returns=F),),
        functions=(SqlFunction("text_embedding", ("prompt", "model?"), "_clipsql_text_embedding"),)),
    ScoreSpec(
        "importance_weight", "`importance_weight(img, 'a prompt' [, scale [, model]])`",
        "density ratio p(x\\|q)/p(x) against the reference images", "§7", ("importance_weight",),
        ("fit", "reference", "prompt"), f"{_VECTOR_NULL}; NULL prompt or scale",
        udfs=(Udf("_clipsql_importance_weight", (F, V, D, V), "importance_weight"),),
        functions=(SqlFunction("importance_weight", ("emb", "prompt", "scale?10.0", "model?"),
                               "_clipsql_importance_weight"),)),
    ScoreSpec(
        "vslerp", "`vslerp(a, b, theta, alpha [, model [, modality]])`",
        "SLERP(a − αm, b − αm, θ) + αm about the modality centre m, `FLOAT[d]`", "§8", ("vslerp",), ("running",),
        "NULL or non-finite a, b, θ or α",
        udfs=(Udf("_clipsql_vslerp", (F, F, D, D, V, V), "vslerp", returns=F),),
        functions=(SqlFunction("vslerp", ("a", "b", "theta", "alpha", "model?", "modality?"), "_clipsql_vslerp"),)),
    ScoreSpec(
        "neg_clip_loss_pool", "`clipsql score --neg-clip-loss-pool`",
        "negCLIPLoss in the paper's pool form: K random partitions of the pool into batches", "§5",
        ("neg_clip_loss_pool",), (), "a row that sat out every partition; invalid vectors",
        pool_columns=("neg_clip_loss_pool",)),
    ScoreSpec(
        "norm_sim_d", "`clipsql score --norm-sim-d`",
        "NormSim-D: the pool's own second moment, refined by keeping the top rows", "§6",
        ("norm_sim_d",), (), _VECTOR_NULL, pool_columns=("norm_sim_d",)),
)

UDFS: tuple[Udf, ...] = tuple(u for s in SPECS for u in s.udfs)
FUNCTIONS: tuple[SqlFunction, ...] = tuple(f for s in SPECS for f in s.functions)
COLUMNS: tuple[Column, ...] = tuple(c for s in SPECS for c in s.columns)
SCORE_COLUMNS: tuple[str, ...] = tuple(c.name for c in COLUMNS)
POOL_COLUMNS: tuple[str, ...] = tuple(c for s in SPECS for c in s.pool_columns)


def score_expressions(model_literal: str, kind: str = "clip") -> dict[str, str]:
    """SQL expression of each `scores` column for one model (over e.image_embedding/e.text_embedding);
    a SigLIP-only column (`neg_siglip_loss`) is NULL for a CLIP model."""
    return {c.name: "NULL::DOUBLE" if c.siglip_only and kind != "siglip" else
            c.expr.format(i="e.image_embedding", t="e.text_embedding", m=model_literal) for c in COLUMNS}


def help_rows() -> list[tuple[str, str]]:
    """(usage, meaning) of every SQL function, in SPECS order."""
    return [(s.usage, s.meaning) for s in SPECS if s.functions]


def readme_table() -> str:
    """The README's function table (markdown)."""
    return "\n".join(["| function | meaning |", "|---|---|"] + [f"| {u} | {m} |" for u, m in help_rows()])


def help_table() -> str:
    """The SQL help: one entry per function, with its docs/science.md section and when it is NULL."""
    lines = []
    for s in SPECS:
        if not s.functions:
            continue
        sec = f" (docs/science.md {s.section})" if s.section else ""
        lines.append(s.usage.replace("`", "") + sec)
        lines.append("    " + s.meaning.replace("\\|", "|").replace("`", ""))
        lines.append(f"    NULL when: {s.nulls}")
    return "\n".join(lines)
