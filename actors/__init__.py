"""Ray actor kinds: one module per kind (generator, judge, trainer loop, weight sync).

Each module is a thin shell whose public methods are the remote API; the work is done by plain
classes usable without Ray. Importing this package imports neither Ray nor vLLM.
"""
