"""Files: structures (XSF, everything ASE reads), ``.nn.ascii`` potentials, HDF5 databases,
training results and predict.x output, all written atomically (:mod:`aenet_fn.io.atomic`).
Reads and writes the core's records; imports nothing above the core.

* :func:`read_structures` reads one path, several, or a directory of ``*.xsf`` files.
* :func:`read_xsf` / :func:`write_xsf` handle XSF files (single or multi-frame).
* :func:`from_ase` / :func:`to_ase` convert to and from ``ase.Atoms``.
"""

from aenet_fn.io.ase_io import from_ase, read_structures, to_ase
from aenet_fn.io.xsf import read_xsf, write_xsf

__all__ = ["from_ase", "read_structures", "read_xsf", "to_ase", "write_xsf"]
