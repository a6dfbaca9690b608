"""The package's one version number (a leaf module: anything may import it, it imports nothing).

pyproject.toml reads it (``dynamic = ["version"]``), and so do the wheel's metadata and run files
(``mmkv_version``). Bump it here and in CHANGELOG.md.
"""

__version__ = "0.2.0"
