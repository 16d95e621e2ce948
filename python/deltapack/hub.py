"""Hugging Face Hub ids for models in the local Hub cache: `deltapack compress HuggingFaceTB/SmolLM2-135M FT ...`.

An argument that is an existing path is that path; otherwise a Hub id (`org/name`, optionally `@revision`) is
looked up in the Hub cache by huggingface_hub (`HF_HUB_CACHE` / `HF_HOME`), never downloaded: fetch it first
with `hf download org/name`. A model directory inside the cache (`models--org--name/snapshots/<commit>`) names
its id and revision, which compress records in the delta (`base.hub`), so `deltapack apply FILE -o OUT` finds
the base by itself.
"""
from __future__ import annotations

import os
import re

_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)(?:@(?P<rev>[\w.-]+))?$")
_SNAPSHOT = re.compile(r"(?:^|/)models--(?P<repo>[^/]+)/snapshots/(?P<rev>[0-9a-f]{40})/?$")


def looks_like_id(spec) -> bool:
    """Whether a model argument could be a Hub id (`name`, `org/name`, with an optional `@revision`)."""
    return bool(_ID.match(os.fspath(spec)))


def resolve(spec) -> str:
    """The local path of a model argument: itself if it exists, else the cached snapshot of a Hub id."""
    spec = os.fspath(spec)
    if os.path.lexists(spec):
        return spec
    m = _ID.match(spec)
    if not m:
        raise FileNotFoundError(f"{spec}: no such file or directory")
    try:
        return snapshot(m["repo"], m["rev"])
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{spec}: no such file or directory, and {e}") from None


def snapshot(repo: str, revision: str | None = None) -> str:
    """The directory of a model's snapshot in the local Hugging Face cache (revision: a commit, branch or tag;
    default main). FileNotFoundError, saying how to fetch it, when the cache does not hold it."""
    try:
        import huggingface_hub
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise FileNotFoundError("huggingface_hub, which looks Hub ids up in the local cache, is not installed") \
            from None
    try:
        return huggingface_hub.snapshot_download(repo, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        from huggingface_hub import constants
        raise FileNotFoundError(f"no model {repo}{'@' + revision if revision else ''} in the Hugging Face cache "
                                f"({constants.HF_HUB_CACHE}; `hf download {repo}` fetches it)") from None


def snapshot_of(path) -> dict | None:
    """{"id", "revision"} of a model directory that is a snapshot in a Hugging Face cache, else None."""
    m = _SNAPSHOT.search(os.path.abspath(os.fspath(path)))
    if not m:
        return None
    return {"id": m["repo"].replace("--", "/", 1), "revision": m["rev"]}
