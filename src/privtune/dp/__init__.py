"""Differential privacy: the ghost-clipping engine and everything ε depends on.

``engine`` (hooks, per-example norms, the clipped sum), ``layers`` (the ghost norm of each layer type, in
a registry), ``contributions`` (per-example gradient algebra), ``sampling`` (Poisson batches), ``noise``
(the Gaussian step), ``accounting`` (σ and ε), ``plan`` (what a run's settings cost, its privacy report),
``guarantee`` (what ε covers), ``fisher_release`` (the DP Fisher) and ``audit``.
"""
