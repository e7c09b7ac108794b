"""Models by Hugging Face Hub id: ``--model google/recurrentgemma-2b-it``.

An id is resolved with ``huggingface_hub`` (its cache, progress bars,
``HF_TOKEN``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``) to a local snapshot folder,
which the loaders then open like any Hugging Face directory. Only the files a
RecurrentGemma checkpoint needs are fetched. A cached model opens with no
network; anything else that cannot be had is one ``HubError`` line naming the
id and what to do.
"""

from __future__ import annotations

import os
import re

HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+")
FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
]


class HubError(ValueError):
    """A Hub id that cannot be resolved (unknown, gated, offline and not cached)."""


def is_hub_id(name: str) -> bool:
    """``ORG/NAME`` that is not a local path (a local file or folder always wins)."""
    return bool(HUB_ID.fullmatch(name)) and not os.path.exists(name)


def snapshot(repo_id: str, revision: str | None = None) -> str:
    """The local folder of ``repo_id`` at ``revision`` (downloaded if needed)."""
    try:
        from huggingface_hub import errors, snapshot_download
    except ImportError:
        raise HubError(
            f"{repo_id} looks like a Hugging Face Hub id, and opening one needs "
            "huggingface_hub: pip install huggingface_hub"
        ) from None
    page = f"https://huggingface.co/{repo_id}"
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=FILES)
    except errors.GatedRepoError:
        raise HubError(
            f"{repo_id} is gated: accept its licence at {page} with your account, "
            "then set HF_TOKEN to a token of that account"
        ) from None
    except errors.RepositoryNotFoundError:
        raise HubError(
            f"{repo_id}: no such model on the Hugging Face Hub (if it is private, set HF_TOKEN)"
        ) from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{repo_id}: no revision {revision!r} on the Hub") from None
    except errors.LocalEntryNotFoundError:
        raise HubError(
            f"{repo_id} is not in the local Hugging Face cache and the Hub cannot be "
            "reached (offline?): run once with network, or pass --model PATH to a "
            "local checkpoint"
        ) from None
    except errors.HfHubHTTPError as e:
        raise HubError(f"{repo_id}: the Hub answered an error: {str(e).splitlines()[0]}") from None
