"""``ssl-fast compare``: one row per method with the shared baselines, a second-stage method
(CVSA) trained after its preset's stage 1 (BYOL) within the same epoch budget, localisation
columns where the data have masks, and a rerun that resumes instead of training again."""
import argparse
import csv
import json

import pytest
import torch

import ssl_fast.train.trainer as trainer_module
from ssl_fast.data import ImageSet
from ssl_fast.data.cluttered_digits import load_cluttered_digits
from ssl_fast.methods.byol import BYOL
from ssl_fast.methods.cvsa import CVSA
from ssl_fast.train.compare import run_compare

HEADS = dict(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32)
RUN = dict(arch="resnet_mini", batch_size=16, image_size=32, optimizer="adamw", lr=8e-3, warmup_epochs=0)


@pytest.fixture()
def small_cluttered(monkeypatch):
    """48 training and 16 held-out cluttered digits, tiny heads, and a 1-epoch BYOL stage 1 for CVSA."""
    tr, te = load_cluttered_digits(32)
    data = (ImageSet(tr.images[:48], tr.labels[:48], tr.classes, "ctrain48", masks=tr.masks[:48]),
            ImageSet(te.images[:16], te.labels[:16], te.classes, "ctest16", masks=te.masks[:16]))
    monkeypatch.setattr(trainer_module, "load_dataset", lambda spec, size=None, **kw: data)
    monkeypatch.setitem(BYOL.presets, "cluttered-digits", dict(RUN, epochs=3, options=dict(HEADS)))
    monkeypatch.setitem(CVSA.presets, "cluttered-digits", dict(
        RUN, epochs=2, stage1=dict(method="byol", epochs=1),
        options=dict(HEADS, conv_hidden_dim=16, conv_dim=8, saliency="masks", swap_group=16)))
    return data


def _args(out, **kw):
    base = dict(methods="byol,cvsa", data="cluttered-digits", epochs=None, batch_size=None, seed=0, device="cpu",
                eval_split="test", out=str(out))
    base.update(kw)
    return argparse.Namespace(**base)


def test_second_stage_method_runs_after_its_stage1_in_the_same_budget(tmp_path, small_cluttered, capsys):
    torch.manual_seed(0)
    assert run_compare(_args(tmp_path)) == 0
    rows = json.loads((tmp_path / "compare.json").read_text())
    byol, cvsa = rows
    assert byol["method"] == "byol" and byol["epochs"] == 3
    assert cvsa["method"] == "cvsa (after byol)" and cvsa["epochs"] == "1+2"
    stage1 = json.loads((tmp_path / "cvsa-stage1-byol" / "log.json").read_text())
    second = json.loads((tmp_path / "cvsa" / "log.json").read_text())
    assert stage1["config"]["method"] == "byol" and stage1["summary"]["epochs_done"] == 1
    assert second["config"]["init"] == str(tmp_path / "cvsa-stage1-byol" / "checkpoint.pth")
    # the row's baselines are stage 1's random init, not the stage-1 weights CVSA started from
    assert cvsa["knn_random_init"] == stage1["summary"]["knn_random_init"]
    assert cvsa["knn_top1"] == second["summary"]["knn_top1"]
    times = [sum(e["epoch_time_s"] for e in log["epochs"]) for log in (stage1, second)]
    assert cvsa["train_time_s"] == pytest.approx(sum(times))
    # localisation: CVSA has maps of its own, both have backbone activation maps
    assert cvsa["iou"] is not None and cvsa["activation_iou"] is not None and byol["iou"] is None
    assert 0.0 <= byol["activation_iou"] <= 1.0 and 0.0 <= byol["activation_pointing"] <= 1.0
    with open(tmp_path / "compare.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["byol", "cvsa (after byol)"]
    table = capsys.readouterr().out
    assert "| cvsa (after byol) | resnet_mini | 1+2 |" in table and "activation IoU / pointing %" in table
    # a rerun resumes every finished run: same rows, nothing trained again
    assert run_compare(_args(tmp_path)) == 0
    again = json.loads((tmp_path / "compare.json").read_text())
    assert [r["knn_top1"] for r in again] == [r["knn_top1"] for r in rows]


def test_epochs_is_the_two_stages_total(tmp_path, small_cluttered, capsys):
    assert run_compare(_args(tmp_path / "a", methods="cvsa", epochs=3)) == 0
    (row,) = json.loads((tmp_path / "a" / "compare.json").read_text())
    assert row["epochs"] == "1+2"
    with pytest.raises(SystemExit):
        run_compare(_args(tmp_path / "b", methods="cvsa", epochs=1), parser=argparse.ArgumentParser())
    assert run_compare(_args(tmp_path / "c", methods="cvsa", epochs=1)) == 2
    assert "--epochs 1 leaves no epoch after its 1-epoch byol stage 1" in capsys.readouterr().err
