"""Many small linear models at once: the engine behind inner-CV tuning and permutation nulls.

A nested CV or a 1000-permutation test of the cohort (about 27 participants) fits
thousands of tiny models; scikit-learn's per-call overhead (milliseconds) would dominate.
These functions fit a whole batch of independent problems with vectorised numpy and
reproduce scikit-learn's estimators inside a ``StandardScaler`` pipeline (same objective,
same class weighting; tests compare coefficients and predictions with scikit-learn):

* :func:`fit_logistic`: ``LogisticRegression(C, class_weight="balanced")`` for two classes
  (Newton's method, unpenalised intercept);
* :func:`fit_multinomial`: the multinomial ``LogisticRegression`` (Newton-CG);
* :func:`fit_squared_hinge`: ``LinearSVC(C, class_weight="balanced")`` (squared hinge,
  penalised intercept, liblinear's one-vs-rest weighting);
* :func:`fit_elastic_net`: ``ElasticNet(alpha, l1_ratio)`` (coordinate descent).

Problems are stacked along a leading axis P and padded to a common number of training
rows; a padded row has sample weight 0. Every L2-penalised model depends on the training
data only through its row space, so training data with more features than rows are first
rotated onto their (at most n) singular directions (exact, not an approximation).
:func:`predict_splits` wraps standardisation, that reduction and the fits for a list of
train/test splits.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit, log_expit, logsumexp

#: Ridge added to unpenalised intercepts so that every Newton system is non-singular.
_INTERCEPT_RIDGE = 1e-10
_STEPS = 2.0 ** -np.arange(0, 31)


def standardize(
    Xtr: np.ndarray, mask: np.ndarray, Xte: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Scale each problem's data by its training mean and (population) sd.

    Parameters
    ----------
    Xtr
        Training data (P, n, p); padded rows are ignored.
    mask
        (P, n) True on real training rows.
    Xte
        Test data (P, m, p).

    Returns
    -------
    Ztr, Zte
        Standardised arrays; padded training rows are zero. A constant feature gets
        scale 1, as ``StandardScaler``.
    """
    w = mask.astype(float)
    count = w.sum(axis=1)[:, None]
    mean = np.einsum("pn,pnj->pj", w, Xtr) / count
    Ztr = Xtr - mean[:, None]
    Ztr *= w[..., None]
    var = np.einsum("pnj,pnj->pj", Ztr, Ztr) / count
    scale = np.sqrt(var)
    scale[var <= 1e-12 * np.maximum(1.0, mean**2)] = 1.0
    Ztr /= scale[:, None]
    Zte = Xte - mean[:, None]
    Zte /= scale[:, None]
    return Ztr, Zte


def reduce_rank(Ztr: np.ndarray, Zte: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotate onto the training row space when there are more features than rows.

    With ``Ztr = U S V^T`` the L2-penalised fit on ``Ztr V = U S`` (at most n columns)
    gives the same predictions as the fit on ``Ztr``; test rows map to ``Zte V``, computed
    from the (n x n) Gram matrix as ``Zte Ztr^T U S^-1``.
    """
    if Ztr.shape[2] <= Ztr.shape[1]:
        return Ztr, Zte
    gram = Ztr @ np.swapaxes(Ztr, 1, 2)
    evals, U = np.linalg.eigh(gram)
    sv = np.sqrt(np.clip(evals, 0.0, None))
    keep = sv > 1e-8 * sv.max(axis=1, keepdims=True)
    inv = np.where(keep, 1.0 / np.where(keep, sv, 1.0), 0.0)
    return U * (sv * keep)[:, None, :], (Zte @ np.swapaxes(Ztr, 1, 2)) @ U * inv[:, None, :]


def _line_search(objective, J0: np.ndarray, slope: np.ndarray) -> np.ndarray:
    """Backtracking (Armijo) step per problem; ``objective(t, rows)`` evaluates steps t.

    Every problem first tries the full step; only those that fail try halved steps.
    Returns 0 where no step decreases the objective.
    """
    t = np.ones_like(J0)
    todo = np.arange(J0.size)
    for _ in range(40):
        ok = objective(t[todo], todo) <= J0[todo] + 1e-4 * t[todo] * slope[todo]
        todo = todo[~ok]
        if todo.size == 0:
            return t
        t[todo] *= 0.5
    t[todo] = 0.0
    return t


def _with_ones(Z: np.ndarray) -> np.ndarray:
    return np.concatenate([Z, np.ones(Z.shape[:-1] + (1,))], axis=-1)


def balanced_weights(y: np.ndarray, mask: np.ndarray, n_classes: int) -> np.ndarray:
    """``class_weight="balanced"`` sample weights per problem (0 on padded rows).

    Weight of class k = n / (number of classes present * count of k), as scikit-learn.
    """
    onehot = (y[..., None] == np.arange(n_classes)) & mask[..., None]
    counts = onehot.sum(axis=1)  # (P, K)
    present = (counts > 0).sum(axis=1, keepdims=True)
    n = mask.sum(axis=1, keepdims=True)
    per_class = np.where(counts > 0, n / np.maximum(present * counts, 1), 0.0)
    return np.take_along_axis(per_class, np.where(mask, y, 0), axis=1) * mask


def _solve(H: np.ndarray, g: np.ndarray) -> np.ndarray:
    return np.linalg.solve(H, g[..., None])[..., 0]


def _newton_linear(Zt: np.ndarray, max_iter: int, tol: float, derivatives, value) -> np.ndarray:
    """Damped Newton from zero for an objective of the linear predictor ``f = Zt theta``, per problem.

    Parameters
    ----------
    Zt
        Data with a column of ones (P, n, D).
    max_iter, tol
        As :func:`fit_logistic`.
    derivatives
        ``(theta, f) -> (J, grad, H)``: objective (P,), gradient (P, D), Hessian (P, D, D).
    value
        ``(theta_rows, f_rows, rows) -> J`` of the problems ``rows`` at trial points (the line search).

    Returns
    -------
    numpy.ndarray
        theta (P, D).
    """
    theta = np.zeros(Zt.shape[::2])
    for _ in range(max_iter):
        f = (Zt @ theta[..., None])[..., 0]
        J, grad, H = derivatives(theta, f)
        step = -_solve(H, grad)
        slope = (grad * step).sum(-1)
        if _converged(slope, J, tol):
            break
        fd = (Zt @ step[..., None])[..., 0]

        def objective(t, rows, theta=theta, step=step, f=f, fd=fd):
            return value(theta[rows] + t[:, None] * step[rows], f[rows] + t[:, None] * fd[rows], rows)

        theta = theta + _line_search(objective, J, slope)[:, None] * step
    return theta


def _converged(slope: np.ndarray, J: np.ndarray, tol: float) -> bool:
    return bool(np.all(-slope <= tol * np.maximum(1.0, np.abs(J))))


def fit_logistic(
    Z: np.ndarray, y: np.ndarray, weight: np.ndarray, C: np.ndarray, max_iter: int = 100,
    tol: float = 1e-12,
) -> tuple[np.ndarray, np.ndarray]:
    """L2 logistic regression, two classes, per problem (Newton with line search).

    Minimises ``0.5 |w|^2 + C sum_i s_i log(1 + exp(-y_i (z_i.w + b)))`` (the objective
    of scikit-learn's ``LogisticRegression``; ``b`` unpenalised).

    Parameters
    ----------
    Z
        Standardised training data (P, n, q).
    y
        Labels (P, n) in {0, 1}; each problem must hold both classes.
    weight
        Sample weights (P, n); 0 on padded rows.
    C
        Inverse regularisation strength (P,) or scalar.
    max_iter, tol
        Newton iterations at most; stop when every Newton decrement is below
        ``tol * max(1, objective)``.

    Returns
    -------
    coef, intercept
        (P, q) and (P,).
    """
    P, n, q = Z.shape
    Zt = _with_ones(Z)
    sign = 2.0 * y - 1.0
    Cs = np.broadcast_to(np.asarray(C, dtype=float), (P,))[:, None] * weight
    reg = np.r_[np.ones(q), _INTERCEPT_RIDGE]

    def derivatives(theta: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        J = 0.5 * (reg * theta**2).sum(-1) - (Cs * log_expit(sign * f)).sum(-1)
        grad = reg * theta - (np.swapaxes(Zt, 1, 2) @ (Cs * sign * expit(-sign * f))[..., None])[..., 0]
        d = expit(f) * expit(-f) * Cs
        H = np.swapaxes(Zt, 1, 2) @ (Zt * d[..., None]) + np.diag(reg)
        return J, grad, H

    def value(th: np.ndarray, ft: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return 0.5 * (reg * th**2).sum(-1) - (Cs[rows] * log_expit(sign[rows] * ft)).sum(-1)

    theta = _newton_linear(Zt, max_iter, tol, derivatives, value)
    return theta[:, :q], theta[:, q]


def fit_multinomial(
    Z: np.ndarray, y: np.ndarray, weight: np.ndarray, C: np.ndarray, class_mask: np.ndarray,
    max_iter: int = 100, tol: float = 1e-12,
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial L2 logistic regression per problem (Newton with line search).

    Minimises ``0.5 |W|_F^2 + C sum_i s_i (-log softmax(W z_i + b)_{y_i})`` over the
    classes present (``class_mask``); absent classes get probability 0.

    Parameters
    ----------
    Z
        Standardised training data (P, n, q).
    y
        Class indices (P, n) in 0..K-1 (padded rows: any present class).
    weight
        Sample weights (P, n).
    C
        (P,) or scalar.
    class_mask
        (P, K) True for classes present in the problem's training data.
    max_iter, tol
        As :func:`fit_logistic`.

    Returns
    -------
    coef, intercept
        (P, K, q) and (P, K); zero for absent classes.
    """
    P, n, q = Z.shape
    K = class_mask.shape[1]
    D = q + 1
    Zt = _with_ones(Z)
    ZtT = np.swapaxes(Zt, 1, 2)
    onehot = ((y[..., None] == np.arange(K)) & (weight > 0)[..., None]).astype(float)
    Cs = (np.broadcast_to(np.asarray(C, dtype=float), (P,))[:, None] * weight)[..., None]
    reg = np.tile(np.r_[np.ones(q), _INTERCEPT_RIDGE], K)
    theta = np.zeros((P, K * D))
    absent = ~class_mask[:, None, :]

    def log_prob(F):
        F = np.where(absent, -np.inf, F)
        return F - logsumexp(F, axis=2, keepdims=True)

    def logits(th, rows=slice(None)):
        return Zt[rows] @ np.swapaxes(th.reshape(-1, K, D), 1, 2)

    def objective(F, th, rows=slice(None)):
        lp = np.where(onehot[rows] > 0, log_prob_rows(F, rows), 0.0)
        return 0.5 * (reg * th**2).sum(-1) - (Cs[rows] * lp).sum((1, 2))

    def log_prob_rows(F, rows):
        F = np.where(absent[rows], -np.inf, F)
        return F - logsumexp(F, axis=2, keepdims=True)

    for _ in range(max_iter):
        F = logits(theta)
        J = objective(F, theta)
        prob = np.exp(log_prob(F))
        grad = reg * theta + np.swapaxes(ZtT @ (Cs * (prob - onehot)), 1, 2).reshape(P, K * D)
        # Hessian blocks (k, l): Z^T diag(c p_k (delta_kl - p_l)) Z
        H = np.empty((P, K, D, K, D))
        for k in range(K):
            for m in range(k, K):
                c = Cs[..., 0] * prob[..., k] * ((k == m) - prob[..., m])
                block = ZtT @ (Zt * c[..., None])
                H[:, k, :, m, :] = block
                H[:, m, :, k, :] = np.swapaxes(block, 1, 2)
        H = H.reshape(P, K * D, K * D) + np.diag(reg)
        step = -_solve(H, grad)
        slope = (grad * step).sum(-1)
        if _converged(slope, J, tol):
            break
        Fd = logits(step)

        def trial(t, rows, F=F, Fd=Fd, theta=theta, step=step):
            return objective(F[rows] + t[:, None, None] * Fd[rows], theta[rows] + t[:, None] * step[rows], rows)

        theta = theta + _line_search(trial, J, slope)[:, None] * step
    theta = theta.reshape(P, K, D) * class_mask[..., None]
    return theta[..., :q], theta[..., q]


def fit_squared_hinge(
    Z: np.ndarray, y: np.ndarray, cost: np.ndarray, max_iter: int = 100, tol: float = 1e-12
) -> tuple[np.ndarray, np.ndarray]:
    """Linear SVM with squared hinge loss and penalised intercept, per problem.

    Minimises ``0.5 (|w|^2 + b^2) + sum_i c_i max(0, 1 - y_i (z_i.w + b))^2``, liblinear's
    primal (``LinearSVC`` with ``intercept_scaling=1``), by generalised Newton.

    Parameters
    ----------
    Z
        Standardised training data (P, n, q).
    y
        Labels (P, n) in {0, 1}.
    cost
        Per-sample cost ``c_i`` (C times the class weight; 0 on padded rows).
    max_iter, tol
        As :func:`fit_logistic`.

    Returns
    -------
    coef, intercept
        (P, q) and (P,).
    """
    P, n, q = Z.shape
    Zt = _with_ones(Z)
    ZtT = np.swapaxes(Zt, 1, 2)
    sign = 2.0 * y - 1.0

    def derivatives(theta: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        slack = np.maximum(0.0, 1.0 - sign * f)
        J = 0.5 * (theta**2).sum(-1) + (cost * slack**2).sum(-1)
        active = cost * (slack > 0)
        grad = theta - 2.0 * (ZtT @ (active * slack * sign)[..., None])[..., 0]
        H = 2.0 * ZtT @ (Zt * active[..., None]) + np.eye(q + 1)
        return J, grad, H

    def value(th: np.ndarray, ft: np.ndarray, rows: np.ndarray) -> np.ndarray:
        sl = np.maximum(0.0, 1.0 - sign[rows] * ft)
        return 0.5 * (th**2).sum(-1) + (cost[rows] * sl**2).sum(-1)

    theta = _newton_linear(Zt, max_iter, tol, derivatives, value)
    return theta[:, :q], theta[:, q]


def fit_elastic_net(
    Z: np.ndarray, y: np.ndarray, mask: np.ndarray, alpha: np.ndarray, l1_ratio: np.ndarray,
    max_sweeps: int = 2000, tol: float = 1e-6,
) -> np.ndarray:
    """Elastic net on centred data, per problem (active-set coordinate descent).

    Minimises ``|y - Z w|^2 / (2 n) + alpha l1_ratio |w|_1 + alpha (1 - l1_ratio) |w|^2 / 2``
    (scikit-learn's ``ElasticNet`` objective once data and target are centred).
    Each round: coordinates violating the optimality condition join the active set;
    coordinate descent runs on the active set; then the exact solution for the support
    and signs found is solved for, and kept where its signs agree. A problem is done
    when no coordinate violates the optimality condition.

    Parameters
    ----------
    Z
        Centred training data (P, n, p); padded rows zero.
    y
        Centred targets (P, n); padded rows zero.
    mask
        (P, n) True on real rows.
    alpha, l1_ratio
        (P,) or scalars.
    max_sweeps, tol
        Coordinate descent stops when no coefficient moves more than ``tol``.

    Returns
    -------
    numpy.ndarray
        Coefficients (P, p).
    """
    P, n, p = Z.shape
    n_rows = mask.sum(axis=1).astype(float)
    alpha = np.broadcast_to(np.asarray(alpha, dtype=float), (P,))
    l1_ratio = np.broadcast_to(np.asarray(l1_ratio, dtype=float), (P,))
    thresh, ridge = alpha * l1_ratio, alpha * (1 - l1_ratio)
    Zpad = np.concatenate([Z, np.zeros((P, n, 1))], axis=2)  # column p: a dummy, always 0
    norms = np.concatenate([(Z**2).sum(axis=1) / n_rows[:, None], np.zeros((P, 1))], axis=1)
    w = np.zeros((P, p + 1))
    resid = y.astype(float).copy()
    todo = np.arange(P)
    for _ in range(p + 1):
        grad = np.einsum("pnj,pn->pj", Z[todo], resid[todo]) / n_rows[todo, None]
        nonzero = w[todo, :p] != 0
        violated = ~nonzero & (np.abs(grad) > thresh[todo, None] * (1 + 1e-9) + 1e-12)
        todo = todo[violated.any(axis=1) | _kkt_gap(grad, w[todo, :p], thresh[todo], ridge[todo], tol)]
        if todo.size == 0:
            break
        active = (w[todo, :p] != 0) | (np.abs(np.einsum("pnj,pn->pj", Z[todo], resid[todo]))
                                        / n_rows[todo, None] > thresh[todo, None])
        idx = _gather_index(active, p)
        cols = np.moveaxis(Zpad[todo[:, None], :, idx], 1, 0)  # (width, T, n)
        cn = norms[todo[:, None], idx].T
        ww = w[todo[:, None], idx].T.copy()
        r = resid[todo]
        th, rd, nr = thresh[todo], ridge[todo], n_rows[todo]
        for _ in range(max_sweeps):
            biggest = np.zeros(len(todo))
            for j in range(idx.shape[1]):
                xj = cols[j]
                rho = np.einsum("pn,pn->p", xj, r) / nr + cn[j] * ww[j]
                denom = cn[j] + rd
                new = np.sign(rho) * np.maximum(np.abs(rho) - th, 0.0)
                new = np.divide(new, denom, out=np.zeros_like(new), where=denom > 0)
                change = new - ww[j]
                if np.any(change):
                    r -= xj * change[:, None]
                    ww[j] = new
                    np.maximum(biggest, np.abs(change), out=biggest)
            if biggest.max() <= max(tol, 1e-3):  # signs and support settle long before
                break
        w[todo[:, None], idx] = ww.T
        w[:, p] = 0.0
        exact = _exact_on_support(Z[todo], y[todo], w[todo, :p], n_rows[todo], th, rd)
        if exact is not None:
            ok, values = exact
            w[todo[ok], :p] = values[ok]
            r[ok] = y[todo[ok]] - np.einsum("pnj,pj->pn", Z[todo[ok]], values[ok])
        resid[todo] = r
    return w[:, :p]


def _kkt_gap(grad, w, thresh, ridge, tol) -> np.ndarray:
    """Problems whose non-zero coefficients are not yet optimal (to ``tol``)."""
    # optimality on the support: grad_j = thresh sign(w_j) + ridge w_j, grad at the residual
    gap = np.abs(grad - thresh[:, None] * np.sign(w) - ridge[:, None] * w) * (w != 0)
    return gap.max(axis=1) > tol


def _gather_index(active: np.ndarray, p: int) -> np.ndarray:
    """Indices of each row's active coordinates, padded with the dummy index ``p``."""
    width = max(int(active.sum(axis=1).max()), 1)
    order = np.argsort(~active, axis=1, kind="stable")[:, :width]
    return np.where(np.take_along_axis(active, order, axis=1), order, p)


def _exact_on_support(Z, y, w, n_rows, thresh, ridge):
    """Solve the elastic net restricted to each problem's support with its signs.

    Returns (accepted mask, coefficients) where the solution keeps every sign, or None
    when no problem has a support.
    """
    support = w != 0
    if not support.any():
        return None
    idx = _gather_index(support, Z.shape[2])
    real = idx < Z.shape[2]
    Zs = np.take_along_axis(Z, np.where(real, idx, 0)[:, None, :], axis=2) * real[:, None, :]
    sign = np.sign(np.take_along_axis(w, np.where(real, idx, 0), axis=1)) * real
    G = np.swapaxes(Zs, 1, 2) @ Zs / n_rows[:, None, None]
    G += np.eye(idx.shape[1]) * np.where(real, ridge[:, None], 1.0)[:, None, :]
    rhs = np.einsum("pnj,pn->pj", Zs, y) / n_rows[:, None] - thresh[:, None] * sign
    try:
        sol = np.linalg.solve(G, rhs[..., None])[..., 0] * real
    except np.linalg.LinAlgError:
        return None
    ok = ((sol * sign > 0) | ~real).all(axis=1)
    values = np.zeros((w.shape[0], w.shape[1] + 1))  # the last column takes the padding
    np.put_along_axis(values, idx, sol, axis=1)
    return ok, values[:, :-1]


def _stack(Xs: list[np.ndarray], rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Stack ``Xs[i][rows[i]]`` for each problem, padded with zero rows, and the row mask."""
    n = max(len(r) for r in rows)
    out = np.zeros((len(rows), n) + Xs[0].shape[1:])
    mask = np.zeros((len(rows), n), dtype=bool)
    for i, (X, r) in enumerate(zip(Xs, rows, strict=True)):
        out[i, : len(r)] = X[r]
        mask[i, : len(r)] = True
    return out, mask


def predict_splits(
    model: str,
    Xs: list[np.ndarray],
    y: np.ndarray,
    splits: list[tuple[np.ndarray, np.ndarray]],
    params: list[dict],
    n_classes: int = 2,
    enet_tol: float = 1e-6,
) -> list[np.ndarray]:
    """Fit ``model`` on each split's training rows and score its test rows.

    Parameters
    ----------
    model
        ``logistic`` (binary, or one-vs-rest for more classes), ``multinomial``,
        ``svm`` (one-vs-rest for more classes) or ``elasticnet``.
    Xs
        Feature matrix (N, p) of each problem, one per split (the same array may repeat;
        permutation tests pass row-permuted copies).
    y
        Targets (N,): class indices 0..K-1, or floats for ``elasticnet``.
    splits
        (train_indices, test_indices) per problem.
    params
        Hyper-parameters per problem: ``C``, or ``alpha`` and ``l1_ratio``.
    n_classes
        Number of classes K.
    enet_tol
        Coordinate-descent tolerance of the elastic net (largest coefficient change in
        a sweep, on the standardised scale).

    Returns
    -------
    list of numpy.ndarray
        Per problem: class scores (m, K) (probabilities for the logistic models,
        decision values for the SVM; a class absent from the training rows scores 0,
        or -inf for the SVM), or predictions (m,) for ``elasticnet``.
    """
    train = [s[0] for s in splits]
    test = [s[1] for s in splits]
    Xtr, mask = _stack(Xs, train)
    Xte, _ = _stack(Xs, test)
    ytr, _ = _stack([np.asarray(y)] * len(splits), train)
    Ztr, Zte = standardize(Xtr, mask, Xte)
    if model == "elasticnet":
        pred = _regress(Ztr, Zte, ytr, mask, params, enet_tol)
    elif model in ("logistic", "multinomial", "svm"):
        Ztr, Zte = reduce_rank(Ztr, Zte)
        C = np.array([p["C"] for p in params], dtype=float)
        pred = _classify(model, Ztr, Zte, ytr.astype(int), mask, C, n_classes)
    else:
        raise ValueError(f"unknown batched model {model!r}")
    return [pred[i, : len(t)] for i, t in enumerate(test)]


def _regress(Ztr, Zte, ytr, mask, params, tol) -> np.ndarray:
    """Elastic net on the target standardised within each training set."""
    n_rows = mask.sum(1)
    y_mean = (ytr * mask).sum(1) / n_rows
    y_sd = np.sqrt((((ytr - y_mean[:, None]) * mask) ** 2).sum(1) / n_rows)
    y_sd = np.where(y_sd > 0, y_sd, 1.0)
    ys = (ytr - y_mean[:, None]) / y_sd[:, None] * mask
    coef = fit_elastic_net(
        Ztr, ys, mask,
        np.array([p["alpha"] for p in params], dtype=float),
        np.array([p["l1_ratio"] for p in params], dtype=float), tol=tol,
    )
    return np.einsum("pmj,pj->pm", Zte, coef) * y_sd[:, None] + y_mean[:, None]


def _classify(model, Ztr, Zte, ytr, mask, C, K) -> np.ndarray:
    ytr = np.where(mask, ytr, 0)
    present = ((ytr[..., None] == np.arange(K)) & mask[..., None]).sum(1) > 0  # (P, K)
    scores = np.zeros(Zte.shape[:2] + (K,))
    if model == "multinomial":
        multi = present.sum(1) > 1
        if multi.any():
            weight = balanced_weights(ytr[multi], mask[multi], K)
            coef, icpt = fit_multinomial(Ztr[multi], ytr[multi], weight, C[multi], present[multi])
            logits = np.einsum("pmj,pkj->pmk", Zte[multi], coef) + icpt[:, None, :]
            logits = np.where(present[multi][:, None, :], logits, -np.inf)
            scores[multi] = np.exp(logits - logsumexp(logits, axis=2, keepdims=True))
        scores[~multi] = present[~multi][:, None, :]
        return scores
    n = mask.sum(1, keepdims=True)
    class_w = balanced_weights(ytr, mask, K)
    for k in ([1] if K == 2 else range(K)):
        yk = (ytr == k) & mask
        n_pos = yk.sum(1, keepdims=True)
        both = (n_pos[:, 0] > 0) & (n_pos[:, 0] < n[:, 0])
        if model == "logistic":
            weight = np.where(yk, n / (2 * np.maximum(n_pos, 1)), n / (2 * np.maximum(n - n_pos, 1)))
            weight = weight * mask
            col = np.broadcast_to((n_pos > 0).astype(float), Zte.shape[:2]).copy()
        else:  # liblinear: class weights; one-vs-rest weighs only the positive class
            weight = class_w if K == 2 else np.where(yk, class_w, mask.astype(float))
            col = np.broadcast_to(np.where(n_pos > 0, 1.0, -1.0), Zte.shape[:2]).copy()
        if both.any():
            if model == "logistic":
                coef, icpt = fit_logistic(Ztr[both], yk[both].astype(float), weight[both], C[both])
                col[both] = expit(np.einsum("pmj,pj->pm", Zte[both], coef) + icpt[:, None])
            else:
                cost = weight[both] * C[both, None]
                coef, icpt = fit_squared_hinge(Ztr[both], yk[both].astype(float), cost)
                col[both] = np.einsum("pmj,pj->pm", Zte[both], coef) + icpt[:, None]
        scores[..., k] = col
    if K == 2:
        scores[..., 0] = 1.0 - scores[..., 1] if model == "logistic" else -scores[..., 1]
    elif model == "logistic":
        scores = np.where(present[:, None, :], scores, 0.0)
        total = scores.sum(2, keepdims=True)
        scores = np.divide(scores, total, out=np.full_like(scores, 1.0 / K), where=total > 0)
    else:
        scores = np.where(present[:, None, :], scores, -np.inf)
    return scores
