"""Checkpoints: verified atomic saves keeping the previous one, nothing non-finite saved as good,
clear errors for unusable checkpoints, stale temporaries removed, file mode from the umask.

Each test reproduces one failure of issue 11 (numbers in the test docstrings).
"""
import os
import re
import stat

import pytest
import torch

from ssl_fast.__main__ import main as cli_main
from ssl_fast.data import ImageSet, load_digits
from ssl_fast.train import NonFiniteLossError, TrainConfig, Trainer
from trainer_setup import TINY_OPTS, digits_subset, tiny_config
from ssl_fast.train.checkpoint import (CHECKPOINT_NAME, PREVIOUS_NAME, CheckpointError, non_finite_tensors,
                                       save_atomic)


@pytest.fixture(scope="module")
def small_data():
    return digits_subset(32, 20)


def _cfg(out, **kw):
    return tiny_config(out, **{**dict(max_steps_per_epoch=1, attention_images=1, knn_k=5), **kw})


def _all_finite(ck):
    return non_finite_tensors({"method": ck["method"], "optimizer": ck["optimizer"]}) == []


def test_huge_lr_never_leaves_a_non_finite_checkpoint_called_good(tmp_path):
    """Failure 2: with --lr 3e4, one step per epoch and no warm-up, the checkpoint named intact held NaN."""
    tr, te = load_digits(image_size=32)
    data = (ImageSet(tr.images[:32], tr.labels[:32], tr.classes, "train32"),
            ImageSet(te.images[:20], te.labels[:20], te.classes, "test20"))
    out = tmp_path / "run"
    # DINO's ViT digits preset (vit_nano_p8, head BatchNorm, out_dim 1024), as `ssl-fast pretrain --arch
    # vit_nano_p8 --lr 3e4 --max-steps-per-epoch 1 --warmup-epochs 2` runs it, on 32 images (the warm-up lets
    # two epochs finish before the loss goes non-finite, so that there is a previous checkpoint to name)
    cfg = TrainConfig(arch="vit_nano_p8", epochs=30, batch_size=32, max_steps_per_epoch=1, lr=3e4, warmup_epochs=2,
                      out=str(out), log_every=1, attention_images=1, knn_k=5, device="cpu")
    with pytest.raises(NonFiniteLossError) as e:
        Trainer(cfg, data=data).fit()
    msg = str(e.value)
    latest = os.path.join(str(out), CHECKPOINT_NAME)
    for path in (latest, os.path.join(str(out), PREVIOUS_NAME)):
        ck = torch.load(path, weights_only=False)
        assert _all_finite(ck), (path, non_finite_tensors(ck))
        assert not [k for k in ck["method"] if k.startswith(("student.module.", "_forward_student"))]
    m = re.search(r"the last good checkpoint, (\S+) \(epoch (\d+)\), is intact", msg)
    assert m, msg
    named, done = m.group(1), int(m.group(2))
    assert torch.load(named, weights_only=False)["epoch"] + 1 == done
    # with one step per epoch the first non-finite step is the first from the latest checkpoint:
    # its numbers are finite, but it fails again at once, so the message names the one before it
    assert named.endswith(PREVIOUS_NAME), msg
    assert f"{latest} (epoch {done + 1}) holds only finite numbers, but the first step from it" in msg
    # resuming from the named checkpoint at a sane learning rate trains on with finite numbers
    again = Trainer(TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "again"), "lr": 1e-4, "resume": named,
                                   "stop_after_epochs": done + 1}), data=data)
    assert again.start_epoch == done
    again.fit()
    assert len(again.history["epochs"]) == done + 1
    assert _all_finite(torch.load(tmp_path / "again" / CHECKPOINT_NAME, weights_only=False))


def test_a_save_keeps_the_previous_checkpoint(tmp_path, small_data):
    """Failure 2: the previous good checkpoint stays until the new one is verified (the last two are kept)."""
    Trainer(_cfg(tmp_path), data=small_data).fit()
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)["epoch"] == 1
    assert torch.load(tmp_path / PREVIOUS_NAME, weights_only=False)["epoch"] == 0


def test_a_save_that_does_not_verify_leaves_the_old_checkpoint(tmp_path):
    path = tmp_path / "ck.pth"
    prev = tmp_path / "prev.pth"
    save_atomic({"x": torch.ones(3)}, str(path), keep_previous=str(prev))

    def refuse(back):
        raise CheckpointError("refused")

    with pytest.raises(CheckpointError, match="refused"):
        save_atomic({"x": torch.zeros(3)}, str(path), verify=refuse, keep_previous=str(prev))
    assert torch.equal(torch.load(path)["x"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["ck.pth"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "not_a_checkpoint"])
def test_a_corrupt_or_truncated_checkpoint_gives_one_clear_error(tmp_path, small_data, damage):
    """Failure 7: a corrupt or truncated checkpoint gave a traceback."""
    Trainer(_cfg(tmp_path, epochs=1), data=small_data).fit()
    path = tmp_path / CHECKPOINT_NAME
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[:len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00garbage" * 100)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match=rf"cannot resume from {path}: .*(truncated or corrupt|not an ssl_fast)"):
        Trainer(_cfg(tmp_path, epochs=1, resume="auto"), data=small_data)


def test_a_truncated_checkpoint_is_one_line_on_the_command_line(tmp_path, capsys):
    """Failure 7, through the CLI: exit status 2 and the file named, no traceback."""
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(b"PK\x03\x04truncated")
    with pytest.raises(SystemExit) as e:
        cli_main(["pretrain", "--out", str(tmp_path), "--resume", str(path), "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"cannot resume from {path}" in err and "truncated or corrupt" in err
    assert "Traceback" not in err


def test_changing_out_dim_on_resume_names_the_option_and_both_values(tmp_path, small_data):
    """Failure 7: --out-dim changed on resume gave a load_state_dict traceback."""
    Trainer(_cfg(tmp_path, epochs=2, stop_after_epochs=1), data=small_data).fit()
    with pytest.raises(CheckpointError, match=r"cannot resume from .*checkpoint.pth: it was trained with "
                                              r"--out-dim 64, this run has --out-dim 128"):
        Trainer(_cfg(tmp_path, epochs=2, resume="auto", options={**TINY_OPTS, "out_dim": 128}), data=small_data)
    with pytest.raises(CheckpointError, match=r"--head-hidden-dim 32, this run has --head-hidden-dim 48"):
        Trainer(_cfg(tmp_path, epochs=2, resume="auto", options={**TINY_OPTS, "head_hidden_dim": 48}), data=small_data)
    # options that change no shape still resume
    tr = Trainer(_cfg(tmp_path, epochs=2, resume="auto", options={**TINY_OPTS, "momentum_teacher": 0.9}), data=small_data)
    assert tr.start_epoch == 1


def test_stale_temporary_checkpoints_are_removed_when_the_next_save_starts(tmp_path, small_data):
    """Failure 9: a killed save left its .tmp-checkpoint... file behind forever."""
    tmp_path.mkdir(exist_ok=True)
    stale = tmp_path / ".tmp-checkpoint.pth-3f2a9c1b7d0e"
    stale.write_bytes(b"x" * 1000)  # what a save killed during torch.save leaves
    other = tmp_path / ".tmp-other.pth-1"
    other.write_bytes(b"y")
    Trainer(_cfg(tmp_path, epochs=1), data=small_data).fit()
    assert not stale.exists()
    assert other.exists()  # another file's temporaries are not touched
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-checkpoint")]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_checkpoints_get_the_mode_of_the_other_outputs(tmp_path, small_data, umask):
    """Failure 9: checkpoints were written 0600 while the other outputs were 0644."""
    old = os.umask(umask)
    try:
        Trainer(_cfg(tmp_path, epochs=2), data=small_data).fit()
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for name in (CHECKPOINT_NAME, PREVIOUS_NAME, "metrics.csv", "log.json"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == want, name


def test_older_checkpoints_with_the_forward_module_duplicated_still_load(tmp_path, small_data):
    """Checkpoints written before the fix of failure 1 repeat the student under ``_forward_student.``."""
    Trainer(_cfg(tmp_path, epochs=2, stop_after_epochs=1), data=small_data).fit()
    path = tmp_path / CHECKPOINT_NAME
    ck = torch.load(path, weights_only=False)
    ck["method"].update({"_forward_student.module." + k[len("student."):]: v
                         for k, v in ck["method"].items() if k.startswith("student.")})
    torch.save(ck, path)
    tr = Trainer(_cfg(tmp_path, epochs=2, resume="auto"), data=small_data)
    assert tr.start_epoch == 1
