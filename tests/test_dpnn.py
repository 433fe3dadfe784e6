"""DPNN network, its loss, and the paper's synthetic generator/experiment."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LinearRegression
from sklearn.metrics import log_loss

from bids_ketdcm.group.treatment.dpnn import DPNN, DPNNClassifier, DPNNSettings, prototype_variance
from bids_ketdcm.testing.dpnn_synthetic import SyntheticConfig, generate_synthetic, run_dpnn_synthetic


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny networks: a second torch thread only adds synchronisation (slow on a loaded machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_prototype_variance_hand_computed():
    # rows = prototypes, columns = treatments
    probs = torch.tensor([[0.2, 0.6], [0.4, 0.4], [0.9, 0.1]], dtype=torch.float64)
    # across treatments (population variance of two values = (a - b)^2 / 4):
    # 0.16/4 = 0.04, 0, 0.64/4 = 0.16 -> mean 0.2 / 3
    across_treatments = 0.2 / 3
    # across prototypes: column 0 = (0.2, 0.4, 0.9), mean 0.5, squares 0.09 + 0.01 + 0.16;
    # column 1 = (0.6, 0.4, 0.1), mean 1.1/3, squares (0.7/3)^2 + (0.1/3)^2 + (0.8/3)^2
    col0 = 0.26 / 3
    col1 = (0.49 + 0.01 + 0.64) / 9 / 3
    across_prototypes = (col0 + col1) / 2
    expected = 0.85 * across_treatments + 0.15 * across_prototypes
    assert float(prototype_variance(probs, 0.85)) == pytest.approx(expected, rel=1e-12)
    assert float(prototype_variance(probs, 1.0)) == pytest.approx(across_treatments, rel=1e-12)
    # identical predictions everywhere: nothing to reward
    assert float(prototype_variance(torch.full((4, 3), 0.3), 0.85)) == pytest.approx(0.0, abs=1e-12)


def _hand_wired_net() -> DPNN:
    """2 prototypes at (0, 0) and (3, 4) in a 2-d latent; logit = relu(d0 + 2 t1) - 1."""
    settings = DPNNSettings(n_prototypes=2, encoder_width=2, classifier_width=3, dropout=0.0)
    net = DPNN(n_features=3, n_treatments=2, settings=settings)
    with torch.no_grad():
        net.prototypes.copy_(torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
        net.hidden.weight.zero_()
        net.hidden.bias.zero_()
        net.hidden.weight[0] = torch.tensor([1.0, 0.0, 0.0, 2.0])  # inputs: d0, d1, t0, t1
        net.output.weight.zero_()
        net.output.weight[0, 0] = 1.0
        net.output.bias.fill_(-1.0)
    return net


def test_prototype_probs_feed_prototype_distances_and_treatments():
    net = _hand_wired_net()
    # prototype 0: d0 = 0 -> logits -1 (t0), 1 (t1); prototype 1: d0 = 25 -> 24, 26
    expected = torch.sigmoid(torch.tensor([[-1.0, 1.0], [24.0, 26.0]]))
    torch.testing.assert_close(net.prototype_probs(), expected)


def test_loss_is_the_sum_of_its_terms():
    settings = DPNNSettings(n_prototypes=3, dropout=0.0, lambda1=0.01, lambda2=0.05, alpha=0.85)
    torch.manual_seed(1)
    net = DPNN(4, 2, settings).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 0, 1, 0]), 2).double()
    y = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    with torch.no_grad():
        logits, _, recon = net(x, onehot)
        p = torch.sigmoid(logits).numpy()
        bce = log_loss(y.numpy(), p, labels=[0, 1])
        recon_err = float(((recon - x) ** 2).sum(dim=1).mean())
        var = float(prototype_variance(net.prototype_probs(), 0.85))
        total = float(net.loss(x, onehot, y))
    assert total == pytest.approx(bce + 0.01 * recon_err - 0.05 * var, rel=1e-10)


def test_li_terms_pull_prototypes_and_samples():
    settings = DPNNSettings(n_prototypes=2, dropout=0.0, lambda1=0.0, lambda2=0.0, lambda_r1=1.0, lambda_r2=0.0)
    torch.manual_seed(0)
    net = DPNN(3, 2, settings).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 1, 0]), 2).double()
    y = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    with torch.no_grad():
        logits, z, _ = net(x, onehot)
        bce = log_loss(y.numpy(), torch.sigmoid(logits).numpy(), labels=[0, 1])
        d = ((z[:, None, :] - net.prototypes[None]) ** 2).sum(-1).numpy()  # (5, 2)
        r1 = d.min(axis=0).mean()  # each prototype to its nearest sample
        assert float(net.loss(x, onehot, y)) == pytest.approx(bce + r1, rel=1e-10)


def test_classifier_is_seeded_and_leaves_global_rng_alone():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 5))
    t = rng.integers(0, 2, 40)
    y = rng.integers(0, 2, 40)
    settings = DPNNSettings(n_prototypes=3, epochs=3, batch_size=8, lr=1e-2)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = DPNNClassifier(2, settings, seed=7).fit(X, t, y).predict_proba(X)
    after = torch.rand(1)
    b = DPNNClassifier(2, settings, seed=7).fit(X, t, y).predict_proba(X)
    c = DPNNClassifier(2, settings, seed=8).fit(X, t, y).predict_proba(X)
    assert before == after
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert a.shape == (40, 2) and np.all((a > 0) & (a < 1))


def test_training_lowers_the_loss():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(200, 6))
    t = rng.integers(0, 2, 200)
    y = ((X[:, 0] > 0) == (t == 1)).astype(int)
    model = DPNNClassifier(2, DPNNSettings(n_prototypes=4, epochs=30, batch_size=20, lr=1e-2), seed=0)
    model.fit(X, t, y)
    assert model.loss_history[-1] < 0.7 * model.loss_history[0]
    assert model.prototype_table().shape == (4, 2)


def test_early_stopping_keeps_the_best_validation_epoch():
    # pure-noise outcomes: the validation loss soon stops improving while training goes on
    rng = np.random.default_rng(4)
    X = rng.normal(size=(200, 6))
    t = rng.integers(0, 2, 200)
    y = rng.integers(0, 2, 200)
    settings = DPNNSettings(n_prototypes=3, epochs=200, batch_size=20, lr=1e-2, validation_fraction=0.2, patience=5)
    model = DPNNClassifier(2, settings, seed=0).fit(X, t, y)
    assert len(model.val_history) < 200  # stopped early
    assert len(model.val_history) == model.best_epoch + 1 + settings.patience
    assert model.val_history[model.best_epoch] == min(model.val_history)
    # the kept weights are those of the best epoch: a run of exactly that many epochs follows
    # the same seeded trajectory and ends with the same network
    shorter = DPNNSettings(**{**settings.__dict__, "epochs": model.best_epoch + 1})
    np.testing.assert_array_equal(DPNNClassifier(2, shorter, seed=0).fit(X, t, y).predict_proba(X),
                                  model.predict_proba(X))


def test_restarts_keep_the_initialisation_of_lowest_loss():
    rng = np.random.default_rng(6)
    X = rng.normal(size=(80, 4))
    t = rng.integers(0, 2, 80)
    y = ((X[:, 0] > 0) == (t == 1)).astype(int)
    kwargs = dict(n_prototypes=3, epochs=4, batch_size=20, lr=1e-2)
    model = DPNNClassifier(2, DPNNSettings(**kwargs, n_init=3), seed=1).fit(X, t, y)
    assert len(model.init_scores) == 3 and len(set(model.init_scores)) == 3
    assert model.loss_history[-1] == min(model.init_scores)
    single = DPNNClassifier(2, DPNNSettings(**kwargs), seed=1).fit(X, t, y)
    assert single.init_scores == model.init_scores[:1]  # the first initialisation is the n_init=1 fit
    with pytest.raises(ValueError, match="n_init"):
        DPNNSettings(n_init=0)


def test_cosine_schedule_anneals_the_learning_rate_to_zero():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(60, 4))
    t = rng.integers(0, 2, 60)
    y = ((X[:, 0] > 0) == (t == 1)).astype(int)
    kwargs = dict(n_prototypes=3, epochs=20, batch_size=20, lr=1e-2)
    constant = DPNNClassifier(2, DPNNSettings(**kwargs), seed=0).fit(X, t, y)
    cosine = DPNNClassifier(2, DPNNSettings(**kwargs, lr_schedule="cosine"), seed=0).fit(X, t, y)
    assert constant.loss_history[0] == cosine.loss_history[0]  # same first epoch (lr at its maximum)
    assert constant.loss_history[-1] != cosine.loss_history[-1]
    with pytest.raises(ValueError, match="lr_schedule"):
        DPNNSettings(lr_schedule="step")
    with pytest.raises(ValueError, match="validation_fraction"):
        DPNNSettings(validation_fraction=1.0)


# --------------------------------------------------------------------------- synthetic data


SMALL = SyntheticConfig(n_per_prototype=300)


def test_generator_matches_the_paper_layout():
    data = generate_synthetic(SMALL, seed=0)
    n = 5 * 300
    assert data.X.shape == (n, 20) and data.truth.shape == (n, 4) and data.latent.shape == (n, 10)
    assert np.all((data.truth >= 0) & (data.truth <= 1))
    assert np.bincount(data.cluster).tolist() == [300] * 5
    assert np.all(np.abs(np.bincount(data.treatment) / n - 0.25) < 0.05)
    # 16 decoded features: linear in the latent code plus unit noise
    fit = LinearRegression().fit(data.latent, data.X[:, :16])
    resid = data.X[:, :16] - fit.predict(data.latent)
    assert resid.std() == pytest.approx(1.0, abs=0.05)
    # 4 pure-noise features: unrelated to the latent code
    noise_fit = LinearRegression().fit(data.latent, data.X[:, 16:])
    assert noise_fit.score(data.latent, data.X[:, 16:]) < 0.02
    # outcomes drawn from the assigned treatment's probability
    p = data.truth[np.arange(n), data.treatment]
    assert abs(data.outcome.mean() - p.mean()) < 0.04
    # latent codes scatter around their prototype with sd 1
    centred = np.concatenate([data.latent[data.cluster == k] - data.latent[data.cluster == k].mean(0) for k in range(5)])
    assert centred.std() == pytest.approx(1.0, abs=0.05)


def test_generator_options_and_seed():
    thresholded = generate_synthetic(SyntheticConfig(n_per_prototype=100, threshold_outcome=True, truth_decimals=2), 4)
    p = thresholded.truth[np.arange(500), thresholded.treatment]
    np.testing.assert_array_equal(thresholded.outcome, (p >= 0.5).astype(int))
    np.testing.assert_array_equal(thresholded.truth, np.round(thresholded.truth, 2))
    a, b = generate_synthetic(SMALL, 1), generate_synthetic(SMALL, 1)
    np.testing.assert_array_equal(a.X, b.X)
    assert not np.array_equal(a.X, generate_synthetic(SMALL, 2).X)


def test_run_dpnn_synthetic_small(tmp_path):
    out = run_dpnn_synthetic(
        SyntheticConfig(n_per_prototype=60),
        n_splits=3,
        repeats=1,
        dpnn=DPNNSettings(epochs=3, batch_size=50, lr=1e-3),
        outdir=tmp_path,
        progress=False,
    )
    assert set(out["summary"]) == {"dpnn", "tlearner", "cbr", "kmnn", "random", "oracle"}
    oracle = out["summary"]["oracle"]
    assert oracle["rpl"]["median"] == 0.0 and oracle["mrr_column"]["median"] == 1.0
    assert out["bar"]["n_blocks"] == 3 and out["bar"]["passed"] is False  # fewer than 20 blocks
    assert len(out["where"]["rpl_by_cluster"]["dpnn"]) == 5
    saved = json.loads((tmp_path / "dpnn_synthetic.json").read_text())
    assert saved["summary"]["random"]["rpl"]["median"] == pytest.approx(out["summary"]["random"]["rpl"]["median"])
    assert (tmp_path / "dpnn_synthetic_folds.tsv").read_text().count("\n") == 1 + 6 * 3
