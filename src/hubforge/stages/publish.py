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
Only this module and `space` talk to the Hub, through the unmodified `huggingface_hub.HfApi`.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import urlparse

from hubforge.pipeline import StageError
from hubforge.recipe import Recipe
from hubforge.redact import redact
from hubforge.rundir import RunDir

KINDS = ("adapter", "merged", "gguf")
HF_HOSTS = ("huggingface.co", "hf.co")
RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0)  # seconds before attempts 2..5: rides out a restarting server or a 5xx burst
RETRY_STATUS = (408, 429, 500, 502, 503, 504, 412)  # 412: someone committed meanwhile; the next attempt re-reads head


def repo_ids(recipe: Recipe) -> dict[str, str]:
    return {"adapter": recipe.publish.adapter_repo, "merged": recipe.publish.merged_repo, "gguf": recipe.publish.gguf_repo}


def tag_name(recipe: Recipe) -> str:
    return f"recipe-{recipe.sha256[:12]}"


def planned_repos(recipe: Recipe) -> dict[str, str]:
    """kind -> repo id this recipe will publish (known before any stage runs, for preflight)."""
    m, export = recipe.method, recipe.export
    merged = m.is_mergeable and export.merge
    wanted = {"adapter": m.is_adapter, "merged": merged, "gguf": merged and export.gguf.enabled}
    return {kind: repo for kind, repo in repo_ids(recipe).items() if wanted[kind]}


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


def _folder_files(run_dir: RunDir, rel: str) -> list[tuple[str, Path]]:
    folder = run_dir.path / rel
    if not folder.is_dir():
        raise StageError(f"{folder} does not exist; run the stage that writes it again")
    # A library-written README (PEFT's auto card) is replaced by the validated card.
    return [(p.relative_to(folder).as_posix(), p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() != "README.md"
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)]


def repo_files(recipe: Recipe, run_dir: RunDir) -> dict[str, list[tuple[str, Path]]]:
    """kind -> [(path in repo, local file)] for each repo this run publishes, after the gates passed."""
    gates(run_dir)
    train, merge, gguf = run_dir.result("train"), run_dir.result("merge"), run_dir.result("gguf")
    out: dict[str, list[tuple[str, Path]]] = {}
    if recipe.method.is_adapter:
        out["adapter"] = _folder_files(run_dir, train.get("adapter_dir") or "train/adapter")
        if (run_dir.path / "train/tokenizer").is_dir():  # the tokenizer + chat template the adapter was trained with
            out["adapter"] += _folder_files(run_dir, "train/tokenizer")
    if run_dir.stage("merge")["status"] == "done":
        out["merged"] = _folder_files(run_dir, merge.get("model_dir") or "merge/model")
    if run_dir.stage("gguf")["status"] == "done":
        rels = [f["file"] for f in gguf.get("files") or []] + [(gguf.get("lora_gguf") or {}).get("file")]
        rels += [gguf["quality"]] if gguf.get("quality") else []
        out["gguf"] = [(Path(r).name, run_dir.path / r) for r in rels if r]
    cards, rendered_for = run_dir.result("card").get("cards") or {}, run_dir.result("card").get("repos") or {}
    for kind, files in out.items():
        if kind not in cards:
            raise StageError(f"publish gate 'card validated' failed: no validated {kind} card (card stage made {sorted(cards)})")
        if rendered_for.get(kind, repo_ids(recipe)[kind]) != repo_ids(recipe)[kind]:  # the card names its repo in usage code
            raise StageError(f"publish gate 'card validated' failed: the {kind} card was rendered for {rendered_for[kind]}, "
                             f"not {repo_ids(recipe)[kind]}; run the card stage again")
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
    return [{"kind": kind, "repo_id": repo_ids(recipe)[kind], "path_in_repo": rel, "local_path": str(path), "size": path.stat().st_size,
             "private": recipe.publish.private}
            for kind, files in repo_files(recipe, run_dir).items() for rel, path in files]


# ---------------------------------------------------------------- client, retries, preflight
def endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")  # read now: CLIs and tests set it late


def _is_hf_host(url: str) -> bool:
    host = (urlparse(url).hostname or "").lower()
    return any(host == h or host.endswith("." + h) for h in HF_HOSTS)


def _clean(text: str, token: str | None) -> str:
    return redact(text.replace(token, "***") if token else text)


def transient(exc: BaseException) -> bool:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        return exc.response is not None and exc.response.status_code in RETRY_STATUS
    return isinstance(exc, (httpx2.TransportError, ConnectionError, TimeoutError))


def with_retries(fn, what: str, token: str | None = None, delays=None):
    """fn() with backoff on connection errors and 5xx; other errors (and the last failure) become a StageError."""
    delays = RETRY_DELAYS if delays is None else delays
    for attempt in range(len(delays) + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below; the message is redacted either way
            if transient(exc) and attempt < len(delays):
                print(f"[publish] {what}: {_clean(type(exc).__name__ + ': ' + str(exc), token)[:200]}; "
                      f"retrying in {delays[attempt]:.0f}s ({attempt + 1}/{len(delays)})")
                time.sleep(delays[attempt])
                continue
            raise StageError(_clean(f"{what} failed against {endpoint()}: {type(exc).__name__}: {exc}", token)) from None


def _api(token: str):
    from huggingface_hub import HfApi

    from hubforge import __version__

    return HfApi(endpoint=endpoint(), token=token, library_name="hubforge", library_version=__version__)


def _write_access(who: dict, namespace: str) -> str | None:
    """Why `who` (a whoami answer) cannot write to `namespace`, or None when it can."""
    access = (who.get("auth") or {}).get("accessToken") or {}
    role = access.get("role")
    if role == "read":
        return "the token is read-only (role 'read'); create a token with write access"
    if role == "fineGrained":
        scoped = (access.get("fineGrained") or {}).get("scoped") or []
        if not any((s.get("entity") or {}).get("name") == namespace and "repo.write" in (s.get("permissions") or []) for s in scoped):
            return f"the fine-grained token has no 'repo.write' permission on {namespace!r}"
    if namespace == who.get("name"):
        return None
    org = next((o for o in who.get("orgs") or [] if o.get("name") == namespace), None)
    if org is None:
        member = ", ".join([who.get("name", "?")] + [o.get("name", "?") for o in who.get("orgs") or []])
        return f"{namespace!r} is neither the token's user nor one of its organisations ({member})"
    if org.get("roleInOrg") == "read":
        return f"the user has only the 'read' role in organisation {namespace!r}"
    return None


def preflight(recipe: Recipe) -> dict:
    """Checks that must pass before training when publishing: token, write access, repo names, no Xet locally."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    url = endpoint()
    if not _is_hf_host(url) and not constants.HF_HUB_DISABLE_XET:  # hf_xet is a hard dependency: Xet would be used
        raise StageError(f"HF_ENDPOINT={url} is not the Hugging Face Hub, and huggingface_hub would upload large files "
                         "with Xet, which a local Hub does not speak: set HF_HUB_DISABLE_XET=1 in the environment before "
                         "starting hubforge (it is read when huggingface_hub is imported)")
    if constants.HF_HUB_OFFLINE:
        raise StageError("HF_HUB_OFFLINE is set, so huggingface_hub refuses every request; unset it to publish")
    repos = planned_repos(recipe)
    if recipe.space.enabled:
        repos["space"] = recipe.space.id
    for kind, repo_id in repos.items():
        try:
            validate_repo_id(repo_id)
        except HFValidationError as exc:
            raise StageError(f"publish: {kind} repo name {repo_id!r} is not a legal Hub repo id: {exc}") from None
    if len(set(repos.values())) < len(repos):
        raise StageError(f"publish: two repos share a name ({repos}); give publish.*_repo / space.id distinct names")
    token = get_token()
    if not token:
        raise StageError(f"no Hugging Face token for {url}: set HF_TOKEN, or log in with `hf auth login`")
    try:
        who = with_retries(lambda: _api(token).whoami(), "checking the token (whoami)", token)
    except StageError as exc:
        raise StageError(f"{exc}\nCheck the token (HF_TOKEN, or `hf auth login`) and HF_ENDPOINT") from None
    for kind, repo_id in repos.items():
        problem = _write_access(who, repo_id.split("/")[0])
        if problem:
            raise StageError(_clean(f"publish: no write access for the {kind} repo {repo_id} as user {who.get('name')!r} "
                                    f"on {url}: {problem}. Change publish.namespace or use another token", token))
    return {"endpoint": url, "user": who.get("name"), "repos": repos,
            "role": ((who.get("auth") or {}).get("accessToken") or {}).get("role")}


# ---------------------------------------------------------------- publishing
def ensure_repo(api, repo_id: str, private: bool, token: str) -> str:
    """Create the repo (or find it); a recipe asking for private makes an existing public repo private, never the reverse."""
    url = with_retries(lambda: api.create_repo(repo_id, private=private, exist_ok=True), f"creating {repo_id}", token)
    if private and not with_retries(lambda: api.repo_info(repo_id), f"reading {repo_id}", token).private:
        with_retries(lambda: api.update_repo_settings(repo_id, private=True), f"making {repo_id} private", token)
    return str(url)


def commit_repo(api, repo_id: str, files: list[tuple[str, Path]], message: str, description: str, token: str) -> dict:
    """One commit making the repo hold exactly `files`; unchanged files are skipped by the client (no-op -> no commit)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    wanted = {rel for rel, _ in files}

    def attempt():
        head = api.repo_info(repo_id).sha
        stale = [p for p in api.list_repo_files(repo_id, revision=head) if p not in wanted and p != ".gitattributes"]
        ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path in files]
        ops += [CommitOperationDelete(path_in_repo=p) for p in stale]
        info = api.create_commit(repo_id, ops, commit_message=message, commit_description=description, parent_commit=head)
        return head, info.oid, stale

    head, oid, stale = with_retries(attempt, f"committing to {repo_id}", token)
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


def run(recipe: Recipe, run_dir: RunDir) -> dict:
    files = repo_files(recipe, run_dir)  # gates first: nothing is contacted for a run that must not be published
    checked = preflight(recipe)
    from huggingface_hub import get_token

    token = get_token()
    api, tag, run_id = _api(token), tag_name(recipe), run_dir.path.name
    message = f"Publish {recipe.name} (recipe sha256 {recipe.sha256}, run {run_id})"
    result: dict = {"repos": {}, "tag": tag, "endpoint": checked["endpoint"], "user": checked["user"]}
    for kind in KINDS:
        if kind not in files:
            continue
        repo_id = repo_ids(recipe)[kind]
        description = (f"hubforge {kind} repo of recipe `{recipe.name}` (method {recipe.method.name}).\n\n"
                       f"- recipe sha256: {recipe.sha256}\n- run: {run_id}\n- files: {len(files[kind])}")
        url = ensure_repo(api, repo_id, recipe.publish.private, token)
        commit = commit_repo(api, repo_id, files[kind], message, description, token)
        ensure_tag(api, repo_id, tag, commit["commit"], message, token)
        result["repos"][kind] = {"repo_id": repo_id, "url": url, "private": recipe.publish.private,
                                 "files": sorted(rel for rel, _ in files[kind]), **commit}
        print(f"[publish] {kind:7} {url} @ {commit['commit'][:12]} "
              f"({'new commit' if commit['uploaded'] else 'unchanged, no commit'}; tag {tag})")
    return result
