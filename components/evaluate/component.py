from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components.common.image import component_image


@dsl.component(base_image=component_image(), install_kfp_package=False)
def evaluate(canonical: Input[Dataset], embeddings: Input[Dataset], model: Input[Model],
             index: Input[Artifact], preset: str, overrides: list, evaluation: Output[Artifact],
             metrics: Output[Metrics], report: Output[Markdown]):
    """Exact R@K by the reference protocol beside R@K through the built index, modality probes,
    slices and the image/text saliency of the model."""
    import shutil

    from components.common import logs
    from components.common.config import resolve
    from components.evaluate.run import run

    logs.setup()
    result = run(canonical.path, embeddings.path, evaluation.path, resolve(preset, overrides).eval,
                 model_dir=model.path, index_dir=index.path)
    for key, value in result.items():
        if isinstance(value, (int, float)):
            metrics.log_metric(key, value)
    shutil.copyfile(f"{evaluation.path}/report.md", report.path)
