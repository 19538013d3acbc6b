"""One torch-free contract between training, export, serving and the clients (docs/DESIGN.md).

Each fact lives in exactly one module here; nothing else re-derives it:

- :mod:`salf.contract.images`: decoding image and mask files/bytes (EXIF orientation, 16-bit,
  palette, alpha, first frame) and the model-input preprocessing (RGB, bilinear resize, uint8).
- :mod:`salf.contract.regions`: box and points regions as pixel masks.
- :mod:`salf.contract.repository`: the exported model repository's layout, tensor names, metadata
  schema and format version (written by export, read by serving, validated in one place).
- :mod:`salf.contract.grid`: prompting-grid geometry (paper Algorithm 1).
- :mod:`salf.contract.explain`: the explanation math (contributions, top concepts, Explain Anything,
  local intervention, rules).
- :mod:`salf.contract.files`: atomic writes and SHA-256 checksums.

Only numpy, Pillow and safetensors are imported here.
"""


class ContractError(ValueError):
    """Input that breaks the contract: an undecodable image, a mask of the wrong size, a bad region,
    a repository of another format. Each part maps it to its own error (gRPC status, exit code)."""
