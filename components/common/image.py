"""The one image every component runs in, tagged from the package version, never ``:latest``."""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version

DIST = "notellm2-kfp"
REPOSITORY = "ghcr.io/notellm2/notellm2-kfp"
ENV = "NOTELLM2_IMAGE"


def package_version() -> str:
    try:
        return version(DIST)
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0.0.0+src"


def component_image() -> str:
    """``$NOTELLM2_IMAGE`` if set, else ``<repository>:<package version>``."""
    image = os.environ.get(ENV) or f"{REPOSITORY}:{package_version()}"
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
