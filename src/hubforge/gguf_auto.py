"""KL-budgeted per-tensor quantization: measure how much each tensor group costs at each type, choose the smallest
mixture whose estimated cost fits a budget, build it with llama-quantize and keep it only if the measurement of the
real file meets the budget.

    from hubforge import gguf_auto, llamatools
    result = gguf_auto.auto(f16, work, base_logits, {"mean_kld": 0.05, "disagree": 0.10, "ln_ppl_ratio": 0.0488},
                            log=work / "llama.log")
    result["quantize_args"]   # the llama-quantize options that reproduce the file

Costs are measured against a reference file with every group at Q8_0 (near-lossless): a group's cost at a type is
what the file's metric grows by when only that group drops to that type. The chooser adds the costs of the groups
(a first-order estimate; interactions are why the real file is measured before it counts). Metrics are those
llamatools.kld() returns, with `disagree` = 1 - same_top; all three are roughly additive over small perturbations.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

# Types tried per group, smallest first. K-quants need rows that are a multiple of 256 values, the others 32; a
# group gets the K family when all its rows allow it, otherwise the 32-value family (llama.cpp would silently fall
# back to another type). Gemma 3 270M's rows are 640 long, so most of its tensors, the embedding among them, can
# only take the 32-value types (Q4_K_M of that model is Q5_0 and Q8_0 in most tensors for this reason).
# Three steps per family (4, 5-6 and 8 bits): every probe is a quantize and a measurement, and the in-between types
# (Q5_K, Q5_0) were never chosen on the embedded recipe while their measured costs sat inside the probes' noise
# (a few tokens of ~300 scored); they cost a third of the search's time.
K_CANDIDATES = ("Q4_K", "Q6_K", "Q8_0")
BLOCK32_CANDIDATES = ("IQ4_NL", "Q5_1", "Q8_0")
CANDIDATES = tuple(dict.fromkeys(K_CANDIDATES + BLOCK32_CANDIDATES))  # every type offered, once (for messages)
# Groups smaller than this share of the reference file stay at the reference type: probing them costs as much as
# probing the embedding, and shrinking them cannot move the file size by much.
MIN_SHARE = 0.03
REFERENCE = "Q8_0"
# Tensor groups: name -> regex llama-quantize matches against tensor names. token_embd goes through
# --token-embedding-type (it is also the output matrix when the embeddings are tied, as in Gemma).
GROUPS = {"token_embd": r"^token_embd\.weight$", "output": r"^output\.weight$",
          **{kind: rf"\.{kind}\.weight$" for kind in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                       "ffn_gate", "ffn_up", "ffn_down")}}


@dataclass
class Option:
    type: str
    size: int  # bytes of the group's tensors at this type
    cost: dict[str, float] = field(default_factory=dict)  # metric -> increase over the reference file


@dataclass
class Group:
    name: str
    pattern: str
    options: list[Option]  # sorted by size, ascending


def total(choice: dict[str, Option], metric: str, baseline: dict[str, float]) -> float:
    return baseline.get(metric, 0.0) + sum(opt.cost.get(metric, 0.0) for opt in choice.values())


def fits(choice: dict[str, Option], limits: dict[str, float], baseline: dict[str, float]) -> bool:
    return all(total(choice, m, baseline) <= limit for m, limit in limits.items())


def choose(groups: list[Group], limits: dict[str, float], baseline: dict[str, float] | None = None,
           exhaustive_up_to: int = 200_000) -> dict[str, Option] | None:
    """The smallest choice of one option per group whose estimated metrics (baseline + costs) stay within `limits`;
    None when even the largest options do not fit. Exact when the options multiply to at most `exhaustive_up_to`
    combinations, otherwise greedy (upgrade the group with the best excess reduction per byte, then drop any
    upgrade the budget does not need)."""
    baseline = baseline or {}
    if math.prod(len(g.options) for g in groups) <= exhaustive_up_to:
        best = None
        for combo in itertools.product(*(g.options for g in groups)):
            choice = {g.name: o for g, o in zip(groups, combo)}
            size = sum(o.size for o in combo)
            if (best is None or size < best[0]) and fits(choice, limits, baseline):
                best = (size, choice)
        return best[1] if best else None
    return _greedy(groups, limits, baseline)


def _excess(choice, limits, baseline) -> float:
    return sum(max(0.0, total(choice, m, baseline) - lim) / max(lim, 1e-12) for m, lim in limits.items())


def _greedy(groups, limits, baseline):
    choice = {g.name: g.options[0] for g in groups}
    by_name = {g.name: g for g in groups}
    while not fits(choice, limits, baseline):
        now, best = _excess(choice, limits, baseline), None
        for g in groups:
            for opt in g.options:
                extra = opt.size - choice[g.name].size
                if extra <= 0:
                    continue
                gain = now - _excess(choice | {g.name: opt}, limits, baseline)
                if gain > 0 and (best is None or gain / extra > best[0]):
                    best = (gain / extra, g.name, opt)
        if best is None:
            return None
        choice[best[1]] = best[2]
    for name in sorted(choice, key=lambda n: -choice[n].size):  # undo upgrades the budget turned out not to need
        for opt in by_name[name].options:
            if opt.size < choice[name].size and fits(choice | {name: opt}, limits, baseline):
                choice[name] = opt
                break
    return choice


def overrides(choice: dict[str, Option], groups: list[Group]) -> dict:
    """A choice -> llamatools.quantize keyword arguments (tensor_types and token_embedding_type)."""
    patterns = {g.name: g.pattern for g in groups}
    tensor_types = {patterns[n]: o.type for n, o in choice.items() if n != "token_embd"}
    return {"tensor_types": tensor_types, "token_embedding_type": choice["token_embd"].type if "token_embd" in choice else None}


def tensor_groups(gguf_path: Path, per_layer: tuple[str, ...] = (), min_share: float = MIN_SHARE) -> list[Group]:
    """The file's quantizable tensors in GROUPS (kinds listed in `per_layer` split into one group per block), each
    with the candidate types its rows allow (K_CANDIDATES or BLOCK32_CANDIDATES) and their exact sizes; costs are
    left empty. Groups under `min_share` of the file at the reference type are left out (they stay at it)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    def size(qtype: str, shapes: list) -> int:
        block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
        return sum(math.prod(s) // block * nbytes for s in shapes)

    members: dict[str, tuple[str, list]] = {}
    reference_total = 0
    for t in GGUFReader(gguf_path).tensors:
        shape = [int(x) for x in t.shape]
        kind = next((k for k, p in GROUPS.items() if re.search(p, t.name)), None)
        reference_total += size(REFERENCE, [shape]) if len(shape) > 1 else math.prod(shape) * 4
        if kind is None:
            continue
        layer = re.match(r"blk\.(\d+)\.", t.name)
        name, pattern = kind, GROUPS[kind]
        if kind in per_layer and layer:
            name, pattern = f"{kind}.{layer.group(1)}", rf"^blk\.{layer.group(1)}\.{kind}\.weight$"
        members.setdefault(name, (pattern, []))[1].append(shape)
    groups = []
    for name, (pattern, shapes) in members.items():
        family = K_CANDIDATES if all(s[0] % 256 == 0 for s in shapes) else BLOCK32_CANDIDATES  # s[0]: ggml's ne[0]
        if all(s[0] % 32 == 0 for s in shapes) and size(REFERENCE, shapes) >= min_share * reference_total:
            options = [Option(q, size(q, shapes)) for q in family]
            groups.append(Group(name, pattern, sorted(options, key=lambda o: o.size)))
    return groups


def metrics(measured: dict) -> dict[str, float]:
    """llamatools.kld() output -> the additive metrics the chooser budgets."""
    return {"mean_kld": measured["mean_kld"], "disagree": 1 - measured["same_top"],
            "ln_ppl_ratio": measured["ln_ppl_ratio"]}


def measure_costs(f16: Path, work: Path, base_logits: Path | None, groups: list[Group], *, log: Path,
                  imatrix: Path | None = None, limits: dict[str, float] | None = None, ctx: int = 512, progress=print,
                  measure=None) -> dict[str, float]:
    """Fill each option's cost (one quantize + one KL run per group and type below the reference, largest type
    first); returns the reference file's own metrics (the baseline the costs add to). With `limits`, a group's
    smaller types are not tried once one type alone breaks them (smaller ones would only cost more): those options
    are dropped from the group. `measure(path) -> dict` replaces llama-perplexity's KL run against `base_logits`
    (the gguf stage measures on the chat-formatted held-out tokens, which llama-perplexity cannot read)."""
    from hubforge import llamatools

    def run(name: str, **kw) -> dict:
        out = Path(work) / f"probe-{name}.gguf"
        llamatools.quantize(f16, out, REFERENCE, log=log, imatrix=imatrix, **kw)
        try:
            return metrics(measure(out) if measure else llamatools.kld(out, base_logits, log=log, ctx=ctx))
        finally:
            out.unlink()

    baseline = run("reference")
    for g in groups:
        kept = []
        for opt in sorted(g.options, key=lambda o: -o.size):
            if opt.type != REFERENCE:
                got = run(f"{g.name}-{opt.type}", **overrides({g.name: opt}, groups))
                opt.cost = {m: max(0.0, got[m] - baseline[m]) for m in baseline}
                progress(f"  {g.name:14} {opt.type:6} {opt.size / 2**20:7.1f} MiB  " +
                         "  ".join(f"{m} +{v:.4f}" for m, v in opt.cost.items()))
            kept.append(opt)
            if limits and not fits({g.name: opt}, limits, baseline):
                break
        g.options = sorted(kept, key=lambda o: o.size)
    return baseline


def auto(f16: Path, work: Path, base_logits: Path | None, limits: dict[str, float], *, log: Path, out: Path | None = None,
         imatrix: Path | None = None, ftype: str = REFERENCE, per_layer: tuple[str, ...] = (), tries: int = 3,
         ctx: int = 512, progress=print, measure=None) -> dict:
    """Measure, choose, build and verify. Each failed verification tightens the violated limits by the ratio of
    estimate to measurement and chooses again. Returns {file, size, types, quantize_args, estimate, measured,
    meets, tries, groups}; `meets` False means no try passed the measured gate (the last file is kept for
    inspection, never to be published as meeting the budget)."""
    from hubforge import llamatools

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    groups = tensor_groups(f16, per_layer=per_layer)
    baseline = measure_costs(f16, work, base_logits, groups, log=log, imatrix=imatrix, limits=limits, ctx=ctx,
                             progress=progress, measure=measure)
    out = Path(out or work / "auto.gguf")
    budget = dict(limits)
    for attempt in range(1, tries + 1):
        choice = choose(groups, budget, baseline)
        if choice is None:
            raise ValueError(f"no mixture of {', '.join(CANDIDATES)} meets {budget} by the measured costs "
                             f"(the Q8_0 reference alone measures {baseline})")
        kw = overrides(choice, groups)
        llamatools.quantize(f16, out, ftype, log=log, imatrix=imatrix, **kw)
        measured = measure(out) if measure else llamatools.kld(out, base_logits, log=log, ctx=ctx)
        got = metrics(measured)
        estimate = {m: total(choice, m, baseline) for m in limits}
        meets = all(got[m] <= lim for m, lim in limits.items())
        progress(f"  try {attempt}: {out.stat().st_size / 2**20:.1f} MB, estimate {estimate}, measured {got}, "
                 f"{'meets' if meets else 'misses'} {limits}")
        if meets or attempt == tries:
            break
        for m, lim in limits.items():  # aim lower by how far the estimate undershot the measurement
            if got[m] > lim:
                budget[m] = budget[m] * min(0.9, estimate[m] / got[m]) if got[m] > 0 else budget[m]
    return {"file": str(out), "size": out.stat().st_size, "types": {n: o.type for n, o in choice.items()},
            "quantize_args": llamatools.quantize_args(ftype, imatrix, **kw), "estimate": estimate, "measured": measured,
            "meets": meets, "tries": attempt, "groups": [{"name": g.name, "options": [vars(o) for o in g.options]}
                                                         for g in groups]}
