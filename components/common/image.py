"""The one image every component runs in, tagged from the package version and a hash of the
source, never ``:latest``.

KFP's cache keys on the image string, not on the code inside the image: a tag that stays the same
while the code changes would let a cache hit stand for a run of code that is no longer there. The
default tag therefore carries a content hash of every ``.py`` file of the three packages
(``components``, ``model``, ``pipelines``), computed where the pipeline is compiled; build the
image with the same tag (``notellm2 image``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from importlib.metadata import PackageNotFoundError, version

DIST = "notellm2-kfp"
REPOSITORY = "ghcr.io/notellm2/notellm2-kfp"
ENV = "NOTELLM2_IMAGE"


def package_version() -> str:
    try:
        return version(DIST)
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0.0.0+src"


PACKAGES = ("components", "model", "pipelines")


@functools.cache
def source_hash() -> str:
    """12 hex digits of a SHA-256 over the path and bytes of every ``.py`` file of the packages
    the image runs (the same in a checkout and an installed wheel)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    digest = hashlib.sha256()
    for package in PACKAGES:
        files = []
        for folder, dirs, names in os.walk(os.path.join(root, package)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            files += [os.path.join(folder, n) for n in names if n.endswith(".py")]
        for path in sorted(files):
            digest.update(os.path.relpath(path, root).replace(os.sep, "/").encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read() + b"\0")
    return digest.hexdigest()[:12]


def default_image() -> str:
    """``<repository>:<package version>-src.<source hash>``."""
    tag = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{package_version()}-src.{source_hash()}")
    return f"{REPOSITORY}:{tag}"


def image_pull_policy() -> str:
    """``IfNotPresent`` for the content-addressed default tag (a node's copy is the right one);
    ``Always`` for an image named by ``$NOTELLM2_IMAGE``/``--image``, whose tag may be reused."""
    return "Always" if os.environ.get(ENV) else "IfNotPresent"


def component_image() -> str:
    """``$NOTELLM2_IMAGE`` if set, else :func:`default_image`."""
    image = os.environ.get(ENV) or default_image()
    if image.endswith(":latest") or ":" not in image.rsplit("/", 1)[-1]:
        raise ValueError(f"component image {image!r} must carry an explicit tag, not :latest")
    return image


def git_sha() -> str:
    """The source commit: ``$NOTELLM2_GIT_SHA`` (set in the image at build time), else the
    checkout this package runs from, else "unknown"."""
    sha = os.environ.get("NOTELLM2_GIT_SHA", "")
    if sha and sha != "unknown":
        return sha
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(__file__),
                              capture_output=True, text=True, timeout=5,
                              check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
