"""The Show-Attend-Tell captioner: scenes, Karpathy loader, decoder, search, metrics, resume, CLI."""
import json
import math
import os

import numpy as np
import pytest
import torch

from ssl_fast.tasks.captioning.data import Vocabulary
from ssl_fast.tasks.captioning.encoder import Encoder, build_backbone
from ssl_fast.tasks.captioning.karpathy import load_karpathy, parse_spec
from ssl_fast.tasks.captioning.metrics import attention_peak, corpus_bleu, localisation
from ssl_fast.tasks.captioning.model import Captioner, Decoder, doubly_stochastic
from ssl_fast.tasks.captioning.scenes import make_scenes
from ssl_fast.tasks.captioning.search import beam_search, greedy


# ---- scenes -----------------------------------------------------------------------------------
def test_scenes_deterministic_and_splits_differ():
    a = make_scenes(40, "train", seed=3)
    b = make_scenes(40, "train", seed=3)
    assert torch.equal(a.images, b.images) and a.references == b.references and a.boxes == b.boxes
    c = make_scenes(40, "train", seed=4)
    assert not torch.equal(a.images, c.images)
    v = make_scenes(40, "val", seed=3)
    assert not torch.equal(a.images, v.images)


def test_scene_boxes_hold_their_digit_and_captions_match():
    """Each box holds exactly its digit: the ink inside it is that digit's image (scikit-learn's),
    outside all boxes the canvas is black, and the caption's relation matches the box geometry."""
    from sklearn.datasets import load_digits

    s = make_scenes(60, "test", seed=1, image_size=48, digit_size=14, readings="both")
    digits = load_digits()
    for img, refs, boxes in zip(s.images, s.references, s.boxes):
        assert img.shape == (3, 48, 48) and 0 <= img.min() and img.max() <= 1
        canvas = img[0]
        covered = torch.zeros_like(canvas, dtype=torch.bool)
        names = [w for w, _ in boxes]
        assert len(set(names)) == len(names) and 2 <= len(names) <= 3
        for w, (x0, y0, x1, y1) in boxes:
            assert x1 - x0 == 14 and y1 - y0 == 14 and 0 <= x0 and x1 <= 48 and 0 <= y0 and y1 <= 48
            covered[y0:y1, x0:x1] = True
            patch = canvas[y0:y1, x0:x1]
            # the patch is a bicubic 14-px rendering of some 8x8 digit of that class: downsampled
            # back, it is closest to an image of the named class
            small = torch.nn.functional.adaptive_avg_pool2d(patch[None, None], 8)[0, 0].numpy().ravel()
            ref = digits.images.reshape(len(digits.images), -1) / 16.0
            nearest = digits.target[np.argmin(((ref - small) ** 2).sum(1))]
            assert str(nearest) == w
            assert patch.max() > 0.5
        assert canvas[~covered].abs().max() == 0
        fwd, bwd = refs
        assert fwd[1::4 if "above" in fwd or "below" in fwd else 5] and fwd[0] == "a"
        digit_words = [t for t in fwd if t.isdigit()]
        assert digit_words == names and [t for t in bwd if t.isdigit()] == names[::-1]
        horizontal = "left" in fwd
        starts = [b[1][0] if horizontal else b[1][1] for b in boxes]
        ends = [b[1][2] if horizontal else b[1][3] for b in boxes]
        # neighbours are separated along the axis of the relation
        assert all(e < s2 for e, s2 in zip(ends[:-1], starts[1:]))
        rel = ("left", "of") if horizontal else ("above",)
        assert fwd == sum((["a", d] + (list(rel) if i < len(names) - 1 else []) for i, d in enumerate(names)), [])


def test_scenes_default_is_one_reading_in_reading_order():
    s = make_scenes(30, "val", seed=2)
    b = make_scenes(30, "val", seed=2, readings="both")
    assert s.images.shape == (30, 3, 32, 32) and torch.equal(s.images, b.images)
    assert all(len(r) == 1 and r[0] == rb[0] for r, rb in zip(s.references, b.references))
    assert {w for r in s.references for w in r[0]} <= {"a", "left", "of", "above", *map(str, range(10))}


def test_scenes_refuse_bad_sizes():
    with pytest.raises(ValueError, match="image_size"):
        make_scenes(2, image_size=30, digit_size=14)
    with pytest.raises(ValueError, match="split"):
        make_scenes(2, split="dev")


# ---- Karpathy ---------------------------------------------------------------------------------
def _karpathy_fixture(tmp_path, coco=True):
    from PIL import Image

    folder = tmp_path / "images"
    images = []
    rng = np.random.default_rng(0)
    for i, split in enumerate(["train", "train", "restval", "val", "test"]):
        sub = "train2014" if coco and split in ("train", "restval") else ("val2014" if coco else "")
        os.makedirs(folder / sub, exist_ok=True)
        name = f"img_{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(folder / sub / name)
        sents = [{"tokens": ["a", "dog", "runs"], "raw": "A dog runs."},
                 {"tokens": ["A", "cat"] + ["x"] * (3 if i != 1 else 200), "raw": "..."}]
        entry = {"filename": name, "split": split, "sentences": sents, "imgid": i}
        if coco:
            entry["filepath"] = sub
        images.append(entry)
    path = tmp_path / ("dataset_coco.json" if coco else "dataset_flickr8k.json")
    path.write_text(json.dumps({"images": images, "dataset": "coco" if coco else "flickr8k"}))
    return str(path), str(folder)


@pytest.mark.parametrize("coco", [True, False])
def test_karpathy_loader(tmp_path, coco):
    path, folder = _karpathy_fixture(tmp_path, coco)
    sets = load_karpathy(path, folder, image_size=16, max_len=10)
    assert [len(sets[s]) for s in ("train", "val", "test")] == [3, 1, 1]  # restval joins train
    tr = sets["train"]
    # the 200-token sentence is dropped, tokens are lower-cased
    assert tr.references[1] == [["a", "dog", "runs"]]
    assert tr.references[0][1] == ["a", "cat", "x", "x", "x"]
    x = tr.get_images([0, 2])
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    v = Vocabulary.build((s for r in tr.references for s in r), min_count=2)
    assert v.itos[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert "x" in v.stoi and "runs" in v.stoi and "cat" in v.stoi
    v3 = Vocabulary.build((s for r in tr.references for s in r), min_count=3)
    assert "runs" in v3.stoi and "cat" not in v3.stoi  # 'cat' is in 2 kept sentences
    assert v3.encode(["a", "cat"], 10) == [1, v3.stoi["a"], 3, 2]


def test_karpathy_errors(tmp_path):
    path, folder = _karpathy_fixture(tmp_path)
    os.remove(os.path.join(folder, "train2014", "img_0.jpg"))
    with pytest.raises(FileNotFoundError, match="img_0.jpg"):
        load_karpathy(path, folder)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "dev", "sentences": []}]}))
    with pytest.raises(ValueError, match="split 'dev'"):
        load_karpathy(str(bad), folder)
    assert parse_spec("karpathy:/d/dataset_coco.json:/img:s") == ("/d/dataset_coco.json", "/img:s")
    with pytest.raises(ValueError):
        parse_spec("karpathy:/d/file.txt")


# ---- model and search -------------------------------------------------------------------------
def _tiny_captioner(vocab=12, image_size=16, backbone="resnet_mini", stage=3, seed=0):
    torch.manual_seed(seed)
    enc = Encoder(build_backbone(backbone, image_size), stage=stage, fine_tune_from=0)
    return Captioner(enc, vocab, image_size, embed_dim=8, decoder_dim=16, attention_dim=8, dropout=0.0)


def test_decoder_shapes_and_padding():
    dec = Decoder(vocab_size=11, encoder_dim=6, embed_dim=5, decoder_dim=7, attention_dim=4, dropout=0.0)
    feats = torch.randn(3, 10, 6)
    caps = torch.tensor([[1, 4, 5, 6, 2], [1, 4, 2, 0, 0], [1, 7, 8, 2, 0]])
    lengths = torch.tensor([5, 3, 4])
    logits, alphas = dec(feats, caps, lengths)
    assert logits.shape == (3, 4, 11) and alphas.shape == (3, 4, 10)
    # valid steps: attention sums to 1; padded steps are zero
    assert torch.allclose(alphas[0].sum(-1), torch.ones(4))
    assert torch.allclose(alphas[1, :2].sum(-1), torch.ones(2)) and alphas[1, 2:].abs().max() == 0
    assert logits[2, 3].abs().max() == 0
    # a row's outputs do not depend on the other rows or on its padding
    l1, a1 = dec(feats[1:2], caps[1:2, :3], lengths[1:2])
    assert torch.allclose(l1, logits[1:2, :2], atol=1e-6) and torch.allclose(a1, alphas[1:2, :2], atol=1e-6)
    with pytest.raises(ValueError, match="feats"):
        dec(torch.randn(3, 10, 5), caps, lengths)


@pytest.mark.parametrize("backbone,stage", [("resnet_mini", 3), ("vit_nano_p4", 4)])
def test_captioner_encoders(backbone, stage):
    m = _tiny_captioner(backbone=backbone, stage=stage)
    assert m.grid == (4, 4)
    out = m.loss(torch.rand(2, 3, 16, 16), torch.tensor([[1, 5, 6, 2], [1, 5, 6, 2], [1, 7, 2, 0], [1, 8, 2, 0]]),
                 torch.tensor([4, 4, 3, 3]), lam=0.1, repeats=2)
    out["loss"].backward()
    assert all(p.grad is not None for p in m.decoder.parameters() if p is not m.decoder.attention.full_att.bias)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.encoder.parameters())


def test_fine_tune_from_freezes_earlier_stages():
    enc = Encoder(build_backbone("resnet_mini", 16), stage=4, fine_tune_from=3)
    bb = enc.backbone
    assert not any(p.requires_grad for p in bb.conv1.parameters())
    assert not any(p.requires_grad for p in bb.layer2.parameters())
    assert all(p.requires_grad for p in bb.layer3.parameters()) and all(p.requires_grad for p in bb.layer4.parameters())
    enc.train()
    assert not bb.layer1.training and bb.layer3.training  # frozen BatchNorm statistics stay put
    frozen = Encoder(build_backbone("resnet_mini", 16), fine_tune_from=None)
    assert not frozen.trainable
    before = frozen.backbone.bn1.running_mean.clone()
    frozen(torch.rand(2, 3, 16, 16) * 5)
    assert torch.equal(before, frozen.backbone.bn1.running_mean)
    with pytest.raises(ValueError, match="fine_tune_from"):
        Encoder(build_backbone("resnet_mini", 16), stage=2, fine_tune_from=3)


def test_beam_width_one_equals_greedy_and_beams_score_better():
    m = _tiny_captioner(seed=1).eval()
    images = torch.rand(5, 3, 16, 16)
    g = greedy(m, images, max_len=7)
    b1 = beam_search(m, images, 1, max_len=7)
    assert g.words == b1.words and g.scores == b1.scores
    assert all(torch.equal(x, y) for x, y in zip(g.alphas, b1.alphas))
    b4 = beam_search(m, images, 4, max_len=7)
    for w, a, s, sg in zip(b4.words, b4.alphas, b4.scores, g.scores):
        assert a.shape == (len(w), 16) and torch.allclose(a.sum(-1), torch.ones(len(w)), atol=1e-5)
        assert s >= sg - 1e-5  # a wider beam never finds a worse caption than greedy's

    # the returned score is the caption's log-probability under teacher forcing
    for i in range(5):
        ids = torch.tensor([[1] + b4.words[i] + ([2] if len(b4.words[i]) < 7 else [])])
        logits, _ = m.decoder(m.encode(images[i:i + 1]), ids, torch.tensor([ids.shape[1]]))
        lp = torch.log_softmax(logits.detach(), -1)[0].gather(1, ids[0, 1:, None]).sum()
        assert math.isclose(float(lp), b4.scores[i], abs_tol=1e-4)


def test_beam_search_finds_the_best_caption_exhaustively():
    """On a 5-word vocabulary and 3 steps, a beam as wide as the vocabulary finds the highest-
    probability caption among all sequences (enumerated with teacher forcing)."""
    import itertools

    m = _tiny_captioner(vocab=5, seed=2).eval()
    img = torch.rand(1, 3, 16, 16)
    feats = m.encode(img)
    best, best_lp = None, -float("inf")
    for n in range(0, 3):
        for words in itertools.product([3, 4], repeat=n):  # words that are not <pad>, <start>, <end>
            ids = torch.tensor([[1, *words, 2]])
            logits, _ = m.decoder(feats, ids, torch.tensor([ids.shape[1]]))
            lp = float(torch.log_softmax(logits.detach(), -1)[0].gather(1, ids[0, 1:, None]).sum())
            if lp > best_lp:
                best, best_lp = list(words), lp
    b = beam_search(m, img, 5, max_len=3)
    if len(b.words[0]) < 3:  # a finished caption: it must be the best of them
        assert b.words[0] == best and math.isclose(b.scores[0], best_lp, abs_tol=1e-4)


def test_doubly_stochastic_regulariser_known_values():
    # attention that sums to one over time at every position: no penalty
    T = L = 4
    perm = torch.eye(L)[torch.tensor([2, 0, 3, 1])]
    assert float(doubly_stochastic(perm[None].expand(3, T, L), 1.0)) == 0.0
    # uniform attention over L positions for T steps: L * (1 - T/L)^2 per image
    a = torch.full((2, 3, 6), 1 / 6)
    assert math.isclose(float(doubly_stochastic(a, 0.5)), 0.5 * 6 * (1 - 3 / 6) ** 2, rel_tol=1e-6)
    # one image attending to position 0 only, twice: (1-2)^2 + 3 * 1
    b = torch.zeros(1, 2, 4)
    b[0, :, 0] = 1
    assert math.isclose(float(doubly_stochastic(b, 1.0)), 4.0)
    # gradient of lam * (1 - s)^2 is -2 lam (1 - s)
    g = a.clone().requires_grad_(True)
    doubly_stochastic(g, 0.5).backward()
    assert torch.allclose(g.grad, torch.full_like(a, -2 * 0.5 * (1 - 0.5) / 2))


# ---- metrics ----------------------------------------------------------------------------------
def test_bleu_matches_nltk_on_known_sentences():
    from nltk.translate.bleu_score import corpus_bleu as nltk_bleu

    refs = [[["a", "3", "left", "of", "a", "7"], ["a", "7", "right", "of", "a", "3"]],
            [["a", "cat", "sits", "on", "the", "mat"], ["there", "is", "a", "cat", "on", "the", "mat"]]]
    hyps = [["a", "3", "left", "of", "a", "9"], ["the", "cat", "sits", "on", "the", "mat"]]
    ours = corpus_bleu(refs, hyps)
    for n, w in enumerate([(1,), (0.5, 0.5), (1 / 3,) * 3, (0.25,) * 4]):
        assert ours[f"bleu{n + 1}"] == pytest.approx(nltk_bleu(refs, hyps, weights=w), abs=1e-12)
    # hand-computed: unigram precision 10/12 with no brevity penalty
    assert ours["bleu1"] == pytest.approx(10 / 12)
    assert corpus_bleu(refs, [r[0] for r in refs])["bleu4"] == pytest.approx(1.0)


def test_localisation():
    grid, size = (4, 4), (32, 32)
    alpha = torch.zeros(16)
    alpha[1 * 4 + 2] = 1.0  # cell row 1, column 2: pixels x 16..23, y 8..15
    x, y = attention_peak(alpha, grid, size)
    assert 16 <= x < 24 and 8 <= y < 16
    boxes = [[("3", (14, 6, 26, 18)), ("7", (0, 20, 12, 32))]]
    words = [["a", "3", "left", "of", "a", "7", "and", "5"]]
    al = torch.zeros(8, 16)
    al[:, 0] = 1.0
    al[1] = alpha
    al[5] = 0.0
    al[5, 3 * 4 + 0] = 1.0  # row 3, column 0: inside the 7's box
    digits = {str(d) for d in range(10)}
    r = localisation(words, [al], boxes, grid, size, object_words=digits)
    assert r == {"localisation": 2 / 3, "object_words": 3, "hits": 2, "absent": 1}
    al[5] = alpha  # the 7 attended at the 3
    assert localisation(words, [al], boxes, grid, size, object_words=digits)["hits"] == 1
    # by default the object words are those of the boxes: the 5 is not one
    assert localisation(words, [al], boxes, grid, size)["object_words"] == 2


# ---- pre-trained encoders ---------------------------------------------------------------------
def test_encoder_from_a_pretrain_checkpoint(tmp_path):
    """The backbone of an ssl-fast pretrain (DINO) checkpoint: the teacher's weights, loaded by name."""
    from ssl_fast.methods import MethodContext, create_method
    from ssl_fast.tasks.captioning.encoder import load_pretrained_backbone
    from ssl_fast.train.checkpoint import CheckpointError

    ctx = MethodContext(arch="vit_nano_p4", epochs=1, steps_per_epoch=1, global_batch_size=8, image_size=32)
    dino = create_method("dino", ctx)
    with torch.no_grad():  # make the teacher differ from the student
        for p in dino.teacher_backbone.parameters():
            p.add_(1.0)
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 0, "config": {"arch": "vit_nano_p4"}, "method": dino.state_dict(), "optimizer": {},
                "rng": {}}, path)
    bb, arch = load_pretrained_backbone(str(tmp_path), image_size=32)
    assert arch == "vit_nano_p4"
    for (n, p), (_, q) in zip(bb.state_dict().items(), dino.teacher_backbone.state_dict().items()):
        assert torch.equal(p, q), n
    # a larger image size: the position embeddings are resized, the rest loads
    bb48, _ = load_pretrained_backbone(str(path), image_size=48)
    assert bb48.pos_embed.shape[1] == 1 + 12 * 12
    torch.save({"method": {"student.backbone.x": torch.zeros(1)}, "config": {"arch": "vit_nano_p4"}}, path)
    with pytest.raises(CheckpointError, match="holds no vit_nano_p4 backbone"):
        load_pretrained_backbone(str(path), image_size=32)


# ---- the task: resume, CLI ---------------------------------------------------------------------
def _tiny_cfg(out, **kw):
    from ssl_fast.tasks.captioning.task import CaptionConfig

    base = dict(n_train=48, n_val=8, n_test=8, batch_size=16, epochs=2, embed_dim=8, decoder_dim=16,
                attention_dim=8, examples=2, out=str(out), log_every=1)
    base.update(kw)
    return CaptionConfig(**base)


def test_resume_equals_uninterrupted_run(tmp_path):
    """Stopped after epoch 1 and resumed, a run ends with the same weights, optimizer state,
    losses and test scores as an uninterrupted one (dropout on, so the RNG state matters)."""
    import io

    from ssl_fast.tasks.captioning.task import CaptionTask

    full = CaptionTask(_tiny_cfg(tmp_path / "a", dropout=0.5), stream=io.StringIO())
    s_full = full.fit()
    part = CaptionTask(_tiny_cfg(tmp_path / "b", dropout=0.5, stop_after_epochs=1), stream=io.StringIO())
    assert part.fit()["epochs_done"] == 1
    res = CaptionTask(_tiny_cfg(tmp_path / "b", dropout=0.5, resume="auto"), stream=io.StringIO())
    assert res.start_epoch == 1
    s_res = res.fit()
    for (n, p), (_, q) in zip(full.model.state_dict().items(), res.model.state_dict().items()):
        assert torch.equal(p, q), n
    assert full.history["steps"] == res.history["steps"]
    assert repr(s_full["test"]) == repr(s_res["test"])  # repr: NaN localisation when no digit is named
    for k, v in full.optimizer.state_dict()["state"].items():
        assert torch.equal(v["exp_avg"], res.optimizer.state_dict()["state"][k]["exp_avg"])
    # an uninterrupted run without --resume refuses to overwrite the earlier checkpoint
    with pytest.raises(ValueError, match="already holds"):
        CaptionTask(_tiny_cfg(tmp_path / "b"), stream=io.StringIO())


def _cli_error(argv, capsys):
    from ssl_fast.__main__ import main as cli_main

    with pytest.raises(SystemExit) as e:
        cli_main(["caption", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err
    assert err[0].startswith("ssl-fast caption: error: ") and err[1] == "run 'ssl-fast caption --help' for the options"
    return err[0]


@pytest.mark.parametrize("argv,match", [
    (["--beam-width", "0"], r"argument --beam-width: must be an integer >= 1, got '0'"),
    (["--epochs", "x"], r"argument --epochs: must be an integer >= 1, got 'x'"),
    (["--fine-tune-from", "-1"], r"argument --fine-tune-from: must be a stage number >= 0 or 'none', got '-1'"),
    (["--device", "tpu9"], r"argument --device: unknown device 'tpu9'"),
    (["--data", "coco"], r"argument --data: must be 'scenes' or 'karpathy:<json>:<image folder>', got 'coco'"),
    (["--lr", "0"], r"argument --lr: must be a finite number > 0, got '0'"),
    (["--alpha-c", "nan"], r"argument --alpha-c: must be a finite number >= 0, got 'nan'"),
    (["--feature-stage", "5"], r"argument --feature-stage: must be an integer >= 1 and <= 4, got '5'"),
    (["--backbone", "resnet9000"], r"--backbone: unknown architecture 'resnet9000'"),
])
def test_cli_argument_errors(argv, match, capsys):
    import re

    assert re.search(match, _cli_error(argv, capsys))


def test_cli_errors_after_parsing(tmp_path, capsys):
    import re

    f = tmp_path / "file"
    f.write_text("x")
    assert re.search(r"--out '.*file' is a file, not a folder", _cli_error(["--out", str(f)], capsys))
    assert re.search(r"--resume checkpoint '.*nope.pth' does not exist",
                     _cli_error(["--out", str(tmp_path / "o"), "--resume", str(tmp_path / "nope.pth"),
                                 "--scenes", "8", "4", "4"], capsys))
    assert re.search(r"--checkpoint checkpoint '.*nope' does not exist",
                     _cli_error(["--out", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "nope"),
                                 "--scenes", "8", "4", "4"], capsys))
    assert re.search(r"--data: Karpathy split file '.*missing.json' does not exist",
                     _cli_error(["--out", str(tmp_path / "o"), "--data", f"karpathy:{tmp_path}/missing.json:{tmp_path}"],
                                capsys))
    assert re.search(r"--fine-tune-from: fine_tune_from must be 0..3",
                     _cli_error(["--out", str(tmp_path / "o"), "--fine-tune-from", "4", "--scenes", "8", "4", "4"],
                                capsys))


def test_cli_end_to_end(tmp_path, capsys):
    """A tiny run of ``ssl-fast caption`` on the scenes writes its logs, checkpoint and figures;
    then one on a Karpathy-layout fixture with a frozen ViT encoder."""
    from ssl_fast.__main__ import main as cli_main

    out = tmp_path / "run"
    assert cli_main(["caption", "--scenes", "48", "8", "8", "--epochs", "1", "--batch-size", "16",
                     "--decoder-dim", "16", "--examples", "2", "--beam-width", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "test (beam 2): BLEU-1" in text and "attention localisation" in text
    log = json.loads((out / "log.json").read_text())
    assert set(log["test"]) >= {"bleu1", "bleu2", "bleu3", "bleu4", "localisation", "beam_width"}
    assert log["epochs"][0]["epoch"] == 1 and "val_bleu4" in log["epochs"][0]
    for name in ("attention.png", "examples/example_000.png", "examples/example_001.png", "metrics.csv",
                 "steps.csv", "curves.png", "checkpoint.pth"):
        assert (out / name).is_file(), name
    path, folder = _karpathy_fixture(tmp_path)
    out2 = tmp_path / "run2"
    assert cli_main(["caption", "--data", f"karpathy:{path}:{folder}", "--image-size", "16", "--backbone",
                     "vit_nano_p4", "--fine-tune-from", "none", "--epochs", "1", "--batch-size", "2",
                     "--decoder-dim", "16", "--examples", "1", "--out", str(out2)]) == 0
    log = json.loads((out2 / "log.json").read_text())
    assert "localisation" not in log["test"] and log["vocab_size"] > 4
