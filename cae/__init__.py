"""cae: a convolutional autoencoder in JAX/Flax (see README.md)."""

import os

# TensorFlow (TFDS's I/O backend) and XLA read their C++ log level once, when first imported;
# set before either is, quiet unless asked otherwise.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
