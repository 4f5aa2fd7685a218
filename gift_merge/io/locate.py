"""Turn a model reference into a local folder: the only module that may touch the network.

A reference that names an existing folder (absolute, or relative to the recipe's folder) is used as
is. Anything else that looks like a Hub id is fetched with ``huggingface_hub`` (only the files a merge
needs), which honours ``HF_HUB_OFFLINE`` and its cache.
"""

from __future__ import annotations

import re
from pathlib import Path

from gift_merge.errors import GiftMergeError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# README.md: the model card, whose front matter declares the licence the merged model's card repeats
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt", "*.tiktoken", "README.md"]


def locate(reference: str, revision: str | None = None, *, relative_to: Path | None = None) -> Path:
    """The local folder holding ``reference`` (a path or a Hub id)."""
    candidates = [Path(reference).expanduser()]
    if relative_to is not None and not Path(reference).is_absolute():
        candidates.insert(0, relative_to / reference)
    for path in candidates:
        if path.is_dir():
            if revision is not None:
                raise GiftMergeError(f"model {reference}@{revision}: a revision applies to Hub ids, not local folders")
            return path.resolve()
    if not _HUB_ID.match(reference) or reference.startswith((".", "/", "~")):
        raise GiftMergeError(f"model {reference}: no such folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(reference, revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # network, auth and offline errors all mean the same to the user
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GiftMergeError(
            f"model {reference}: not a local folder, and fetching it from the Hub failed: {first_line}"
        ) from exc
