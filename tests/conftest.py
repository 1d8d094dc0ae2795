"""Tests run on the CPU (Pallas kernels interpreted), also where JAX's CUDA plugin is installed
for compiling to GPU targets: without this, JAX would try to start CUDA first."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
