"""The tiny random release kept in a cache folder and reused while intact.

A manifest written last holds each file's size and SHA-256 and a fingerprint of what makes the release (the
writer's sources, the model code, the torch version). A folder whose files or fingerprint differ, or that a
killed run left half written, is written again; a new release is built beside the folder and then moved in.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile

import torch

from .tiny_release import write_tiny_release

MANIFEST = "tiny_release_manifest.json"
PACK = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("testing/tiny_release.py", "testing/tiny_glm_image_tokenizer.py", "core/models/**/*.py")


def fingerprint() -> str:
    digest = hashlib.sha256(torch.__version__.encode())
    for pattern in SOURCES:
        for path in sorted(glob.glob(os.path.join(PACK, pattern), recursive=True)):
            with open(path, "rb") as f:
                digest.update(os.path.relpath(path, PACK).encode() + b"\0" + f.read())
    return digest.hexdigest()


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: str) -> dict[str, list]:
    """relative path -> [size, sha256] of every file but the manifest."""
    found = {}
    for base, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(base, name)
            relative = os.path.relpath(path, folder).replace(os.sep, "/")
            if relative != MANIFEST:
                found[relative] = [os.path.getsize(path), _sha256(path)]
    return found


def is_intact(folder: str) -> bool:
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    return manifest.get("fingerprint") == fingerprint() and manifest.get("files") == _files(folder)


def ensure_tiny_release(folder: str) -> bool:
    """Write the tiny release into ``folder`` unless an intact one is there; True when it was written."""
    if is_intact(folder):
        return False
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    building = tempfile.mkdtemp(prefix=".tiny_release_", dir=parent)
    try:
        write_tiny_release(building)
        with open(os.path.join(building, MANIFEST), "w", encoding="utf-8") as f:
            json.dump({"fingerprint": fingerprint(), "files": _files(building)}, f, indent=1)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(building, folder)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return True
