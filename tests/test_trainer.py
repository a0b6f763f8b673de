"""Trainer: determinism, exact resume, NaN stop with an intact checkpoint, CLI errors, k-NN, outputs."""
import hashlib
import json
import os

import pytest
import torch

from ssl_fast.__main__ import main as cli_main
from ssl_fast.methods import list_methods
from ssl_fast.train import NonFiniteLossError, Trainer, knn_accuracy, knn_predict
from trainer_setup import digits_subset, tiny_config
from ssl_fast.train.checkpoint import save_atomic


@pytest.fixture(scope="module")
def small_data():
    return digits_subset(48, 30)


def _cfg(out, **kw):
    return tiny_config(out, **{**dict(max_steps_per_epoch=2, attention_images=2), **kw})


def _state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_training_is_deterministic_with_a_seed_and_changes_with_it(tmp_path, small_data):
    s1 = Trainer(_cfg(tmp_path / "a", epochs=1), data=small_data)
    s1.fit()
    s2 = Trainer(_cfg(tmp_path / "b", epochs=1), data=small_data)
    s2.fit()
    assert s1.history["steps"] == s2.history["steps"]
    _state_equal(s1.method.state_dict(), s2.method.state_dict())
    s3 = Trainer(_cfg(tmp_path / "c", epochs=1, seed=1), data=small_data)
    s3.fit()
    assert [r[2] for r in s3.history["steps"]] != [r[2] for r in s1.history["steps"]]


def test_resume_equals_an_uninterrupted_run_bit_for_bit(tmp_path, small_data):
    full = Trainer(_cfg(tmp_path / "full"), data=small_data)
    full.fit()
    part = Trainer(_cfg(tmp_path / "part", stop_after_epochs=1), data=small_data)
    part.fit()
    assert len(part.history["epochs"]) == 1
    resumed = Trainer(_cfg(tmp_path / "part", resume="auto"), data=small_data)
    assert resumed.start_epoch == 1
    resumed.fit()
    assert resumed.history["steps"] == full.history["steps"]
    _state_equal(resumed.method.state_dict(), full.method.state_dict())
    fo, ro = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for i in fo:
        for k in fo[i]:
            assert torch.equal(fo[i][k], ro[i][k])
    assert resumed.history["epochs"][-1]["knn_top1"] == full.history["epochs"][-1]["knn_top1"]
    # outputs of a run
    out = tmp_path / "full"
    for name in ("checkpoint.pth", "metrics.csv", "steps.csv", "log.json", "curves.png", "attention.png"):
        assert (out / name).is_file(), name
    log = json.loads((out / "log.json").read_text())
    assert len(log["epochs"]) == 2 and log["knn_random_init"] is not None
    # the raw-pixel baseline: the same k-NN on the flattened images, computed independently here
    tr, te = small_data
    pixels = knn_accuracy(tr.images.flatten(1), tr.labels, te.images.flatten(1), te.labels,
                          num_classes=len(tr.classes), k=full.cfg.knn_k, temperature=full.cfg.knn_temperature)
    assert log["knn_raw_pixels"] == pixels == full.history["summary"]["knn_raw_pixels"]
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path, small_data):
    def poison(epoch, step, images):
        if epoch == 1 and step == 1:
            images = images.clone()
            images[0] = float("nan")
        return images

    tr = Trainer(_cfg(tmp_path / "nan"), data=small_data, batch_hook=poison)
    ckpt = tmp_path / "nan" / "checkpoint.pth"
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at epoch 2, step 2/2.*checkpoint.*epoch 1.*intact"):
        tr.fit()
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    ck = torch.load(ckpt, weights_only=False)
    assert ck["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in ck["method"].values() if v.is_floating_point())
    # the checkpoint was not rewritten after the failure and still resumes
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest
    again = Trainer(_cfg(tmp_path / "nan", resume=str(ckpt)), data=small_data)
    assert again.start_epoch == 1


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "ck.pth"
    save_atomic({"x": torch.ones(3)}, str(path))

    def broken(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"x": torch.zeros(3)}, str(path))
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["x"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ck.pth"]


def test_knn_classifier_on_a_toy_set():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    test = torch.tensor([[2.0, 0.1], [0.05, 3.0], [-0.5, 0.01]])
    assert knn_predict(train, labels, test, 3, k=1).tolist() == [0, 1, 2]
    # with all 5 neighbours the exp(sim / T) weights decide: the nearest class dominates
    assert knn_predict(train, labels, test, 3, k=5, temperature=0.07).tolist() == [0, 1, 2]
    # a large temperature makes votes nearly equal: the majority class among all 5 wins,
    # although the test point's nearest neighbour is class 2
    assert knn_predict(train, torch.tensor([0, 0, 0, 1, 2]), test[2:], 3, k=5, temperature=1e6).tolist() == [0]
    assert knn_predict(train, torch.tensor([0, 0, 0, 1, 2]), test[2:], 3, k=5, temperature=0.07).tolist() == [2]
    assert knn_accuracy(train, labels, test, torch.tensor([0, 1, 1]), 3, k=1) == pytest.approx(200 / 3)
    with pytest.raises(ValueError):
        knn_predict(train, labels[:4], test, 3)


@pytest.mark.parametrize("argv,match", [
    (["--method", "nope"], r"unknown method 'nope'; known methods: " + ", ".join(list_methods())),
    (["--arch", "vit_huge_p3"], r"unknown architecture 'vit_huge_p3'; known architectures: .*vit_small_p8"),
    (["--data", "/no/such/folder"], r"data folder '/no/such/folder' does not exist"),
    (["--data", "cifar10:/no/such/folder"], r"no CIFAR-10 python batches in '/no/such/folder'"),
    (["--arch", "vit_tiny_p8", "--local-crop-size", "12"], r"local crop size 12 px does not fit the patch size 8"),
    (["--arch", "vit_tiny_p4", "--global-crop-size", "30"], r"global crop size 30 px does not fit the patch size 4"),
    (["--batch-size", "5000"], r"larger than the 1438 training images"),
])
def test_bad_cli_arguments_give_clear_errors(argv, match, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli_main(["pretrain", "--out", str(tmp_path)] + argv)
    assert e.value.code == 2
    import re
    assert re.search(match, capsys.readouterr().err)


def test_empty_image_folder_is_reported(tmp_path, capsys):
    (tmp_path / "data" / "cats").mkdir(parents=True)
    with pytest.raises(SystemExit):
        cli_main(["pretrain", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o")])
    assert "no images" in capsys.readouterr().err


def test_image_folder_loads_with_a_stratified_split(tmp_path):
    import numpy as np
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ssl_fast.data import load_image_folder

    for c, value in (("dark", 0.2), ("light", 0.8)):
        (tmp_path / c).mkdir()
        for i in range(5):
            plt.imsave(tmp_path / c / f"{i}.png", np.full((10, 12, 3), value, dtype=np.float32))
    tr, te = load_image_folder(str(tmp_path), image_size=8)
    assert tr.classes == ["dark", "light"] and len(tr) == 8 and len(te) == 2
    assert tr.images.shape == (8, 3, 8, 8)
    assert sorted(te.labels.tolist()) == [0, 1]
    dark = tr.images[tr.labels == 0]
    assert torch.allclose(dark, torch.full_like(dark, 0.2), atol=0.01)


def test_a_fresh_start_never_overwrites_an_earlier_checkpoint(tmp_path, small_data):
    Trainer(_cfg(tmp_path, epochs=1), data=small_data).fit()
    ckpt = tmp_path / "checkpoint.pth"
    saved = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="already holds an earlier run's checkpoint.*--resume auto.*--overwrite"):
        Trainer(_cfg(tmp_path, epochs=1, seed=1), data=small_data)
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == saved
    Trainer(_cfg(tmp_path, epochs=1, seed=1, overwrite=True), data=small_data).fit()
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() != saved
