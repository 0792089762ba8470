"""The public path of HDF5 structure databases (build, open, read); the code lives in
:mod:`aenet_fn.io.database`, whose public names this module hands out."""

from aenet_fn.io.database import *  # noqa: F403 (the same names, by design)
from aenet_fn.io.database import __all__  # noqa: F401 (re-exported)
