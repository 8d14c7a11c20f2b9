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
