"""Kill -9 during the writes that must survive it, twice each: a running server's label save, ``monai-ad infer``'s
outputs, ``monai-ad train``'s model save (``benchmarks/crash_safety.py`` does it ten times at random moments; these
are its functions on the small ``tiny`` phantom). Also the rule a multi-file output follows when it is stopped
between two renames."""

import os
import random
import sys
from pathlib import Path

import pytest

from monai_ad import io

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import crash_safety  # noqa: E402

KILLS = 2


def _assert_survived(results, kind):
    assert [k.kind for k in results] == [kind] * KILLS
    assert not [k.problem for k in results if k.problem], results
    assert all(k.outcome in ("previous", "new", "none") for k in results), results


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    work = tmp_path_factory.mktemp("crash_safety")
    datalist, models = crash_safety.phantom_models(work, preset="tiny")
    return work, datalist, models


def test_a_killed_label_save_leaves_the_previous_label_or_the_new_one_whole(tmp_path):
    results = crash_safety.label_kills(tmp_path, KILLS, random.Random(1), preset="tiny")
    _assert_survived(results, "label save (server)")
    assert all(k.outcome != "none" for k in results)  # a label is replaced in one rename: never missing


def test_killed_infer_runs_leave_whole_outputs_of_one_run(phantom):
    work, datalist, models = phantom
    results = crash_safety.infer_kills(work, KILLS, random.Random(2), datalist, models, confirm_cleanup=False)
    _assert_survived(results, "infer outputs")


def test_a_killed_training_leaves_a_model_that_loads_and_scores(phantom):
    work, datalist, _ = phantom
    results = crash_safety.train_kills(work, KILLS, random.Random(3), datalist, confirm_cleanup=False)
    _assert_survived(results, "model save (train)")
    assert all(k.outcome != "none" for k in results)


def test_a_set_of_outputs_stopped_between_two_renames_is_never_a_mix(tmp_path, monkeypatch):
    files = {kind: tmp_path / f"case_{kind}.txt" for kind in ("heatmap", "anomaly", "summary")}
    for path in files.values():
        path.write_text("previous")
    replace, renamed = os.replace, []

    def stopped_after_one(source, target):
        if renamed:
            raise KeyboardInterrupt  # stands for the process stopping here
        renamed.append(target)
        replace(source, target)

    monkeypatch.setattr(os, "replace", stopped_after_one)
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_paths(files) as partials:
            assert all(p.parent == tmp_path and p.name.startswith(".") and io.PARTIAL in p.name for p in partials.values())
            for path in partials.values():
                path.write_text("new")
    monkeypatch.undo()
    # the previous set was removed (its summary first), one new file renamed: no previous file beside a new one,
    # and no summary without the volumes
    assert {kind: path.read_text() for kind, path in files.items() if path.exists()} == {"heatmap": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_heatmap.txt"]

