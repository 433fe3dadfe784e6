"""Differential prototype neural network (DPNN) for treatment selection.

The network of Kleinerman et al. (PLoS ONE 2021, "Treatment selection using prototyping in
latent-space with application to depression treatment"), whose prototype layer follows Li
et al. (AAAI 2018, "Deep learning for case-based reasoning through prototypes"):

* a symmetric autoencoder with one hidden layer: the encoder ``x -> z = sigmoid(W x + b)``
  (width ``encoder_width``) is the latent space, the decoder ``z -> x_hat`` is linear;
* ``n_prototypes`` learnable prototypes ``p_j`` in the latent space; the prototype layer
  outputs the squared Euclidean distances ``||z - p_j||^2``;
* a classifier (one hidden ReLU layer of width ``classifier_width`` followed by dropout)
  that takes those distances concatenated with the one-hot treatment and outputs the logit
  of the response probability.

Loss (per mini-batch)::

    BCE(y, p) + lambda1 * mean_i ||x_i - x_hat_i||^2 - lambda2 * V
              + lambda_r1 * mean_j min_i ||p_j - z_i||^2 + lambda_r2 * mean_i min_j ||z_i - p_j||^2

where ``V`` is the prototype variance (:func:`prototype_variance`) of the classifier's
response probabilities at every (prototype, treatment) pair, and the last two terms are Li
et al.'s interpretability terms (weights 0 by default, as the paper's synthetic experiment).
A response probability for every treatment is obtained by feeding each one-hot treatment in
turn; the recommended treatment is the one with the highest probability.

Training: Adam on shuffled mini-batches, with a constant learning rate or one annealed to
zero along a cosine over the epochs (``lr_schedule``); optionally, early stopping on a
validation split of the training data (``validation_fraction``): the weights of the epoch
with the lowest validation cross-entropy are kept, and training stops after ``patience``
epochs without improvement; optionally, several random initialisations (``n_init``), the
best by final training loss (or validation cross-entropy) being kept.

Inputs must already be standardised (the cross-validation in :mod:`.treatment` fits the
scaler on the training fold only).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DPNNSettings:
    """Hyper-parameters of the DPNN; the defaults are the paper's synthetic-data settings.

    Attributes
    ----------
    n_prototypes
        Number of latent prototypes ``l``.
    encoder_width, classifier_width
        Width of the autoencoder's hidden (latent) layer and of the classifier's hidden layer.
    dropout
        Dropout probability after the classifier's hidden layer.
    lambda1, lambda2, alpha
        Weights of the reconstruction error, of the (rewarded) prototype variance, and the
        balance between its across-treatment (``alpha``) and across-prototype
        (``1 - alpha``) parts.
    lambda_r1, lambda_r2
        Weights of Li et al.'s terms pulling each prototype to its nearest sample and each
        sample to its nearest prototype.
    lr, batch_size, epochs
        Adam learning rate, mini-batch size and (most) passes over the training data.
    lr_schedule
        ``"constant"``, or ``"cosine"``: the learning rate falls from ``lr`` to 0 along a
        half cosine over ``epochs`` (the last updates are small, so the final weights do
        not jitter with the last mini-batches).
    validation_fraction
        Fraction of the training data held out for early stopping (0: none; every epoch is
        run and the last weights are kept).
    patience
        Epochs without a lower validation cross-entropy before training stops.
    n_init
        Random initialisations trained; the network of the lowest final training loss
        (validation cross-entropy with a validation split) is kept. Training occasionally
        ends in a poor local optimum (a visibly higher loss); restarts guard against it.
    """

    n_prototypes: int = 5
    encoder_width: int = 14
    classifier_width: int = 16
    dropout: float = 0.5
    lambda1: float = 0.01
    lambda2: float = 0.05
    alpha: float = 0.85
    lambda_r1: float = 0.0
    lambda_r2: float = 0.0
    lr: float = 1e-4
    batch_size: int = 10
    epochs: int = 100
    lr_schedule: str = "constant"
    validation_fraction: float = 0.0
    patience: int = 20
    n_init: int = 1

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"DPNNSettings.lr_schedule must be 'constant' or 'cosine', not {self.lr_schedule!r}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"DPNNSettings.validation_fraction must be in [0, 1), not {self.validation_fraction}")
        if self.n_init < 1:
            raise ValueError(f"DPNNSettings.n_init must be at least 1, not {self.n_init}")


def prototype_variance(probs: torch.Tensor, alpha: float) -> torch.Tensor:
    """Prototype variance of the response probabilities at every (prototype, treatment) pair.

    Parameters
    ----------
    probs
        Tensor of shape (n_prototypes, n_treatments): the classifier's response probability
        for each prototype given each treatment.
    alpha
        Weight of the across-treatment part.

    Returns
    -------
    torch.Tensor
        Scalar ``alpha * mean_j var_t probs[j, t] + (1 - alpha) * mean_t var_j probs[j, t]``
        with population variances (divisor = number of terms). The first part rewards
        prototypes whose treatments differ (differential prediction), the second rewards
        prototypes that differ for a given treatment.
    """
    across_treatments = probs.var(dim=1, unbiased=False).mean()
    across_prototypes = probs.var(dim=0, unbiased=False).mean()
    return alpha * across_treatments + (1.0 - alpha) * across_prototypes


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between the rows of ``a`` (m, d) and ``b`` (k, d): (m, k)."""
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(dim=-1)


class DPNN(nn.Module):
    """The DPNN network (autoencoder + prototype layer + classifier).

    Parameters
    ----------
    n_features, n_treatments
        Input width and number of treatments.
    settings
        Architecture (widths, prototypes, dropout); the loss weights are used by
        :meth:`loss`.
    """

    def __init__(self, n_features: int, n_treatments: int, settings: DPNNSettings) -> None:
        super().__init__()
        self.settings = settings
        self.n_treatments = n_treatments
        self.encoder = nn.Sequential(nn.Linear(n_features, settings.encoder_width), nn.Sigmoid())
        self.decoder = nn.Linear(settings.encoder_width, n_features)
        # Li et al. initialise prototypes uniformly in [0, 1]^q (the range of a sigmoid code).
        self.prototypes = nn.Parameter(torch.rand(settings.n_prototypes, settings.encoder_width))
        self.hidden = nn.Linear(settings.n_prototypes + n_treatments, settings.classifier_width)
        self.output = nn.Linear(settings.classifier_width, 1)
        self.drop = nn.Dropout(settings.dropout)

    def classify(self, distances: torch.Tensor, onehot: torch.Tensor, dropout: bool) -> torch.Tensor:
        """Response logit from prototype distances (m, l) and one-hot treatments (m, T)."""
        h = torch.relu(self.hidden(torch.cat([distances, onehot], dim=1)))
        if dropout:
            h = self.drop(h)
        return self.output(h).squeeze(-1)

    def forward(
        self, x: torch.Tensor, onehot: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (response logits, latent codes, reconstructions) for inputs and treatments."""
        z = self.encoder(x)
        logits = self.classify(squared_distances(z, self.prototypes), onehot, self.training)
        return logits, z, self.decoder(z)

    def prototype_probs(self) -> torch.Tensor:
        """Response probability at every (prototype, treatment) pair, shape (l, T).

        Each prototype enters the classifier through its squared distances to all prototypes
        (zero to itself); dropout is off so the variance reflects the network, not its noise.
        """
        n_proto, t = self.settings.n_prototypes, self.n_treatments
        dist = squared_distances(self.prototypes, self.prototypes)  # (n_proto, n_proto)
        eye = torch.eye(t, dtype=dist.dtype)
        inputs = dist.repeat_interleave(t, dim=0)  # row j*T + k: prototype j
        onehot = eye.repeat(n_proto, 1)  # row j*T + k: treatment k
        return torch.sigmoid(self.classify(inputs, onehot, dropout=False)).reshape(n_proto, t)

    def loss(self, x: torch.Tensor, onehot: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Training loss on one mini-batch (see the module docstring)."""
        s = self.settings
        logits, z, recon = self(x, onehot)
        total = nn.functional.binary_cross_entropy_with_logits(logits, y)
        total = total + s.lambda1 * ((recon - x) ** 2).sum(dim=1).mean()
        if s.lambda2:
            total = total - s.lambda2 * prototype_variance(self.prototype_probs(), s.alpha)
        if s.lambda_r1 or s.lambda_r2:
            d = squared_distances(z, self.prototypes)  # (batch, l)
            total = total + s.lambda_r1 * d.min(dim=0).values.mean()
            total = total + s.lambda_r2 * d.min(dim=1).values.mean()
        return total


class DPNNClassifier:
    """Fit/predict wrapper: response probabilities for every treatment.

    Parameters
    ----------
    n_treatments
        Number of treatments (coded 0 .. n_treatments - 1).
    settings
        DPNN hyper-parameters.
    seed
        Seed of the initialisation, mini-batch order and dropout; the global torch random
        state is left untouched.
    """

    def __init__(self, n_treatments: int, settings: DPNNSettings | None = None, seed: int = 0) -> None:
        self.n_treatments = n_treatments
        self.settings = settings or DPNNSettings()
        self.seed = seed
        self.net: DPNN | None = None
        self.loss_history: list[float] = []
        self.val_history: list[float] = []
        self.best_epoch: int | None = None
        self.init_scores: list[float] = []

    def fit(self, X: np.ndarray, treatment: np.ndarray, outcome: np.ndarray) -> DPNNClassifier:
        """Train on standardised features ``X`` (n, p), treatments (n,) and binary outcomes (n,).

        ``n_init`` networks are trained from successive random initialisations and the one
        with the lowest final training loss (with ``validation_fraction`` > 0: the lowest
        validation cross-entropy) is kept. With ``validation_fraction`` > 0 a seeded random
        part of the data is held out and only monitored; ``best_epoch`` is the epoch whose
        weights are kept (0-based). ``loss_history``, ``val_history`` and ``best_epoch``
        describe the kept network; ``init_scores`` holds every initialisation's score.
        """
        s = self.settings
        x = torch.as_tensor(np.asarray(X, dtype=np.float32))
        onehot = nn.functional.one_hot(
            torch.as_tensor(np.asarray(treatment, dtype=np.int64)), self.n_treatments
        ).float()
        y = torch.as_tensor(np.asarray(outcome, dtype=np.float32))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            perm = torch.randperm(x.shape[0])
            n_val = int(s.validation_fraction * x.shape[0])
            val, train = perm[:n_val], perm[n_val:]
            self.init_scores = []
            best = None
            for _ in range(s.n_init):
                fitted = self._train_once(x, onehot, y, train, val)
                score = min(fitted[2]) if n_val else fitted[1][-1]
                self.init_scores.append(score)
                if score == min(self.init_scores):
                    best = fitted
        if best is None:
            raise ValueError(f"n_init must be at least 1 (got {s.n_init})")
        net, self.loss_history, self.val_history, self.best_epoch = best
        net.eval()
        self.net = net
        return self

    def _train_once(
        self, x: torch.Tensor, onehot: torch.Tensor, y: torch.Tensor, train: torch.Tensor, val: torch.Tensor
    ) -> tuple[DPNN, list[float], list[float], int]:
        """Train one network from a fresh initialisation (the caller seeds torch).

        Returns
        -------
        tuple
            (network with the kept weights, training loss per epoch, validation
            cross-entropy per epoch (empty without a validation split), kept epoch).
        """
        s = self.settings
        net = DPNN(x.shape[1], self.n_treatments, s)
        optimiser = torch.optim.Adam(net.parameters(), lr=s.lr)
        cosine = s.lr_schedule == "cosine"
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, s.epochs) if cosine else None
        losses: list[float] = []
        val_losses: list[float] = []
        best_loss, best_state, best_epoch = math.inf, None, s.epochs - 1
        for epoch in range(s.epochs):
            losses.append(self._epoch(net, optimiser, x, onehot, y, train))
            if schedule is not None:
                schedule.step()
            if not len(val):
                continue
            val_losses.append(self._validation_loss(net, x[val], onehot[val], y[val]))
            if val_losses[-1] < best_loss:
                best_loss, best_epoch = val_losses[-1], epoch
                best_state = copy.deepcopy(net.state_dict())
            elif epoch - best_epoch >= s.patience:
                break
        if best_state is not None:
            net.load_state_dict(best_state)
        return net, losses, val_losses, best_epoch

    def _epoch(
        self, net: DPNN, optimiser: torch.optim.Optimizer, x: torch.Tensor, onehot: torch.Tensor, y: torch.Tensor,
        rows: torch.Tensor,
    ) -> float:
        """One pass over ``rows`` in shuffled mini-batches; returns the mean training loss."""
        net.train()
        order = rows[torch.randperm(len(rows))]
        total = 0.0
        for start in range(0, len(order), self.settings.batch_size):
            idx = order[start : start + self.settings.batch_size]
            optimiser.zero_grad()
            loss = net.loss(x[idx], onehot[idx], y[idx])
            loss.backward()
            optimiser.step()
            total += loss.item() * len(idx)
        return total / len(order)

    @staticmethod
    def _validation_loss(net: DPNN, x: torch.Tensor, onehot: torch.Tensor, y: torch.Tensor) -> float:
        """Cross-entropy of the observed outcomes of held-out patients (no dropout)."""
        net.eval()
        with torch.no_grad():
            logits, _, _ = net(x, onehot)
            return nn.functional.binary_cross_entropy_with_logits(logits, y).item()

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Response probability of every patient under every treatment, shape (n, T)."""
        if self.net is None:
            raise RuntimeError("DPNNClassifier.predict_proba called before fit")
        x = torch.as_tensor(np.asarray(X, dtype=np.float32))
        n, t = x.shape[0], self.n_treatments
        with torch.no_grad():
            z = self.net.encoder(x)
            dist = squared_distances(z, self.net.prototypes).repeat_interleave(t, dim=0)
            onehot = torch.eye(t).repeat(n, 1)
            probs = torch.sigmoid(self.net.classify(dist, onehot, dropout=False))
        return probs.reshape(n, t).numpy().astype(float)

    def prototype_table(self) -> np.ndarray:
        """Response probability of each learned prototype under each treatment, (l, T)."""
        if self.net is None:
            raise RuntimeError("DPNNClassifier.prototype_table called before fit")
        with torch.no_grad():
            return self.net.prototype_probs().numpy().astype(float)
