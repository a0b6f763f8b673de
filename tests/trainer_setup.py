"""What the trainer tests share: a tiny registered ViT, DINO options to match it, the first rows of
the embedded digits, and a TrainConfig for them."""
from ssl_fast.data import ImageSet, load_digits
from ssl_fast.models import register_model
from ssl_fast.models.vit import VisionTransformer
from ssl_fast.train import TrainConfig

TINY_ARCH = "_test_vit_tiny"
TINY_OPTS = dict(out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, local_crops=2, global_crop_size=16,
                 local_crop_size=8, drop_path=0.1)


@register_model(TINY_ARCH)
def _test_vit_tiny(**kw):
    cfg = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    cfg.update(kw)
    return VisionTransformer(**cfg)


def digits_subset(n_train: int, n_test: int):
    """The first ``n_train`` training and ``n_test`` held-out digits at 16 px."""
    tr, te = load_digits(image_size=16)
    return (ImageSet(tr.images[:n_train], tr.labels[:n_train], tr.classes, f"train{n_train}"),
            ImageSet(te.images[:n_test], te.labels[:n_test], te.classes, f"test{n_test}"))


def tiny_config(out, **kw) -> TrainConfig:
    """A two-epoch DINO run of the tiny ViT into ``out``; ``kw`` overrides any field."""
    base = dict(arch=TINY_ARCH, epochs=2, batch_size=16, out=str(out), log_every=1, options=dict(TINY_OPTS), seed=0)
    base.update(kw)
    return TrainConfig(**base)
