"""The registry of backbones: one entry adds a model to ``--model``, the model builder and the weights check.

Standard library only, so that the configuration (and ``--help``) knows the model names without
loading Keras. An entry names its ``keras.applications`` constructor, the input normalisation it
was trained with (``models.XrayPreprocessing``'s modes), and the file Keras downloads for its
ImageNet weights without the top. Grad-CAM needs nothing per model: it reads the backbone's output.

MobileNetV3's BatchNorm statistics move with momentum 0.999: over the few thousand steps of a CPU
run from scratch they stay near their initial values, and the model in inference mode then gives
every image the same class. It gets the 0.99 of Keras' other backbones.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Backbone:
    """How to build one backbone."""

    constructor: str | None  # a keras.applications attribute; None: built by xray_tf.chexnet
    normalization: str  # caffe | torch | tf | raw (the application rescales 0-255 itself)
    imagenet_weights: str | None  # below Keras' download origin; None: no ImageNet download
    description: str
    # Bytes of float32 activations and their gradients per input pixel of one image in a training
    # step, a rough upper estimate for xray_tf.resources (e.g. ResNet50 keeps about 100 MB of
    # activations for a 224 px image, and the backward pass as much again).
    step_bytes_per_pixel: int = 4_000
    # BatchNorm momentum to set on every BatchNormalization layer; None keeps the application's.
    batch_norm_momentum: float | None = None


BACKBONES: dict[str, Backbone] = {
    "resnet50": Backbone("ResNet50", "caffe", "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                         "ResNet-50, the paper's backbone (25.6 M parameters)."),
    "resnet50v2": Backbone("ResNet50V2", "tf", "resnet/resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                           "ResNet-50 v2, pre-activation blocks (25.6 M)."),
    "densenet121": Backbone("DenseNet121", "torch", "densenet/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
                            "DenseNet-121, CheXNet's architecture (8.1 M).", step_bytes_per_pixel=6_000),
    "densenet169": Backbone("DenseNet169", "torch", "densenet/densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5",
                            "DenseNet-169 (14.3 M).", step_bytes_per_pixel=7_500),
    "densenet_chexnet": Backbone(None, "torch", None,
                                 "DenseNet-121 with CheXNet's weights (--chexnet_weights, from xray-convert-chexnet).",
                                 step_bytes_per_pixel=6_000),
    "efficientnetv2b0": Backbone("EfficientNetV2B0", "raw", "efficientnet_v2/efficientnetv2-b0_notop.h5",
                                 "EfficientNetV2-B0 (7.2 M)."),
    "efficientnetv2s": Backbone("EfficientNetV2S", "raw", "efficientnet_v2/efficientnetv2-s_notop.h5",
                                "EfficientNetV2-S (21.6 M).", step_bytes_per_pixel=8_000),
    "convnext_tiny": Backbone("ConvNeXtTiny", "raw", "convnext/convnext_tiny_notop.h5", "ConvNeXt-Tiny (28.6 M)."),
    "mobilenetv3small": Backbone("MobileNetV3Small", "raw",
                                 "mobilenet_v3/weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
                                 "MobileNetV3-Small (2.6 M): quick CPU experiments.", step_bytes_per_pixel=1_000,
                                 batch_norm_momentum=0.99),
}
MODELS = tuple(BACKBONES)
