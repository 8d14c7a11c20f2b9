from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components.common.image import component_image


@dsl.component(base_image=component_image(), install_kfp_package=False)
def evaluate(canonical: Input[Dataset], embeddings: Input[Dataset], model: Input[Model],
             index: Input[Artifact], preset: str, overrides: list, mlflow_tracking_uri: str,
             mlflow_run_id: str, evaluation: Output[Artifact],
             metrics: Output[Metrics], report: Output[Markdown], report_html: Output[HTML]):
    """Exact R@K by the reference protocol beside R@K through the built index, modality probes,
    slices and the image/text saliency of the model; against the registry's champion (when
    there is one) on the same queries, with paired-bootstrap intervals. ``report`` and
    ``report_html`` carry the charts as data URIs: the KFP UI shows one file, no folder."""
    import shutil

    import mlflow

    from components.common import logs, tracking
    from components.common.config import resolve
    from components.common.notes import configure_images
    from components.evaluate.compare import find_champion
    from components.evaluate.report import inline_images
    from components.evaluate.run import run

    logs.setup()
    cfg = resolve(preset, overrides)
    configure_images(cfg.data)
    with tracking.step_run(mlflow_tracking_uri, mlflow_run_id, "evaluate"):
        champion = find_champion(tracking.tracking_uri(mlflow_tracking_uri),
                                 cfg.register.model_name)
        version, champion_dir = champion or ("", "")
        result = run(canonical.path, embeddings.path, evaluation.path, cfg.eval,
                     model_dir=model.path, index_dir=index.path, champion_dir=champion_dir,
                     champion_version=version)
        tracking.log_metrics(result)
        mlflow.log_artifacts(evaluation.path, artifact_path="evaluation")
    for key, value in result.items():
        if isinstance(value, (int, float)):
            metrics.log_metric(key, value)
    with open(f"{evaluation.path}/report.md") as f:
        markdown = f.read()
    with open(report.path, "w") as f:
        f.write(inline_images(markdown, evaluation.path))
    shutil.copyfile(f"{evaluation.path}/report.html", report_html.path)
