"""Two CPU processes with gloo give the losses of one process with the same global batch.

How the crops match: every rank draws the augmentation parameters of the whole global batch from
the generator seeded by (seed, epoch, step) and applies only its own rows, and the data order is
one global permutation per epoch, split into consecutive per-rank slices of each global batch.
Drop-path is off here: its masks come from each process's own torch RNG. The head's BatchNorm
(on in the digits preset) is off too: SyncBatchNorm needs GPUs, so on the CPU each process would
normalise with its own half of the batch.
"""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from ssl_fast.data import ImageSet, load_digits
from ssl_fast.models import register_model
from ssl_fast.models.vit import VisionTransformer
from ssl_fast.train import TrainConfig, Trainer


@register_model("_test_vit_dist")
def _test_vit_dist(**kw):
    cfg = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    cfg.update(kw)
    return VisionTransformer(**cfg)


def _data():
    tr, te = load_digits(image_size=16)
    return (ImageSet(tr.images[:64], tr.labels[:64], tr.classes, "train64"),
            ImageSet(te.images[:20], te.labels[:20], te.classes, "test20"))


def _cfg(out):
    return TrainConfig(arch="_test_vit_dist", epochs=2, batch_size=16, max_steps_per_epoch=2, out=out,
                       log_every=100, attention_images=1, seed=3,
                       options=dict(out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, local_crops=2,
                                    global_crop_size=16, local_crop_size=8, drop_path=0.0, head_bn=0))


def _worker(rank, world, port, out, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from ssl_fast.train import distributed

    tr = None
    try:
        tr = Trainer(_cfg(out), data=_data())
        assert tr.dist.world_size == world and tr.local_batch == 16 // world
        tr.fit()
        center = tr.method.loss_fn.center
        if rank == 0:
            with open(result, "w") as f:
                json.dump({"steps": tr.history["steps"], "center": center.tolist(),
                           "knn": tr.history["epochs"][-1]["knn_top1"]}, f)
    finally:
        # the DDP wrapper goes before the process group does (see Trainer.close)
        if tr is not None:
            tr.close()
        distributed.cleanup()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_gloo_processes_match_one_process(tmp_path):
    result = str(tmp_path / "ddp.json")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "ddp"), result), nprocs=2, join=True)
    with open(result) as f:
        ddp = json.load(f)
    single = Trainer(_cfg(str(tmp_path / "single")), data=_data())
    single.fit()
    one = single.history["steps"]
    assert len(ddp["steps"]) == len(one) == 4
    for a, b in zip(ddp["steps"], one):
        assert a[:2] == b[:2]
        assert a[2] == pytest.approx(b[2], rel=1e-4, abs=1e-5)  # loss
        assert a[3:5] == pytest.approx(b[3:5])  # lr, weight decay
        # the method's metrics (teacher temperature, entropies, momentum): global-batch statistics
        assert a[5:] == pytest.approx(b[5:], rel=1e-4)
    torch.testing.assert_close(torch.tensor(ddp["center"]), single.method.loss_fn.center, rtol=1e-3, atol=1e-5)
    # one checkpoint writer: rank 0's checkpoint exists, with the 2-process world recorded
    ck = torch.load(tmp_path / "ddp" / "checkpoint.pth", weights_only=False)
    assert ck["world_size"] == 2 and ck["epoch"] == 1
    assert ddp["knn"] == pytest.approx(single.history["epochs"][-1]["knn_top1"], abs=100 / 20 + 1e-9)


_DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchrun_resume_driver.py")


def _torchrun(*args):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", _DRIVER, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=root)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("method", ["dino", "simsiam", "care"])
def test_torchrun_kill_and_resume_equals_an_uninterrupted_two_process_run(tmp_path, method):
    """Issue 11, failure 1: a run started with torchrun could never be resumed (``module.`` keys).

    Two gloo processes under torchrun are killed (SIGKILL) in the middle of epoch 2, resumed with
    ``--resume auto`` under torchrun, and end bit for bit where an uninterrupted 2-process run ends:
    the same losses, method state (student, teacher, center, BatchNorm statistics) and optimizer state.
    """
    full = _torchrun(str(tmp_path / "full"), str(tmp_path / "full.pt"), "--method", method)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    killed = _torchrun(str(tmp_path / "part"), str(tmp_path / "none.pt"), "--kill", "1", "1", "--method", method)
    assert killed.returncode != 0 and not (tmp_path / "none.pt").exists()
    ck = torch.load(tmp_path / "part" / "checkpoint.pth", weights_only=False)
    assert ck["epoch"] == 0 and ck["world_size"] == 2 and len(ck["rng_per_rank"]) == 2
    assert not [k for k in ck["method"] if k.startswith(("student.module.", "_forward_student"))]
    resumed = _torchrun(str(tmp_path / "part"), str(tmp_path / "resumed.pt"), "--resume", "--method", method)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    for run in (full, resumed):
        assert "terminate called" not in run.stdout + run.stderr
    a, b = torch.load(tmp_path / "full.pt", weights_only=False), torch.load(tmp_path / "resumed.pt", weights_only=False)
    assert b["start_epoch"] == 1 and a["world_size"] == b["world_size"] == 2
    assert a["steps"] == b["steps"]
    assert a["method"].keys() == b["method"].keys()
    for k in a["method"]:
        assert torch.equal(a["method"][k], b["method"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)


def test_a_two_process_checkpoint_resumes_in_one_process_and_says_what_differs(tmp_path, capsys):
    """A different world size: allowed (same global batch, same data order and crops), with a note."""
    import shutil

    src = tmp_path / "two"
    src.mkdir()
    cfg = _cfg(str(src))
    single = Trainer(TrainConfig(**{**cfg.__dict__, "stop_after_epochs": 1}), data=_data())
    single.fit()
    ck = torch.load(src / "checkpoint.pth", weights_only=False)
    ck["world_size"] = 2
    ck["rng_per_rank"] = [ck["rng"], ck["rng"]]
    torch.save(ck, src / "checkpoint.pth")
    capsys.readouterr()
    tr = Trainer(TrainConfig(**{**cfg.__dict__, "resume": "auto"}), data=_data())
    assert tr.start_epoch == 1
    note = capsys.readouterr().out
    assert "was written by 2 process(es), this run has 1" in note and "not bit for bit" in note
    tr.fit()
    shutil.rmtree(src)
