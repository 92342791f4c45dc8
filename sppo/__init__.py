"""SPPO on Ray: the algorithm and its orchestration.

Importing this package is light: it pulls in neither Ray nor vLLM (modules that need Ray import
it themselves). The maths lives in `sppo.preference` and `sppo.loss`.
"""

__version__ = "0.1.0"
