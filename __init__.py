"""memcurve: find and remove memorization in neural networks through loss curvature.

The repository root is the ``memcurve`` package (see ``[tool.setuptools]`` in pyproject.toml), so its
folders import as ``memcurve.data``, ``memcurve.curvature``, ``memcurve.callbacks`` and so on.
"""

__version__ = "0.1.0"
