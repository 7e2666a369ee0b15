"""Publish stage: push the adapter, merged and GGUF repos to the Hub, one commit per repo, tagged with the recipe.

    hubforge run recipes/gemma-3-270m/persian-chat-lora.yaml --publish              # preflight first, publish last
    hubforge run recipes/gemma-3-270m/persian-chat-lora.yaml --publish --dry-run    # list files, upload nothing

Repos (names from `recipe.publish`): adapter = `train/adapter/*` + `card/adapter/README.md`; merged = `merge/model/*`
+ `card/merged/README.md`; GGUF = the verified `gguf/*.gguf` + `gguf/quality.json` + `card/gguf/README.md`. Each repo
gets exactly the run's files in one `create_commit` (stale remote files are deleted in the same commit) whose message
names the recipe, its sha256 and the run id, then the tag `recipe-<sha256[:12]>`. The client skips files whose oid
the server already has, so a re-publish of unchanged artifacts makes no commit and sends no bytes, and a changed
card sends only the card. A commit is atomic on the server: a publish interrupted half-way is simply run again.

Gates: the card stage validated the cards, merge verification passed (or there is nothing to merge), the GGUF
files were verified (or there are none), and no output changed on disk since. Preflight (before any expensive
stage): a valid token with write access to every target namespace, legal repo names, and no Xet against a local Hub.
Only this module and `space` talk to the Hub, both through hubforge.hubclient (the unmodified `huggingface_hub.HfApi`).
Each repo is written with its own credential (`hubclient.credential`): under OIDC (`HUBFORGE_OIDC=1` in a GitHub job
with `id-token: write`, or `HF_OIDC_ID_TOKEN`) a Trusted Publisher token scoped to that repo, else (and for a first publish) the
stored token; `result.repos.<kind>.credential` records which ("oidc" or "token"), never the token.
"""
from __future__ import annotations

from hubforge import products
from hubforge.errors import StageError
from hubforge.hubclient import api as hub_api
from hubforge.hubclient import CREDENTIAL, commit_exactly, credential, preflight, with_retries
from hubforge.recipe import Recipe
from hubforge.redact import redact
from hubforge.rundir import RunDir

def tag_name(recipe: Recipe) -> str:
    return f"recipe-{recipe.sha256[:12]}"


# ---------------------------------------------------------------- gates and files (no network)
def gates(run_dir: RunDir) -> None:
    """Refuse unless every verification that publishing relies on passed; the message names the failed gate."""
    def status(name: str) -> str:
        return run_dir.stage(name)["status"]

    if status("train") != "done":
        raise StageError(f"publish gate 'train' failed: the train stage is {status('train')} in {run_dir.path}; nothing to publish")
    card = run_dir.result("card")
    if status("card") != "done" or card.get("validated") is not True:
        why = status("card") if status("card") != "done" else "done but did not report validated cards"
        raise StageError(f"publish gate 'card validated' failed: the card stage is {why}; run it (--stages card) "
                         "and fix what it reports before publishing")
    merge = run_dir.result("merge")
    if status("merge") not in ("done", "not_applicable"):
        raise StageError(f"publish gate 'merge verification' failed: the merge stage is {status('merge')}; "
                         "a merged model is published only after its logits were checked against the adapter")
    if status("merge") == "done" and merge.get("gated") and merge.get("max_abs_logit_diff", 0) > merge.get("threshold", float("inf")):
        raise StageError(f"publish gate 'merge verification' failed: max |Δ logit| {merge['max_abs_logit_diff']} exceeds "
                         f"export.merge_max_abs_logit_diff = {merge['threshold']}")
    gguf = run_dir.result("gguf")
    if status("gguf") not in ("done", "not_applicable"):
        raise StageError(f"publish gate 'gguf verification' failed: the gguf stage is {status('gguf')}; "
                         "GGUF files are published only after llama.cpp loaded and checked them")
    if status("gguf") == "done" and not (gguf.get("tokenizer_probe") or {}).get("ok", True):
        raise StageError("publish gate 'gguf verification' failed: the GGUF tokenizer probe did not pass")
    for name in ("train", "merge", "gguf", "card"):
        if not run_dir.outputs_intact(name):
            raise StageError(f"publish gate 'outputs unchanged' failed: files of the {name} stage in {run_dir.path / name} "
                             "changed or vanished after it verified them; run that stage again")


def repo_files(recipe: Recipe, run_dir: RunDir) -> dict[str, list]:
    """kind -> [(path in repo, local file)] for each repo this run publishes, after the gates passed."""
    gates(run_dir)
    out = products.repo_contents(recipe, run_dir)
    repo_ids = products.repo_ids(recipe)
    cards, rendered_for = run_dir.result("card").get("cards") or {}, run_dir.result("card").get("repos") or {}
    for kind, files in out.items():
        if kind not in cards:
            raise StageError(f"publish gate 'card validated' failed: no validated {kind} card (card stage made {sorted(cards)})")
        if rendered_for.get(kind, repo_ids[kind]) != repo_ids[kind]:  # the card names its repo in usage code
            raise StageError(f"publish gate 'card validated' failed: the {kind} card was rendered for {rendered_for[kind]}, "
                             f"not {repo_ids[kind]}; run the card stage again")
        files.append(("README.md", run_dir.path / cards[kind]))
        missing = [str(p) for _, p in files if not p.is_file()]
        if missing:
            raise StageError(f"cannot publish the {kind} repo: {', '.join(missing)} missing; run its stage again")
        text = files[-1][1].read_text("utf-8")
        if redact(text) != text:  # the card stage checked this too; the file may have been edited since
            raise StageError(f"publish gate 'card validated' failed: {cards[kind]} contains something that looks like an access token")
    return out


def dry_run(recipe: Recipe, run_dir: RunDir) -> list[dict]:
    """Every file that `run` would publish, its size and target repo; touches no network."""
    return [{"kind": kind, "repo_id": products.repo_ids(recipe)[kind], "path_in_repo": rel, "local_path": str(path), "size": path.stat().st_size,
             "private": recipe.publish.private}
            for kind, files in repo_files(recipe, run_dir).items() for rel, path in files]


# ---------------------------------------------------------------- publishing
def ensure_repo(api, repo_id: str, private: bool, token: str) -> str:
    """Create the repo (or find it); a recipe asking for private makes an existing public repo private, never the reverse."""
    url = with_retries(lambda: api.create_repo(repo_id, private=private, exist_ok=True), f"creating {repo_id}", token)
    if private and not with_retries(lambda: api.repo_info(repo_id), f"reading {repo_id}", token).private:
        with_retries(lambda: api.update_repo_settings(repo_id, private=True), f"making {repo_id} private", token)
    return str(url)


def commit_repo(api, repo_id: str, files: list, message: str, description: str, token: str) -> dict:
    """One commit making the repo hold exactly `files`; unchanged files are skipped by the client (no-op -> no commit)."""
    head, oid, stale = commit_exactly(api, repo_id, files, message, token, description=description)
    return {"commit": oid, "previous": head, "uploaded": oid != head, "deleted": stale if oid != head else []}


def ensure_tag(api, repo_id: str, tag: str, commit: str, message: str, token: str) -> None:
    """The recipe-version tag points at the commit that holds this recipe's artifacts (moved if it pointed elsewhere)."""
    tags = {t.name: t.target_commit for t in with_retries(lambda: api.list_repo_refs(repo_id).tags, f"reading tags of {repo_id}", token)}
    if tags.get(tag) == commit:
        return
    if tag in tags:
        with_retries(lambda: api.delete_tag(repo_id, tag=tag), f"moving tag {tag} on {repo_id}", token)
    with_retries(lambda: api.create_tag(repo_id, tag=tag, tag_message=message, revision=commit, exist_ok=True),
                 f"tagging {repo_id}", token)


# The recipe sections this stage reads (part of its cache key; tests/test_layers.py checks it reads no other).
SECTIONS = ('publish', 'name', 'method', 'export', 'space')


def run(recipe: Recipe, run_dir: RunDir) -> dict:
    files = repo_files(recipe, run_dir)  # gates first: nothing is contacted for a run that must not be published
    checked = preflight(recipe)
    tag, run_id = tag_name(recipe), run_dir.path.name
    message = f"Publish {recipe.name} (recipe sha256 {recipe.sha256}, run {run_id})"
    result: dict = {"repos": {}, "tag": tag, "endpoint": checked["endpoint"], "user": checked["user"]}
    for kind in products.MODEL_KINDS:
        if kind not in files:
            continue
        repo_id = products.repo_ids(recipe)[kind]
        token, how = credential(repo_id)  # with OIDC, a token of this one repo (hubclient.credential)
        api = hub_api(token)
        description = (f"hubforge {kind} repo of recipe `{recipe.name}` (method {recipe.method.name}).\n\n"
                       f"- recipe sha256: {recipe.sha256}\n- run: {run_id}\n- files: {len(files[kind])}")
        url = ensure_repo(api, repo_id, recipe.publish.private, token)
        commit = commit_repo(api, repo_id, files[kind], message, description, token)
        ensure_tag(api, repo_id, tag, commit["commit"], message, token)
        result["repos"][kind] = {"repo_id": repo_id, "url": url, "private": recipe.publish.private,
                                 "files": sorted(rel for rel, _ in files[kind]), "credential": how, **commit}
        print(f"[publish] {kind:7} {url} @ {commit['commit'][:12]} "
              f"({'new commit' if commit['uploaded'] else 'unchanged, no commit'}; tag {tag}; credential: {CREDENTIAL[how]})")
    return result
