"""mpnode.models: neural-ODE models and data for mixed-precision training with ``mpnode.core.odeint``.

Submodules (import the one you need; none is imported eagerly):

* [`mpnode.models.cnf`][mpnode.models.cnf]: continuous normalizing flows (exact / Hutchinson divergence, hypernetwork
  field);
* [`mpnode.models.otflow`][mpnode.models.otflow]: OT-Flow potential, dynamics, loss, MMD, sample generation;
* [`mpnode.models.mnist`][mpnode.models.mnist]: the ODE-Net blocks for MNIST and the data helpers (torchvision:
  ``mnist`` extra);
* [`mpnode.models.toy_data`][mpnode.models.toy_data]: 8 Gaussians, checkerboard, two spirals, circles;
* [`mpnode.models.cli`][mpnode.models.cli]: the command line the example scripts share (precision and solver
  choice, device, seed, output folder, sizes) and their CSV writer.
"""

__version__ = "0.1.0"
