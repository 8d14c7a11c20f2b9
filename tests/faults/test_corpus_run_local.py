"""The bad-input corpus through ``notellm2 run-local``, the way a user meets it: exit code 1, the
corpus case's message naming file, row and field, no results in the work folder, nothing
registered.

Files that do not parse are refused by run-local's preflight read (the ``ingest`` step's own
reader, run before any task starts), one run each. The cases only the pipeline's ``validate``
step can see (images, lengths, unknown or duplicate ids, leaks) are applied together to one
folder and refused by one pipeline run, whose error must name every one of them: a pipeline run
costs ~20 s on 2 cores, eight of them would cost minutes."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil

import mlflow
import pytest
from click.testing import CliRunner

from pipelines.cli import main
from tests.conftest import write_official
from tests.faults.corpus import CASES, EXPECT, LAYER, bomb_image, oversize_image, truncated_image

pytestmark = pytest.mark.faults
FAST = ["--set", "train.max_steps=2", "--set", "train.batch_pairs=2"]
PREFLIGHT = sorted(n for n in CASES if LAYER[n] == "reader") + ["no_test_notes"]


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> str:
    return write_official(str(tmp_path_factory.mktemp("valid") / "official"))


def _run_local(data: str, work: str, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return CliRunner().invoke(main, ["run-local", "--data", data, "--work", work, *FAST])


def _nothing_left(work: str) -> None:
    for result in ("metrics.json", "model", "index", "embeddings", "decision"):
        assert not os.path.exists(os.path.join(work, result)), result
    db = os.path.join(work, "mlflow.db")
    if os.path.exists(db):
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
        assert not client.search_model_versions()


@pytest.mark.parametrize("name", PREFLIGHT)
def test_a_file_that_does_not_parse_is_refused_before_the_pipeline_starts(
        name, valid, tmp_path, monkeypatch):
    data, work = str(tmp_path / "data"), str(tmp_path / "work")
    shutil.copytree(valid, data)
    CASES[name](data)
    r = _run_local(data, work, monkeypatch)
    assert r.exit_code == 1, r.output
    assert re.search(EXPECT[name], r.output, re.S), r.output
    assert "pipeline_root" not in os.listdir(work) if os.path.isdir(work) else True
    _nothing_left(work)


VALIDATE = ["long_content", "unknown_pair_note", "duplicate_note_id", "train_test_leak"]


@pytest.mark.slow
def test_what_only_validation_sees_is_refused_by_the_pipeline_naming_each(valid, tmp_path,
                                                                         monkeypatch):
    assert set(VALIDATE) | {"bomb_image", "oversize_image", "truncated_image"} == {
        n for n in CASES if LAYER[n] == "validate" and n != "no_test_notes"}
    data, work = str(tmp_path / "data"), str(tmp_path / "work")
    shutil.copytree(valid, data)
    for name in VALIDATE:
        CASES[name](data)
    for row, corrupt in enumerate((bomb_image, oversize_image, truncated_image), start=1):
        corrupt(data, row=row)  # three different notes' images
    r = _run_local(data, work, monkeypatch)
    assert r.exit_code == 1, r.output
    assert "validate" in r.output and "Nothing was registered" in r.output
    for name in [*VALIDATE, "bomb_image"]:
        assert re.search(EXPECT[name], r.output, re.S), (name, r.output[-3000:])
    # the error quotes the first broken image's problem and names the others' rows; the report
    # it points to (validation.json of the validate task) has every problem
    assert re.search(r"notes_train\.csv row 1; notes_train\.csv row 2; notes_train\.csv row 3",
                     r.output)
    (report,) = glob.glob(os.path.join(work, "pipeline_root", "*", "validate", "report",
                                       "validation.json"))
    with open(report) as f:
        problems = json.dumps(json.load(f)["notes_without_usable_image"])
    for name in ("bomb_image", "oversize_image", "truncated_image"):
        assert re.search(EXPECT[name], problems), (name, problems)
    _nothing_left(work)
