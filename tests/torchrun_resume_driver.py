"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node=2``: a tiny DINO run on digits.

Usage: ``torchrun ... torchrun_resume_driver.py OUT RESULT [--kill EPOCH STEP] [--resume] [--method NAME]``.
``--method`` (default dino) runs another method on ``resnet_mini`` with small heads instead.
``--kill`` ends every rank with SIGKILL before that (0-based) step, as a killed job would end;
otherwise rank 0 saves the steps, the method's state and the optimizer's state to RESULT.
"""
import os
import signal
import sys

import torch

from ssl_fast.data import ImageSet, load_digits
from ssl_fast.models import register_model
from ssl_fast.models.vit import VisionTransformer
from ssl_fast.train import TrainConfig, Trainer


@register_model("_test_vit_torchrun")
def _test_vit_torchrun(**kw):
    cfg = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    cfg.update(kw)
    return VisionTransformer(**cfg)


def main(argv):
    out, result = argv[0], argv[1]
    kill = (int(argv[argv.index("--kill") + 1]), int(argv[argv.index("--kill") + 2])) if "--kill" in argv else None
    torch.set_num_threads(1)
    tr, te = load_digits(image_size=16)
    data = (ImageSet(tr.images[:64], tr.labels[:64], tr.classes, "train64"),
            ImageSet(te.images[:20], te.labels[:20], te.classes, "test20"))
    # drop-path on (each rank's own RNG stream) and head BatchNorm on (each rank's own batch
    # statistics on the CPU): both must resume exactly per rank
    cfg = TrainConfig(arch="_test_vit_torchrun", epochs=2, batch_size=16, max_steps_per_epoch=2, out=out,
                      log_every=100, attention_images=1, knn_k=5, seed=5, device="cpu",
                      resume="auto" if "--resume" in argv else None,
                      options=dict(out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, local_crops=2,
                                   global_crop_size=16, local_crop_size=8, drop_path=0.1, head_bn=1))

    method = argv[argv.index("--method") + 1] if "--method" in argv else "dino"
    if method != "dino":
        small = dict(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=16)
        if method == "care":
            small.update(t_layers=1, t_heads=2, t_dim_head=8)
        cfg = TrainConfig(**{**cfg.__dict__, "method": method, "arch": "resnet_mini", "image_size": 16,
                             "options": small})

    def hook(epoch, step, images):
        if kill == (epoch, step):
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return images

    trainer = Trainer(cfg, data=data, batch_hook=hook)
    try:
        trainer.fit()
        if trainer.dist.is_main:
            torch.save({"steps": trainer.history["steps"], "method": trainer.method.state_dict(),
                        "optimizer": trainer.optimizer.state_dict(), "start_epoch": trainer.start_epoch,
                        "world_size": trainer.dist.world_size}, result)
    finally:
        trainer.close()


if __name__ == "__main__":
    main(sys.argv[1:])
