"""Compile the pipeline to KFP IR YAML (what the Kubeflow Pipelines UI uploads)."""

from __future__ import annotations

import os

from components.common.image import ENV as IMAGE_ENV

PIPELINES = ("train", "refresh")


def compile_pipeline(output: str, image: str | None = None, kubernetes: bool = False,
                     pipeline: str = "train") -> str:
    """Write the pipeline YAML to ``output``; ``image`` overrides the component image.
    ``kubernetes`` adds the kfp-kubernetes platform spec (Secrets, node selector, tolerations,
    /dev/shm) as a second YAML document; without it the file is one KFP IR document.
    ``pipeline``: ``train`` (the training pipeline) or ``refresh`` (the index refresh,
    :mod:`pipelines.refresh`)."""
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {pipeline!r}; choose one of {', '.join(PIPELINES)}")
    if image:
        os.environ[IMAGE_ENV] = image
        import importlib
        import sys

        # component decorators read the image at import time: re-import with the override
        names = [m for m in sys.modules if m.startswith("components.") and m.endswith(".component")]
        for name in [*names, "pipelines.pipeline", "pipelines.refresh"]:
            if name not in sys.modules:
                continue
            importlib.reload(sys.modules[name])
    from kfp import compiler

    from pipelines.pipeline import make_pipeline, notellm2_pipeline

    if pipeline == "refresh":
        from pipelines.refresh import make_refresh_pipeline

        func = make_refresh_pipeline(kubernetes_settings=kubernetes)
    else:
        func = make_pipeline(kubernetes_settings=True) if kubernetes else notellm2_pipeline
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    compiler.Compiler().compile(func, output)
    return output
