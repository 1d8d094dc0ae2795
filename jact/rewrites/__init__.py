"""Rewrites that change which residuals autodiff saves, before jact stores them.

* `chains`: an elementwise chain (GELU, SiLU, ...) saves one derivative instead of each step's values;
* `pooling`: max-pooling saves a one-byte argmax instead of its input and output;
* `affine`: a residual that is an affine function of another (a normalisation's output and its
  centred input) is rebuilt from it in the backward pass instead of stored twice;
* `evaluate`: the evaluator that applies chains, pooling and loop rules while running a jaxpr.
"""
