"""Run settings come from the method: presets per data set, one config of option defaults, the
default output folder, and errors that name the flag."""
import pytest

from ssl_fast.methods import BYOL, DINO, DINOConfig, get_method, list_methods
from ssl_fast.methods.config import config_from_options
from ssl_fast.train import TrainConfig, resolve_config
from ssl_fast.train.cli import add_pretrain_parser
from ssl_fast.train.config import default_out


def _parser():
    import argparse

    sub = argparse.ArgumentParser().add_subparsers()
    return add_pretrain_parser(sub)


@pytest.mark.parametrize("method", ["dino", "byol", "simsiam", "care"])
def test_every_method_has_a_digits_preset_and_a_default(method):
    cls = get_method(method)
    assert cls.preset_for("digits")["arch"]
    assert cls.preset_for("cifar10:/x") is cls.presets["default"]
    cfg = resolve_config(TrainConfig(method=method))
    assert cfg.arch == cls.presets["digits"]["arch"] and cfg.epochs == cls.presets["digits"]["epochs"]
    assert cfg.out == default_out(method, "digits") == f"runs/{method}-digits"
    # every preset option is an option of the method
    assert set(cls.presets["digits"]["options"]) <= set(cls.config_class.__dataclass_fields__)


def test_a_data_and_arch_preset_wins_when_the_user_picks_that_arch():
    # DINO on the digits: a CNN by default, its own ViT recipe (multi-crop, 32 px) under --arch vit_nano_p8
    cnn = resolve_config(TrainConfig(method="dino"))
    vit = resolve_config(TrainConfig(method="dino", arch="vit_nano_p8"))
    assert cnn.arch == "resnet_mini" and cnn.image_size == 16 and cnn.options["local_crops"] == 0
    assert vit.arch == "vit_nano_p8" and vit.image_size == 32 and vit.options["local_crops"] == 4
    assert vit.options["global_crops_scale"] == DINO.presets["digits/vit_nano_p8"]["options"]["global_crops_scale"]
    # another arch has no preset of its own: the data's preset fills the rest
    other = resolve_config(TrainConfig(method="dino", arch="vit_nano_p4"))
    assert other.arch == "vit_nano_p4" and other.image_size == 16
    assert DINO.preset_for("cifar10:/x", "vit_nano_p8") is DINO.presets["default"]


def test_defaults_live_once_in_the_config():
    # the constructor's default config, from_context without options and the help text agree
    assert DINOConfig().out_dim == 65536 == config_from_options(DINOConfig, {"out_dim": None}).out_dim
    help_text = " ".join(_parser().format_help().split())
    assert "(dino: 65536)" in help_text and "(byol: 0.99; care: 0.99" in help_text
    # a flag several methods share lists each method's default
    assert "(byol: 4096; care: 4096;" in help_text and "simsiam: 2048)" in help_text


def test_cli_options_are_the_config_fields():
    p = _parser()
    args = p.parse_args(["--method", "byol", "--momentum-target", "0.9", "--blur-p", "0.5,0.25"])
    assert args.momentum_target == 0.9 and args.blur_p == (0.5, 0.25)
    assert args.out_dim is None  # unset options stay None, so the preset or default applies


def test_an_option_of_another_method_is_refused_by_name():
    with pytest.raises(ValueError, match=r"--out-dim: not an option of method 'byol'"):
        resolve_config(TrainConfig(method="byol", options={"out_dim": 32}))
    # None values (every CLI flag not given) are fine
    assert resolve_config(TrainConfig(method="byol", options={"out_dim": None})).method == "byol"


def test_presets_fill_only_what_the_user_left_unset():
    cfg = resolve_config(TrainConfig(method="byol", epochs=3, options={"proj_dim": 8}))
    assert cfg.epochs == 3 and cfg.options["proj_dim"] == 8
    assert cfg.options["proj_hidden_dim"] == BYOL.presets["digits"]["options"]["proj_hidden_dim"]
    assert cfg.optimizer == BYOL.presets["digits"]["optimizer"]


def test_bad_run_settings_name_the_flag():
    with pytest.raises(ValueError, match="--optimizer must be one of adamw, sgd, lars"):
        resolve_config(TrainConfig(optimizer="adam"))
    with pytest.raises(ValueError, match="--eval-split"):
        resolve_config(TrainConfig(eval_split="train"))
    with pytest.raises(ValueError, match="unknown architecture"):
        resolve_config(TrainConfig(arch="resnet_nope"))


def test_methods_are_registered():
    assert {"dino", "byol", "simsiam", "care"} <= set(list_methods())
    assert get_method("dino") is DINO
