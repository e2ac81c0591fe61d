"""netdsl: a network-definition language with static checks and compiled kernels."""
import os as _os

# OpenBLAS and Numba's parallel loops both spin-wait; together a conv layer ran 24x
# slower. netdsl parallelises over the batch itself, so BLAS must be single-threaded,
# and that is only honoured if set before numpy loads BLAS.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# GNU OpenMP's default wait policy made each parallel kernel launch cost ~4 ms here
# (measured: a 262K-element ReLU, 3.7 ms with prange vs 0.09 ms serial); with a
# passive policy the launch costs tens of microseconds. Must precede numba's OpenMP load.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
