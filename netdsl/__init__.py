"""netdsl: a network-definition language with static checks and compiled kernels."""
import os as _os

# OpenBLAS and Numba's parallel loops both spin-wait; together a conv layer ran 24x
# slower. netdsl parallelises over the batch itself, so BLAS must be single-threaded,
# and that is only honoured if set before numpy loads BLAS.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
