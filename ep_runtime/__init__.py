"""ep-runtime: a distributed expert-parallel runtime for Mixture-of-Experts inference."""

from pathlib import Path as _Path

__version__ = "0.1.0"

# `kernels/` and `launch/` live at the top of the source tree and are installed as
# `ep_runtime.kernels` / `ep_runtime.launch` (pyproject's package-dir). Editable installs made by
# older setuptools (a plain path entry, no import hook) and runs straight from a checkout do not
# apply that mapping, so in a checkout the tree's root is searched for those subpackages too.
_root = _Path(__file__).resolve().parent.parent
if (_root / "kernels" / "__init__.py").is_file() and not (_Path(__file__).parent / "kernels").exists():
    __path__.append(str(_root))  # noqa: F821 - the package's own __path__
