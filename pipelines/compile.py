"""Compile the pipeline to KFP IR YAML (what the Kubeflow Pipelines UI uploads)."""

from __future__ import annotations

import os

from components.common.image import ENV as IMAGE_ENV

PIPELINES = ("train", "refresh")


def compile_pipeline(output: str, image: str | None = None, kubernetes: bool = False,
                     preset: str | None = None, embed_parallelism: int | None = None,
                     pipeline: str = "train") -> str:
    """Write the pipeline YAML to ``output``; ``image`` overrides the component image.
    ``kubernetes`` adds the kfp-kubernetes platform spec (Secrets, the settings ConfigMap,
    node selector, tolerations, /dev/shm, image pull policy, deadlines) as a second YAML
    document; without it (the default) the file is one KFP IR document and has no
    ``node_selector`` or ``tolerations`` parameters. ``preset``: the default of the ``preset`` parameter
    and the sizes (``pipelines/resources.py``) the resource parameters default to;
    ``embed_parallelism``: at most this many embed shards at once. ``pipeline``: ``train`` (the
    training pipeline) or ``refresh`` (the index refresh, :mod:`pipelines.refresh`)."""
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {pipeline!r}; choose one of {', '.join(PIPELINES)}")
    if not image or image == os.environ.get(IMAGE_ENV):
        return _compile(output, kubernetes, preset, embed_parallelism, pipeline)
    before = os.environ.get(IMAGE_ENV)
    os.environ[IMAGE_ENV] = image
    _reload_components()
    try:
        return _compile(output, kubernetes, preset, embed_parallelism, pipeline)
    finally:  # later compiles in this process get the image they ask for, not this one
        if before is None:
            del os.environ[IMAGE_ENV]
        else:
            os.environ[IMAGE_ENV] = before
        _reload_components()


def _reload_components() -> None:
    """Component decorators read the image at import time: re-import them (and the pipelines,
    which hold them) after the image changed."""
    import importlib
    import sys

    names = [m for m in sys.modules if m.startswith("components.") and m.endswith(".component")]
    for name in [*names, "pipelines.pipeline", "pipelines.refresh"]:
        if name in sys.modules:
            importlib.reload(sys.modules[name])


def _compile(output: str, kubernetes: bool, preset: str | None,
             embed_parallelism: int | None, pipeline: str) -> str:
    from kfp import compiler

    from pipelines import resources
    from pipelines.pipeline import DEFAULT_EMBED_PARALLELISM, make_pipeline

    if embed_parallelism is not None and embed_parallelism < 1:
        raise ValueError(f"embed parallelism must be at least 1, got {embed_parallelism}")
    # built here, not at import, so that $KFP_UI_URL of this moment reaches the ingest task
    if pipeline == "refresh":
        from pipelines.refresh import make_refresh_pipeline

        func = make_refresh_pipeline(kubernetes_settings=kubernetes)
    else:
        func = make_pipeline(kubernetes_settings=kubernetes,
                             sizing=preset or resources.DEFAULT_SIZING,
                             embed_parallelism=embed_parallelism or DEFAULT_EMBED_PARALLELISM)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    compiler.Compiler().compile(func, output)
    return output
