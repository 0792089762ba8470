"""The training driver: a ``TrainState`` threaded through epochs (state, step, train), the
committee, batch loading, processes and checkpoints. Uses the core, the speed-ups (through its
seam) and the file formats of :mod:`aenet_fn.io`."""
