"""The project's shared, torch-free namespace.

- ``salf.contract``: the facts training, export, serving and the clients share (image decoding, the
  model-repository format, grid geometry, explanation math, file I/O). Hand-written, committed.
- ``salf.v1``: the gateway API, generated from ``proto/salf/v1/*.proto`` by ``make proto``
  (git-ignored).
"""
