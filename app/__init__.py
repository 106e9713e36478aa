"""featcodec HTTP service: a thin FastAPI layer over the ``codec`` library."""

import os

# One BLAS/OpenMP thread per worker process unless the deployment says otherwise: the
# service scales with worker processes, and a BLAS pool per worker on top of them was
# measured to make a convolution ~10x slower when the other core is busy. Set here, before
# anything below imports numpy, so that `featcodec serve` and its spawned workers get it.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
