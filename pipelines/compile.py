"""Compile the pipeline to KFP IR YAML (what the Kubeflow Pipelines UI uploads)."""

from __future__ import annotations

import os

from components.common.image import ENV as IMAGE_ENV


def compile_pipeline(output: str, image: str | None = None, kubernetes: bool = False) -> str:
    """Write the pipeline YAML to ``output``; ``image`` overrides the component image.
    ``kubernetes`` adds the kfp-kubernetes platform spec (Secrets, node selector, tolerations,
    /dev/shm) as a second YAML document; without it the file is one KFP IR document."""
    if image:
        os.environ[IMAGE_ENV] = image
        import importlib
        import sys

        # component decorators read the image at import time: re-import with the override
        names = [m for m in sys.modules if m.startswith("components.") and m.endswith(".component")]
        for name in [*names, "pipelines.pipeline"]:
            if name not in sys.modules:
                continue
            importlib.reload(sys.modules[name])
    from kfp import compiler

    from pipelines.pipeline import make_pipeline

    # built here, not at import, so that $KFP_UI_URL of this moment reaches the ingest task
    pipeline = make_pipeline(kubernetes_settings=kubernetes)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    compiler.Compiler().compile(pipeline, output)
    return output
