"""The Space as the recipe describes it: the settings its app reads (title, prompts, direction) and its README
(front matter with sdk, pinned gradio, licence and the model repos it serves + cards/templates/space-readme.md.j2,
checked by parsing it back with huggingface_hub).

    from hubforge.spacecard import app_settings, render_space_readme
    text = render_space_readme(recipe, run_dir)     # StageError naming what is wrong

The card stage renders the README once to fail before anything is published; the space stage deploys both, and
`hubforge space serve` (hubforge.spaceserve) gives the same settings to the app run locally.
"""
from __future__ import annotations

import json
from importlib import metadata

from huggingface_hub import CardData, SpaceCard

from hubforge import products
from hubforge.cardmeta import KINDS, card_metadata, cards_dir, load_results
from hubforge.cardtext import card_context
from hubforge.errors import StageError
from hubforge.redact import redact

SPACE_COLORS = ("red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray")


def app_settings(recipe, backend: str) -> dict[str, str]:
    """The app's environment that comes from the recipe (the model it serves is added by the caller)."""
    return {"BACKEND": backend, "SYSTEM_PROMPT": recipe.space.system_prompt or recipe.data.system_prompt or "",
            "EXAMPLES": json.dumps(list(recipe.space.examples or recipe.eval.prompts), ensure_ascii=False),
            "TITLE": recipe.space.title, "RTL": "1" if recipe.space.rtl else "0"}


def gradio_version(manifest: dict) -> str:
    """The Space runs the gradio hubforge pins and tests with: the installed one (the manifest's, if not installed)."""
    try:
        return metadata.version("gradio")
    except metadata.PackageNotFoundError:
        version = (manifest.get("libraries") or {}).get("gradio")
        if not version:
            raise StageError("gradio is not installed, so the Space's sdk_version cannot be pinned; install hubforge's "
                             "[space] dependencies") from None
        return version


def space_metadata(recipe, manifest: dict, licence: str) -> dict:
    """The Space's front matter; `models` lists what publish pushed (what this run produced, before publishing)."""
    published = ((manifest.get("stages", {}).get("publish") or {}).get("result") or {}).get("repos") or {}
    ids = {k: v["repo_id"] for k, v in published.items()} if published else products.produced_repos(recipe, manifest)
    models = [ids[kind] for kind in ("merged", "gguf", "adapter") if ids.get(kind)]  # the Space's MODEL/GGUF/ADAPTER order
    desc = recipe.card.description.strip()
    short = desc if 0 < len(desc) <= 60 else f"Chat demo of {recipe.name}"[:60]
    color = sum(recipe.name.encode()) % len(SPACE_COLORS)  # stable per recipe, so re-deploys do not flip colours
    return {"title": recipe.space.title, "emoji": recipe.space.emoji, "colorFrom": SPACE_COLORS[color],
            "colorTo": SPACE_COLORS[(color + 3) % len(SPACE_COLORS)], "sdk": "gradio",
            "sdk_version": gradio_version(manifest), "app_file": "app.py", "license": licence,
            "short_description": short, "models": models}


def render_space_readme(recipe, run_dir) -> str:
    """README.md (front matter + text) of the Space, from cards/templates/space-readme.md.j2; raises StageError."""
    manifest = run_dir.manifest
    produced = products.produced_repos(recipe, manifest)
    kinds = [k for k in KINDS if k in produced]
    if not kinds:
        raise StageError("the Space needs a published model, but the run produced none; run train (and publish) first")
    data = card_metadata(kinds[0], recipe, manifest, {})  # validates licence and names like the model cards
    meta = space_metadata(recipe, manifest, data.license)
    if not meta["models"]:
        raise StageError("space: no model repos to link")
    context = card_context("space", recipe, manifest, load_results(run_dir), data)
    text = SpaceCard.from_template(CardData(**meta), template_path=str(cards_dir() / "templates" / products.KINDS["space"].template),
                                   c=context).content.rstrip("\n") + "\n"
    parsed = SpaceCard(text).data.to_dict()
    if parsed != meta:
        bad = next(k for k in sorted(set(meta) | set(parsed)) if meta.get(k) != parsed.get(k))
        raise StageError(f"Space README: {bad}: did not survive the round trip ({meta.get(bad)!r} -> {parsed.get(bad)!r})")
    if redact(text) != text:
        raise StageError("Space README: the text contains something that looks like an access token; not publishing it")
    return text

