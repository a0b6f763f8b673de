"""The linear probe equals scikit-learn's logistic regression on the same standardised features."""
import numpy as np
import pytest
import torch

from ssl_fast.train.linear_probe import linear_probe_accuracy


def _blobs(n, d, c, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(c, d, generator=g) * 1.5
    y = torch.randint(0, c, (n,), generator=g)
    return centers[y] + torch.randn(n, d, generator=g), y


def test_matches_sklearn_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs(300, 12, 4, 0)
    xt, yt = _blobs(200, 12, 4, 1)
    l2 = 1e-2
    ours = linear_probe_accuracy(x, y, xt, yt, num_classes=4, l2=l2)
    mean, std = x.double().mean(0), x.double().std(0, unbiased=False)
    xs, xts = ((x.double() - mean) / std).numpy(), ((xt.double() - mean) / std).numpy()
    # sklearn minimises 0.5||W||^2 + C * sum CE; ours mean CE + 0.5 l2 ||W||^2  =>  C = 1 / (l2 n)
    clf = LogisticRegression(C=1.0 / (l2 * len(x)), max_iter=5000, tol=1e-10).fit(xs, y.numpy())
    theirs = float((clf.predict(xts) == yt.numpy()).mean() * 100)
    assert ours == pytest.approx(theirs, abs=0.5)  # one test point at most


def test_separable_data_is_learned_and_noise_is_not():
    x, y = _blobs(200, 8, 3, 2)
    assert linear_probe_accuracy(x, y, x, y, num_classes=3) > 95
    noise = torch.randn(200, 8, generator=torch.Generator().manual_seed(3))
    acc = linear_probe_accuracy(noise[:100], y[:100], noise[100:], y[100:], num_classes=3)
    assert acc < 60


def test_bad_input_names_the_argument():
    x, y = _blobs(10, 4, 2, 0)
    with pytest.raises(ValueError, match="train_features"):
        linear_probe_accuracy(x, y, x[:, :3], y, num_classes=2)
    with pytest.raises(ValueError, match="num_classes"):
        linear_probe_accuracy(x, y, x, y, num_classes=1)
    with pytest.raises(ValueError, match="test_labels"):
        linear_probe_accuracy(x, y, x, y + 5, num_classes=2)
    assert np.isfinite(linear_probe_accuracy(x, y, x, y, num_classes=2))
