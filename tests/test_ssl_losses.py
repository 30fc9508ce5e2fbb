"""The self-supervised losses equal their published formulas, computed here in NumPy; the collapse indicator."""

from __future__ import annotations

import numpy as np
import pytest
from keras import ops

from xray_tf import ssl_losses


def _embeddings(seed: int, batch: int = 16, dims: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, dims)).astype(np.float32)


def _numpy_vicreg(first: np.ndarray, second: np.ndarray) -> float:
    """VICReg as its paper's pseudo-code writes it: unbiased variance, covariance over n - 1."""
    n, d = first.shape
    invariance = np.mean((first - second) ** 2)
    variance = sum(np.mean(np.maximum(0.0, 1.0 - np.sqrt(z.var(axis=0, ddof=1) + 1e-4))) for z in (first, second)) / 2
    covariance = 0.0
    for z in (first, second):
        centred = z - z.mean(axis=0)
        cov = centred.T @ centred / (n - 1)
        covariance += (np.sum(cov ** 2) - np.sum(np.diag(cov) ** 2)) / d
    return 25.0 * invariance + 25.0 * variance + 1.0 * covariance


def _numpy_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_vicreg_equals_its_formula():
    first, second = _embeddings(0), _embeddings(1) * 0.3
    loss = float(ops.convert_to_numpy(ssl_losses.vicreg(first, second)))
    assert loss == pytest.approx(_numpy_vicreg(first, second), rel=1e-5)


def test_vicreg_terms_each_measure_their_own_thing():
    first = _embeddings(2)
    same = {name: float(ops.convert_to_numpy(value)) for name, value in ssl_losses.vicreg_terms(first, first).items()}
    assert same["invariance"] == 0.0
    # A tiny spread is below the target standard deviation of 1 in every dimension: the variance term grows.
    small = {name: float(ops.convert_to_numpy(value)) for name, value in
             ssl_losses.vicreg_terms(first * 0.01, first * 0.01).items()}
    assert small["variance"] > 0.9 > same["variance"]
    # Two identical columns are perfectly correlated: the covariance term grows.
    correlated = np.concatenate([first[:, :1]] * 8, axis=1)
    terms = ssl_losses.vicreg_terms(correlated, correlated)
    assert float(ops.convert_to_numpy(terms["covariance"])) > 5 * same["covariance"]


def test_simsiam_equals_its_formula():
    p1, p2, z1, z2 = (_embeddings(seed) for seed in range(4))
    expected = -np.mean(_numpy_cosine(p1, z2)) / 2 - np.mean(_numpy_cosine(p2, z1)) / 2
    loss = float(ops.convert_to_numpy(ssl_losses.simsiam(p1, p2, z1, z2)))
    assert loss == pytest.approx(expected, rel=1e-5)
    assert float(ops.convert_to_numpy(ssl_losses.simsiam(z2, z1, z1, z2))) == pytest.approx(-1.0, abs=1e-5)


def test_embedding_std_equals_its_formula_and_detects_collapse():
    embeddings = _embeddings(5, batch=512, dims=64)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    value = float(ops.convert_to_numpy(ssl_losses.embedding_std(embeddings)))
    assert value == pytest.approx(np.mean(unit.std(axis=0)), rel=1e-5)
    assert value == pytest.approx(1 / np.sqrt(64), rel=0.05)  # healthy: spread over the sphere
    collapsed = np.tile(embeddings[:1], (512, 1))  # every image the same embedding
    assert float(ops.convert_to_numpy(ssl_losses.embedding_std(collapsed))) < 1e-6
