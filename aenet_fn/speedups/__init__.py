"""The CPU speed-ups: the same numbers as the core's `torch.func` route, faster on the CPU
(hand-derived energy gradients, stored position Jacobians, fused optimiser forms). Imported only
by the driver, through :mod:`aenet_fn.driver.seam`."""
