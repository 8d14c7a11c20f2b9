"""The NoteLLM-2 training pipeline (KFP v2).

ingest → mine_pairs → validate ──gate──→ train → embed → index → evaluate → register
(alias ``challenger``)

mine_pairs replaces the training pairs with pairs mined from the events when the data has events
(and passes the data through otherwise). A failing validation fails its task, so nothing
downstream runs and nothing is registered; the later steps read validate's output, the data
without the notes it dropped.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Model

from components.common.image import component_image
from components.embed.component import embed
from components.evaluate.component import evaluate
from components.index.component import index
from components.ingest.component import ingest
from components.mine_pairs.component import mine_pairs
from components.register.component import register
from components.train.component import train
from components.validate.component import validate

PIPELINE_NAME = "notellm2"


class Outputs(NamedTuple):
    model: Model
    embeddings: Dataset
    index: Artifact
    evaluation: Artifact
    model_uri: str


@dsl.pipeline(name=PIPELINE_NAME, description=(
    "Train NoteLLM-2 multimodal note representations, embed and index the notes, evaluate "
    "R@K by the reference protocol and register the model in MLflow with alias 'challenger'."))
def notellm2_pipeline(
    data_uri: str = "",
    preset: str = "tiny",
    overrides: list = [],  # noqa: B006 - KFP takes the default literally; never mutated
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "notellm2",
    run_name: str = "",
) -> Outputs:
    """NoteLLM-2 end to end.

    Args:
        data_uri: Folder (local path or gs://) in the official NoteLLM CSV layout or the canonical Parquet layout.
        preset: Named configuration: tiny (CPU demo), qwen2-0.5b-clip-b16, qwen2-7b-clip-b16.
        overrides: Config overrides as "section.key=value" strings, e.g. ["train.max_steps=50"].
        mlflow_tracking_uri: MLflow tracking server; empty means the MLFLOW_TRACKING_URI environment variable.
        mlflow_experiment: MLflow experiment that receives the run.
        run_name: MLflow run name; empty lets MLflow choose.
    """
    ing = ingest(data_uri=data_uri, mlflow_tracking_uri=mlflow_tracking_uri,
                 mlflow_experiment=mlflow_experiment, run_name=run_name,
                 kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, image=component_image())
    ing.set_display_name("ingest").set_caching_options(False)
    common = {"preset": preset, "overrides": overrides}
    tracked = {"mlflow_tracking_uri": mlflow_tracking_uri, "mlflow_run_id": ing.outputs["Output"]}
    mine = mine_pairs(canonical=ing.outputs["canonical"], **common, **tracked)
    mine.set_display_name("mine pairs").set_caching_options(False)
    val = validate(canonical=mine.outputs["mined"], **common, **tracked)
    val.set_display_name("validate").set_caching_options(False)
    data = val.outputs["validated"]
    tr = train(canonical=data, **common, **tracked)
    tr.set_display_name("train")
    emb = embed(canonical=data, model=tr.outputs["model"], **common)
    emb.set_display_name("embed")
    idx = index(embeddings=emb.outputs["embeddings"], **common)
    idx.set_display_name("index")
    ev = evaluate(canonical=data, embeddings=emb.outputs["embeddings"],
                  **common)
    ev.set_display_name("evaluate")
    reg = register(model=tr.outputs["model"], evaluation=ev.outputs["evaluation"],
                   index=idx.outputs["index"], **common, **tracked)
    reg.set_display_name("register").set_caching_options(False)
    return Outputs(model=tr.outputs["model"], embeddings=emb.outputs["embeddings"],
                   index=idx.outputs["index"], evaluation=ev.outputs["evaluation"],
                   model_uri=reg.outputs["Output"])
