"""The losses of self-supervised pretraining, and the collapse indicator, in ``keras.ops`` only.

Both methods learn from two augmented views of each image and need neither labels nor negatives,
so they work at the small batches a CPU or one GPU holds; SimCLR and MoCo contrast each image
with many negatives, which SimCLR gets from batches of thousands and MoCo from a queue and a
momentum encoder:

* ``vicreg`` (Bardes, Ponce and LeCun, 2022): the views' embeddings are pulled together
  (invariance) while each dimension keeps a standard deviation of at least 1 over the batch
  (variance) and the dimensions stay decorrelated (covariance). The variance term forbids
  collapse explicitly; its statistics are of single dimensions, which batches of 64 estimate well.
* ``simsiam`` (Chen and He, 2021): a predictor maps one view's projection onto the other's,
  whose gradient is stopped; no batch statistic enters the loss (the paper's batch 64 is within
  two points of its best).

The indicator (``embedding_std``) is the standard deviation over the batch of the L2-normalised
embeddings, averaged over dimensions: about ``1 / sqrt(d)`` for embeddings spread over the
sphere, near 0 when every image gets the same embedding (the SimSiam paper's measure).
"""

from __future__ import annotations

import keras
from keras import ops

METHODS = ("vicreg", "simsiam")

# VICReg's published weights of its three terms, and its target standard deviation.
VICREG_INVARIANCE = 25.0
VICREG_VARIANCE = 25.0
VICREG_COVARIANCE = 1.0
VICREG_TARGET_STD = 1.0
_EPSILON = 1e-4  # inside VICReg's square root: a dimension constant over the batch keeps a finite gradient


def _float(tensor: keras.KerasTensor) -> keras.KerasTensor:
    """Losses in float32, whatever precision the model computes in."""
    return ops.cast(tensor, "float32")


def _unbiased_variance(embeddings: keras.KerasTensor) -> keras.KerasTensor:
    """Per dimension, over the batch, with ``n - 1`` in the denominator as VICReg's reference code has."""
    batch = ops.cast(ops.shape(embeddings)[0], "float32")
    centred = embeddings - ops.mean(embeddings, axis=0, keepdims=True)
    return ops.sum(ops.square(centred), axis=0) / (batch - 1.0)


def vicreg_terms(first: keras.KerasTensor, second: keras.KerasTensor) -> dict[str, keras.KerasTensor]:
    """VICReg's three unweighted terms of two views' embeddings ``[batch, d]``.

    ``invariance``: the mean squared difference of the two views; ``variance``: the mean over
    dimensions of ``max(0, 1 - sqrt(var + eps))``, averaged over the views; ``covariance``: the
    sum of the squared off-diagonal covariances divided by ``d``, summed over the views.
    """
    first, second = _float(first), _float(second)
    batch = ops.cast(ops.shape(first)[0], "float32")
    dims = ops.cast(ops.shape(first)[1], "float32")
    invariance = ops.mean(ops.square(first - second))
    variance, covariance = 0.0, 0.0
    for embeddings in (first, second):
        variance += ops.mean(ops.relu(VICREG_TARGET_STD - ops.sqrt(_unbiased_variance(embeddings) + _EPSILON))) / 2
        centred = embeddings - ops.mean(embeddings, axis=0, keepdims=True)
        matrix = ops.matmul(ops.transpose(centred), centred) / (batch - 1.0)
        off_diagonal = ops.sum(ops.square(matrix)) - ops.sum(ops.square(ops.diagonal(matrix)))
        covariance += off_diagonal / dims
    return {"invariance": invariance, "variance": variance, "covariance": covariance}


def vicreg(first: keras.KerasTensor, second: keras.KerasTensor) -> keras.KerasTensor:
    """VICReg's loss: its terms weighted 25, 25 and 1, as published."""
    terms = vicreg_terms(first, second)
    return (VICREG_INVARIANCE * terms["invariance"] + VICREG_VARIANCE * terms["variance"]
            + VICREG_COVARIANCE * terms["covariance"])


def _negative_cosine(prediction: keras.KerasTensor, target: keras.KerasTensor) -> keras.KerasTensor:
    """``-mean cos(prediction, target)`` over the batch, the target a constant (stop-gradient)."""
    prediction = _float(prediction)
    target = ops.stop_gradient(_float(target))
    cosine = ops.sum(prediction * target, axis=-1) / (
        ops.norm(prediction, axis=-1) * ops.norm(target, axis=-1) + 1e-12)
    return -ops.mean(cosine)


def simsiam(first_prediction: keras.KerasTensor, second_prediction: keras.KerasTensor,
            first_projection: keras.KerasTensor, second_projection: keras.KerasTensor) -> keras.KerasTensor:
    """SimSiam's symmetric loss ``D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2``, D the negative cosine; -1 at best."""
    return (_negative_cosine(first_prediction, second_projection)
            + _negative_cosine(second_prediction, first_projection)) / 2.0


def embedding_std(embeddings: keras.KerasTensor) -> keras.KerasTensor:
    """The collapse indicator of ``[batch, d]`` embeddings: the per-dimension standard deviation of the
    L2-normalised rows (population, over the batch), averaged over dimensions."""
    embeddings = _float(embeddings)
    unit = embeddings / (ops.norm(embeddings, axis=-1, keepdims=True) + 1e-12)
    return ops.mean(ops.std(unit, axis=0))
