"""``aenet_fn.torch_featurize``: the ænet tools' descriptor class over the functional core."""

from aenet_fn.torch_featurize.chebyshev import ChebyshevDescriptor

__all__ = ["ChebyshevDescriptor"]
