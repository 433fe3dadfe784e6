"""Prior means and covariances of spectral DCM, as SPM12's defaults.

The parameter vector follows SPM's ``spm_vec`` order: ``A`` (n x n, column-major), then
``transit`` (n), ``decay`` (1), ``epsilon`` (1), ``a`` (2), ``b`` (2) and ``c`` (n).
Every number of SPM12's ``spm_dcm_fmri_priors``/``spm_dcm_fmri_csd`` defaults lives here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Prior mean of off-diagonal (between-region) couplings, Hz.
A_OFFDIAG_MEAN = 1.0 / 128.0
#: Prior variance of every A parameter.
A_VARIANCE = 1.0 / 64.0
#: Prior variance of the hemodynamic parameters (transit, decay, epsilon).
HEMO_VARIANCE = 1.0 / 256.0
#: Prior variance of the spectral parameters (a, b, c).
SPECTRAL_VARIANCE = 1.0 / 64.0
#: SPM's ``maxnodes``: above this many regions the A prior is projected onto data modes.
MAX_NODES = 8
#: Prior mean and precision of the log-precision hyperparameters of the CSD error.
HYPER_MEAN = 8.0
HYPER_PRECISION = 128.0

PARAM_NAMES = ("A", "transit", "decay", "epsilon", "a", "b", "c")


@dataclass(frozen=True)
class ParamLayout:
    """Where each named parameter sits in the flat parameter vector of an n-region model."""

    n: int

    @property
    def sizes(self) -> dict[str, int]:
        """Number of entries of each named parameter."""
        n = self.n
        return {"A": n * n, "transit": n, "decay": 1, "epsilon": 1, "a": 2, "b": 2, "c": n}

    @property
    def size(self) -> int:
        """Total number of parameters."""
        return sum(self.sizes.values())

    def slices(self) -> dict[str, slice]:
        """Slice of the flat vector for each named parameter."""
        out, start = {}, 0
        for name in PARAM_NAMES:
            out[name] = slice(start, start + self.sizes[name])
            start += self.sizes[name]
        return out

    def unpack(self, theta: np.ndarray) -> dict[str, np.ndarray]:
        """Split a flat vector (..., P) into named arrays; ``A`` becomes (..., n, n)."""
        theta = np.asarray(theta)
        out = {name: theta[..., s] for name, s in self.slices().items()}
        out["A"] = np.swapaxes(out["A"].reshape(theta.shape[:-1] + (self.n, self.n)), -1, -2)
        return out

    def pack(self, params: dict[str, np.ndarray]) -> np.ndarray:
        """Inverse of :meth:`unpack`: named arrays to a flat vector (column-major A)."""
        A = np.asarray(params["A"], dtype=float)
        parts = [np.swapaxes(A, -1, -2).reshape(A.shape[:-2] + (self.n * self.n,))]
        for name in PARAM_NAMES[1:]:
            parts.append(np.asarray(params[name], dtype=float).reshape(A.shape[:-2] + (-1,)))
        return np.concatenate(parts, axis=-1)


def prior_mean(n: int) -> np.ndarray:
    """Prior mean of the flat parameter vector of an n-region, fully connected model.

    Parameters
    ----------
    n
        Number of regions.

    Returns
    -------
    numpy.ndarray
        Shape (P,), P = n^2 + 2n + 6: off-diagonal A 1/128, everything else 0.
    """
    layout = ParamLayout(n)
    A = np.full((n, n), A_OFFDIAG_MEAN)
    np.fill_diagonal(A, 0.0)
    zeros = {name: np.zeros(size) for name, size in layout.sizes.items() if name != "A"}
    return layout.pack({"A": A, **zeros})


def prior_variance(n: int) -> np.ndarray:
    """Diagonal of the (unprojected) prior covariance, shape (P,)."""
    layout = ParamLayout(n)
    var = np.empty(layout.size)
    for name, s in layout.slices().items():
        if name == "A":
            var[s] = A_VARIANCE
        elif name in ("transit", "decay", "epsilon"):
            var[s] = HEMO_VARIANCE
        else:
            var[s] = SPECTRAL_VARIANCE
    return var


def projected_A_covariance(y: np.ndarray, n_modes: int = MAX_NODES) -> np.ndarray:
    """SPM's prior covariance of vec(A) for models with more than ``n_modes`` regions.

    The isotropic prior is projected onto the principal modes of the data:
    ``C_A <- (P kron P) C_A (P kron P)^T`` with ``P = V V^T`` and ``V`` the first
    ``n_modes`` left singular vectors of the mean-removed n x T data.

    Parameters
    ----------
    y
        Time series, shape (T, n).
    n_modes
        Number of modes kept (SPM's ``maxnodes``, 8).

    Returns
    -------
    numpy.ndarray
        Shape (n^2, n^2).
    """
    y = np.asarray(y, dtype=float)
    n = y.shape[1]
    yc = (y - y.mean(axis=0)).T
    u, _, _ = np.linalg.svd(yc, full_matrices=False)
    v = u[:, :n_modes]
    proj = v @ v.T
    pp = np.kron(proj, proj)
    return pp @ (np.eye(n * n) * A_VARIANCE) @ pp.T


def prior_covariance(n: int, y: np.ndarray | None = None) -> np.ndarray:
    """Full prior covariance of the flat parameter vector, shape (P, P).

    Parameters
    ----------
    n
        Number of regions.
    y
        Time series (T, n). Required when ``n > 8``: the A block is then projected onto
        the data's principal modes as SPM does (:func:`projected_A_covariance`).
    """
    cov = np.diag(prior_variance(n))
    if n > MAX_NODES:
        if y is None:
            raise ValueError(
                f"a {n}-region model needs the time series to build SPM's projected A prior"
            )
        cov[: n * n, : n * n] = projected_A_covariance(y)
    return cov


def principal_subspace(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal basis of the prior's principal subspace, as SPM's ``spm_svd(pC, 0)``.

    Keeps the directions whose variance s satisfies ``s^2 N / sum(s^2) > 64 eps``, in order
    of decreasing variance (ties in their original order, as MATLAB's ``sort``). A diagonal
    prior (n <= 8 regions) gives SPM's basis exactly: unit vectors. Above 8 regions the
    projected A prior shares its variance 1/64 with 63 other A modes and the spectral
    parameters: inside such an eigenspace any rotation is a valid basis, and SPM's is
    whatever its LAPACK's ``dgesvd`` returns (under Octave 7.3 with OpenBLAS it changed with
    the number of OpenBLAS threads on the same matrix). This function returns one fixed by
    the matrix alone (:func:`canonical_eigenvectors`), so that SPM's path with it does not
    depend on the BLAS; pass SPM's recorded basis to :func:`bids_ketdcm.dcm.invert` to
    follow one SPM run exactly.

    Parameters
    ----------
    cov
        Prior covariance (P, P), symmetric positive semi-definite.

    Returns
    -------
    basis : numpy.ndarray
        Shape (P, R): columns span the subspace in which the optimiser works.
    variances : numpy.ndarray
        Shape (R,): prior variances along those columns.
    """
    if np.count_nonzero(cov - np.diag(np.diag(cov))) == 0:
        s = np.diag(cov).copy()
        vec = np.eye(cov.shape[0])
    else:
        s, vec = canonical_eigenvectors(*np.linalg.eigh((cov + cov.T) / 2))
    keep = s**2 * s.size / np.sum(s**2) > 64 * np.finfo(float).eps
    order = np.argsort(-s[keep], kind="stable")
    return vec[:, keep][:, order], s[keep][order]


#: Eigenvalues within this much of each other (relative to the largest) share an eigenspace.
EIGENSPACE_TOLERANCE = 1e-9


def canonical_eigenvectors(values: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same eigenvectors of a symmetric matrix whatever basis its eigensolver chose.

    Inside the eigenspace of a repeated eigenvalue (equal to ``EIGENSPACE_TOLERANCE`` of
    the largest) any orthonormal basis is valid, and LAPACK's depends on its threads. This
    rotates it to the eigenvectors of ``W = diag(sqrt(1), ..., sqrt(P))`` compressed onto
    the eigenspace, in increasing order: a function of the eigenspace's projector alone
    (the square roots give parameter axes distinct weights; an axis inside the eigenspace
    stays a unit vector). Each vector's first entry above 1e-6 of its largest is made
    positive, and the eigenvalues of an eigenspace are set to their mean.

    Parameters
    ----------
    values, vectors
        ``numpy.linalg.eigh``'s output: (P,) ascending eigenvalues, (P, P) eigenvectors.

    Returns
    -------
    tuple of numpy.ndarray
        The eigenvalues and the canonical eigenvectors, in the same order.
    """
    values, vectors = values.copy(), vectors.copy()
    weights = np.sqrt(np.arange(1.0, vectors.shape[0] + 1.0))
    tolerance = EIGENSPACE_TOLERANCE * np.abs(values).max()
    bounds = np.flatnonzero(np.diff(values) > tolerance) + 1
    for space in np.split(np.arange(values.size), bounds):
        if space.size > 1:
            block = vectors[:, space]
            _, rotation = np.linalg.eigh(block.T @ (weights[:, None] * block))
            vectors[:, space] = block @ rotation
            values[space] = values[space].mean()
    magnitude = np.abs(vectors)
    first = np.argmax(magnitude > 1e-6 * magnitude.max(axis=0), axis=0)
    vectors *= np.where(vectors[first, np.arange(vectors.shape[1])] < 0, -1.0, 1.0)
    return values, vectors


def basis_variances(cov: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Prior variances along the columns of a given orthonormal ``basis`` (P, R) of ``cov``.

    Raises
    ------
    ValueError
        When the columns are not orthonormal or do not diagonalise ``cov`` (a basis recorded
        for another prior).
    """
    basis = np.asarray(basis, dtype=float)
    if basis.ndim != 2 or basis.shape[0] != cov.shape[0]:
        raise ValueError(f"basis has shape {basis.shape}; expected ({cov.shape[0]}, R)")
    reduced = basis.T @ cov @ basis
    variances = np.diag(reduced).copy()
    scale = np.abs(variances).max()
    if (np.abs(basis.T @ basis - np.eye(basis.shape[1])).max() > 1e-8
            or np.abs(reduced - np.diag(variances)).max() > 1e-8 * scale):
        raise ValueError("basis is not an orthonormal eigenbasis of this prior covariance")
    return variances
