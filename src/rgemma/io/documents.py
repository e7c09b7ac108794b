"""Documents on disk: which files to read and the documents in them.

A document is one plain text file (``.py``, ``.txt``, ``.md``, ``.rst``) or
one line of a JSONL file, holding ``{"text": ...}`` or a chat
``{"messages": [{"role": ..., "content": ...}, ...]}``. Training reads its
corpus this way and ``rgemma perplexity`` its inputs, so both agree on
what a document is.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Sequence

TEXT_EXTENSIONS = (".py", ".txt", ".md", ".rst")
JSONL_EXTENSIONS = (".jsonl",)
SKIP_DIRS = ("__pycache__", "site-packages", "dist-packages", ".git", "node_modules")


class DataError(ValueError):
    """Documents that cannot be read or used."""


@dataclasses.dataclass
class Document:
    """One document.

    name: stable identifier (path relative to the folder given, plus
      ``:LINE`` for JSONL lines).
    text: plain text (None for chat documents).
    messages: chat messages (role/content dicts) for chat documents.
    split_key: what a held-out split hashes: the file for text files, the
      line for JSONL (default: ``name`` without its ``:LINE``).
    """

    name: str
    text: str | None = None
    messages: list[dict] | None = None
    split_key: str = ""

    def __post_init__(self) -> None:
        if not self.split_key:
            self.split_key = self.name.split(":")[0]


def find_files(
    paths: Sequence[str],
    extensions: Sequence[str] = TEXT_EXTENSIONS + JSONL_EXTENSIONS,
    exclude: Sequence[str] = (),
) -> list[tuple[str, str]]:
    """(path, relative name) of every file with one of ``extensions``, sorted by name.

    Folders are walked recursively; ``SKIP_DIRS`` and hidden folders are
    skipped, as are folders whose name is in ``exclude``. A file given
    explicitly is always taken.
    """
    out: list[tuple[str, str]] = []
    for root in paths:
        root = os.fspath(root)
        if os.path.isfile(root):
            out.append((root, os.path.basename(root)))
            continue
        if not os.path.isdir(root):
            raise DataError(f"{root}: no such file or folder")
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(
                d for d in dirs if d not in SKIP_DIRS and d not in exclude and not d.startswith(".")
            )
            for f in sorted(files):
                if f.endswith(tuple(extensions)):
                    path = os.path.join(folder, f)
                    out.append((path, os.path.relpath(path, root).replace(os.sep, "/")))
    return sorted(out, key=lambda pn: pn[1])


def read_documents(files: Iterable[tuple[str, str]]) -> tuple[list[Document], int]:
    """Documents of the files (one per text file, one per JSONL line).

    Returns (documents, number of files skipped: not UTF-8, or not a regular file: a FIFO
    or a device, or a link to one, which could block or never end).
    """
    docs: list[Document] = []
    skipped = 0
    for path, name in files:
        if not os.path.isfile(path):
            skipped += 1
            continue
        try:
            with open(path, encoding="utf-8") as f:
                content = f.read()
        except UnicodeDecodeError:
            skipped += 1
            continue
        if path.endswith(JSONL_EXTENSIONS):
            docs.extend(_jsonl_documents(content, name))
        elif content.strip():
            docs.append(Document(name=name, text=content))
    return docs, skipped


def _jsonl_documents(content: str, name: str) -> Iterator[Document]:
    for lineno, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e})") from None
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            yield Document(name=where, text=record["text"], split_key=where)
        elif isinstance(record, dict) and isinstance(record.get("messages"), list):
            yield Document(name=where, messages=record["messages"], split_key=where)
        else:
            raise DataError(
                f"{where}: expected an object with a 'text' string or a 'messages' list"
            )


def find_documents(
    paths: Sequence[str],
    exclude: Sequence[str] = (),
    extensions: Sequence[str] = TEXT_EXTENSIONS + JSONL_EXTENSIONS,
) -> tuple[list[Document], int]:
    """``read_documents(find_files(paths))``: (documents, files skipped)."""
    return read_documents(find_files(paths, extensions=extensions, exclude=exclude))
