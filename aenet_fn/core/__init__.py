"""The functional core: frozen records registered as pytrees and pure functions over them
(structures, neighbours, descriptor, networks, normalisation, potential, losses, optimisers,
sampling, featurized sets and mini-batches). No I/O, no global state; imports only itself."""
