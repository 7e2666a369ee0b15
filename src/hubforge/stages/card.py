"""Card stage: render the adapter, merged and GGUF model cards, correct by construction or not at all.

    hubforge run recipes/gemma-3-270m/persian-chat-lora.yaml --stages card

For each repo the run produced: metadata through huggingface_hub's `ModelCardData` + `EvalResult` (cardmeta.py)
-> our strict JSON Schema (cards/schema/) -> `ModelCard.from_template` with cards/templates/<kind>.md.j2 -> the
README parsed back with huggingface_hub, whose metadata and model-index must equal what went in -> no token-like
strings. Any failure is a StageError naming the field, so nothing wrong reaches `publish`. Outputs
`card/<kind>/README.md`. The Space's README (hubforge.spacecard) is rendered by the space stage, checked here too.
"""
from __future__ import annotations

import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard import REGEX_YAML_BLOCK

from hubforge import products
from hubforge.cardmeta import (KINDS, base_facts, card_metadata, cards_dir, load_results, resolve_license,
                               validate_metadata)
from hubforge.cardtext import card_context
from hubforge.errors import StageError
from hubforge.recipe import Recipe
from hubforge.redact import redact
from hubforge.rundir import RunDir
from hubforge.spacecard import render_space_readme

__all__ = ["run", "render_card", "render_space_readme", "check_card", "cards_dir"]


# The recipe sections this stage reads (part of its cache key; tests/test_layers.py checks it reads no other).
SECTIONS = ('name', 'base', 'data', 'method', 'train', 'eval', 'export', 'card', 'publish', 'space')


def run(recipe: Recipe, run_dir: RunDir) -> dict:
    results = load_results(run_dir)
    produced = {k: v for k, v in products.produced_repos(recipe, run_dir.manifest).items() if k in KINDS}
    if not produced:
        raise StageError("the run produced no model to describe (no adapter, merged model or GGUF in the manifest); "
                         "run the train stage first")
    out = run_dir.stage_dir("card")
    for stale in (out / kind / "README.md" for kind in KINDS if kind not in produced):
        stale.unlink(missing_ok=True)  # a card of an earlier run of this directory must not be published with this one
    cards = {}
    for kind in produced:
        text = render_card(kind, recipe, run_dir.manifest, results)
        (out / kind).mkdir(exist_ok=True)
        (out / kind / "README.md").write_text(text, "utf-8")
        cards[kind] = f"card/{kind}/README.md"
    if recipe.space.enabled:
        render_space_readme(recipe, run_dir)  # fail here, before anything is published, not in the space stage
    return {"cards": cards, "repos": produced, "license": resolve_license(recipe, base_facts(recipe))["license"],
            "validated": True}


def render_card(kind: str, recipe: Recipe, manifest: dict, results: dict) -> str:
    """Metadata -> schema -> template -> parse back -> compare; returns the README text or raises StageError."""
    data = card_metadata(kind, recipe, manifest, results)
    expected = data.to_dict()
    validate_metadata(expected, kind)
    context = card_context(kind, recipe, manifest, results, data)
    text = ModelCard.from_template(data, template_path=str(cards_dir() / "templates" / products.KINDS[kind].template), c=context).content
    text = text.rstrip("\n") + "\n"
    check_card(text, kind, expected, data.eval_results or [])
    return text


def check_card(text: str, kind: str, expected: dict | None = None, evals: list | None = None) -> dict:
    """Parse a rendered README the way the Hub does and check it; returns its metadata. Usable on any README."""
    match = REGEX_YAML_BLOCK.search(text)
    if not match or match.start() != 0:
        raise StageError(f"{kind} card: the README does not start with a `---` YAML metadata block")
    try:
        raw = yaml.safe_load(match.group(2)) or {}
    except yaml.YAMLError as exc:
        raise StageError(f"{kind} card: the metadata block is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise StageError(f"{kind} card: the metadata block must be a mapping, not {type(raw).__name__}")
    validate_metadata(raw, kind)  # our schema first: it names the field; huggingface_hub's errors do not always
    try:
        parsed = ModelCard(text).data
    except ValueError as exc:
        raise StageError(f"{kind} card: model-index: huggingface_hub cannot parse it: {exc}") from None
    if expected is not None:
        for key in sorted(set(expected) | set(raw), key=str):
            if expected.get(key) != raw.get(key):
                raise StageError(f"{kind} card: {key}: did not survive the round trip through the README "
                                 f"(rendered {expected.get(key)!r}, parsed back {raw.get(key)!r})")
    if evals is not None and (parsed.eval_results or []) != list(evals):
        raise StageError(f"{kind} card: model-index: huggingface_hub parses back other eval results than were rendered")
    if redact(text) != text:
        raise StageError(f"{kind} card: the text contains something that looks like an access token (hf_...); "
                         f"it must not be published. Check the recipe, the eval samples and the manifest")
    return raw
