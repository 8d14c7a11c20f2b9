"""The register step's serving check: a model that cannot answer its input example, as the
scoring server would parse it, fails the task with nothing registered (a retried task would
otherwise find the version and reuse it unchecked). Stub model folder: fails to load at once."""

from __future__ import annotations

import os

import pytest

from components.register import packaging
from components.register import run as register
from tests.faults.registry_kit import CFG, evaluation, model_and_index, pipeline_run


def test_a_model_that_cannot_answer_its_input_example_is_not_registered(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = pipeline_run(uri, "broken")
    model, index = model_and_index(str(tmp_path / "v"))  # config.json only: cannot load
    ev = evaluation(str(tmp_path / "v" / "evaluation"), hits=60)
    with pytest.raises(RuntimeError, match="cannot answer its input example"):
        register.run(model, ev, index, CFG, tracking_uri=uri, run_id=run_id,
                     package_version="0.0.0", decision_dir=str(tmp_path / "decision"))
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert client.search_model_versions(f"name = '{CFG.model_name}'") == []
    assert not os.path.exists(tmp_path / "decision" / "decision.json")


def test_requirements_are_pinned_real_distributions():
    reqs = packaging.pinned(packaging.RELATED_REQUIREMENTS)
    assert all("==" in r and "+" not in r for r in reqs)
    assert not any(r.startswith("notellm2") for r in reqs)
