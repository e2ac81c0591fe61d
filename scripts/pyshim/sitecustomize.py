"""Import shim for a plain checkout (no `pip install`): `netdsl.kernels` is the top-level
`kernels/` directory, mapped by pyproject's package-dir. `scripts/gpu-check` puts this
directory and the checkout on PYTHONPATH and sets NETDSL_ROOT; Python imports this file
at start-up in every process, pytest's and the test subprocesses' included."""
import importlib.util
import os
import sys

_root = os.environ.get("NETDSL_ROOT")
if _root and "netdsl.kernels" not in sys.modules:
    _init = os.path.join(_root, "kernels", "__init__.py")
    _spec = importlib.util.spec_from_file_location("netdsl.kernels", _init,
                                                   submodule_search_locations=[os.path.dirname(_init)])
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["netdsl.kernels"] = _mod
    _spec.loader.exec_module(_mod)
