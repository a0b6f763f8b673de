"""``ssl-fast pretrain`` refuses bad arguments before any work, with one line naming the flag, exit 2."""
import os
import re

import pytest
import torch

from ssl_fast.__main__ import main as cli_main
from ssl_fast.train import cli as cli_module
from ssl_fast.train import trainer as trainer_module


class _NoTraining:
    """Stands in for the Trainer: records the data it was given and trains nothing."""
    made = []

    def __init__(self, cfg, data=None, **kw):
        type(self).made.append((cfg, data))

    def fit(self):
        return {}

    def close(self, *args, **kwargs):
        pass


@pytest.fixture
def no_training(monkeypatch):
    _NoTraining.made = []
    monkeypatch.setattr(trainer_module, "Trainer", _NoTraining)
    return _NoTraining


def _error(argv, capsys):
    """Run the CLI expecting an argument error; return its stderr lines."""
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    # one line naming the problem and one hint, never the 28-line usage text
    assert len(err) == 2, err
    assert err[1] == "run 'ssl-fast pretrain --help' for the options"
    assert err[0].startswith("ssl-fast pretrain: error: ")
    return err


@pytest.mark.parametrize("argv,match", [
    (["--knn-k", "0"], r"argument --knn-k: must be an integer >= 1, got '0'"),
    (["--knn-temperature", "0"], r"argument --knn-temperature: must be a finite number > 0, got '0'"),
    (["--device", "tpu9"], r"argument --device: unknown device 'tpu9'; use auto, cpu, cuda or cuda:N"),
    # the value the user typed, not the learning rate scaled by batch/256 (was: -0.25)
    (["--lr", "-1"], r"argument --lr: must be a finite number > 0, got '-1'$"),
    (["--lr", "nan"], r"argument --lr: must be a finite number > 0, got 'nan'"),
    (["--epochs", "0"], r"argument --epochs: must be an integer >= 1, got '0'"),
    (["--batch-size", "two"], r"argument --batch-size: must be an integer >= 1, got 'two'"),
    (["--seed", "-3"], r"argument --seed: must be an integer >= 0, got '-3'"),
    (["--log-every", "0"], r"argument --log-every: must be an integer >= 1, got '0'"),
    (["--warmup-epochs", "-1"], r"argument --warmup-epochs: must be a finite number >= 0, got '-1'"),
    (["--bad-images", "ignore"], r"argument --bad-images: invalid choice: 'ignore'"),
    (["--momentum-teacher", "1.5"], r"argument --momentum-teacher: must be a finite number >= 0 and <= 1, got '1.5'"),
    (["--out-dim", "0"], r"argument --out-dim: must be an integer >= 1, got '0'"),
    (["--drop-path", "1"], r"argument --drop-path: must be a finite number >= 0 and < 1, got '1'"),
    (["--local-crops-scale", "0.5,0.1"], r"argument --local-crops-scale: need 0 < lo <= hi <= 1 .*got '0.5,0.1'"),
    (["--no-such-flag"], None),
    (["--method", "nope"], r"unknown method 'nope'"),
])
def test_bad_arguments_are_one_line_naming_the_flag(argv, match, capsys, tmp_path, no_training):
    if match is None:  # an unknown flag is reported by the top-level parser
        with pytest.raises(SystemExit) as e:
            cli_main(["pretrain", "--out", str(tmp_path / "o")] + argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["ssl-fast: error: unrecognized arguments: --no-such-flag", "run 'ssl-fast --help' for the options"]
        return
    err = _error(["pretrain", "--out", str(tmp_path / "o")] + argv, capsys)
    assert re.search(match, err[0]), err[0]
    assert not no_training.made


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_cuda_without_a_gpu_is_refused_at_parse_time(capsys, tmp_path, no_training):
    err = _error(["pretrain", "--out", str(tmp_path), "--device", "cuda:1"], capsys)
    assert "argument --device: 'cuda:1' asks for a GPU but CUDA is not available here" in err[0]


def test_an_out_that_is_a_file_is_refused_before_training(capsys, tmp_path, no_training):
    f = tmp_path / "file.txt"
    f.write_text("x")
    err = _error(["pretrain", "--out", str(f)], capsys)
    assert err[0].endswith(f"--out {str(f)!r} is a file, not a folder")
    err = _error(["pretrain", "--out", str(f / "run")], capsys)
    assert f"--out {str(f / 'run')!r} cannot be created: {str(f)!r} is a file, not a folder" in err[0]
    assert not no_training.made and f.read_text() == "x"


def test_an_unwritable_out_is_refused_before_training(capsys, tmp_path, no_training):
    # before: found only when the first epoch's logs were written, as a traceback
    err = _error(["pretrain", "--out", "/proc/ssl-fast-run"], capsys)  # /proc is read-only, even for root
    assert "--out '/proc/ssl-fast-run' is not writable (its nearest existing folder '/proc')" in err[0]
    if os.geteuid() != 0:  # root writes into any mode-0500 folder
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            err = _error(["pretrain", "--out", str(ro)], capsys)
            assert f"--out {str(ro)!r} is not writable" in err[0]
        finally:
            ro.chmod(0o700)
    assert not no_training.made
    assert cli_module.check_out_folder(str(tmp_path / "new" / "run")) is None
    assert not (tmp_path / "new").exists()  # the check creates nothing


def _image_folder(root):
    from PIL import Image

    for ci, c in enumerate(("a", "b")):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 40 * (ci + 1)).save(root / c / f"{i}.png")
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")


def test_a_corrupt_image_is_skipped_with_a_warning_line(capsys, tmp_path, no_training):
    pytest.importorskip("PIL")
    _image_folder(tmp_path / "data")
    assert cli_main(["pretrain", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    bad = str(tmp_path / "data" / "b" / "broken.jpg")
    assert err == [f"warning: skipped {bad}: cannot be read as an image (UnidentifiedImageError: cannot identify "
                   f"image file {bad!r})"]
    (cfg, (train, test)), = no_training.made
    assert len(train) + len(test) == 6
    assert "bad_images" not in cfg.options  # a CLI flag, not a method option


def test_a_corrupt_image_stops_the_run_by_name_with_bad_images_error(capsys, tmp_path, no_training):
    pytest.importorskip("PIL")
    _image_folder(tmp_path / "data")
    err = _error(["pretrain", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o"),
                  "--bad-images", "error"], capsys)
    assert f"error: --data: {tmp_path / 'data' / 'b' / 'broken.jpg'}: cannot be read as an image" in err[0]
    assert not no_training.made


def test_data_errors_are_one_line(capsys, tmp_path, no_training):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "d" / c).mkdir(parents=True)
        Image.new("L", (4, 4)).save(tmp_path / "d" / c / "0.png")
    err = _error(["pretrain", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o")], capsys)
    assert "--data: data folder" in err[0] and "no class has two or more images" in err[0]
