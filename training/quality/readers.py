"""Readers for the paper's evaluation data from local paths (nothing is downloaded).

* :class:`ImageNetSegmentation`: the ImageNet-segmentation file of the paper's zero-shot localisation
  protocol (section 4.2; Guillaumin et al. 2014, as distributed with the transformer-explainability
  code), ``gtsegs_ijcv.mat``: a MATLAB v7.3 file, i.e. HDF5, read with ``h5py``. ``/value/img`` holds
  ``[N, 1]`` object references, each to a uint8 image stored as ``[3, W, H]`` (MATLAB's column-major
  order seen from HDF5); ``/value/gt`` holds ``[N, 1]`` references, each to a ``[1, 1]`` cell whose
  reference points at the ``[W, H]`` mask (non-zero = object). The file has no class labels: the
  protocol explains the class the model predicts.
* :class:`CubSplit`: CUB-200-2011 in its own layout: ``images.txt`` (``id relative/path.jpg``),
  ``train_test_split.txt`` (``id 1|0``, 1 = train), ``image_class_labels.txt`` (``id class_id``,
  1-based), ``classes.txt`` (``class_id 001.Black_footed_Albatross``), images under ``images/``.
  Class names drop the number and underscores ("Black footed Albatross").
* ImageNet and Places365 in the ImageFolder layout read with ``training.data.folder.ImageFolderSplit``.
All return uint8 ``[H, W, 3]`` images decoded by ``salf.contract.images`` (the gateway's decoder).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from salf.contract.images import load_image
from training.data.folder import DatasetError


class ImageNetSegmentation:
    """``gtsegs_ijcv.mat``: ``len(ds)``; ``ds[i] -> (image uint8 [H, W, 3], mask bool [H, W])``."""

    def __init__(self, path: str | Path) -> None:
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise DatasetError(f"{self.path} does not exist (the ImageNet-segmentation file, gtsegs_ijcv.mat)")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise DatasetError(f"{self.path} is not an HDF5 (MATLAB v7.3) file: {exc}") from None
        for key in ("value/img", "value/gt"):
            if key not in self._file:
                raise DatasetError(f"{self.path} has no /{key} (keys: {list(self._file.keys())}); "
                                   f"expected the gtsegs_ijcv.mat layout")
        self._img, self._gt = self._file["value/img"], self._file["value/gt"]
        if self._img.shape[0] != self._gt.shape[0]:
            raise DatasetError(f"{self.path}: {self._img.shape[0]} images but {self._gt.shape[0]} masks")

    def __len__(self) -> int:
        return int(self._img.shape[0])

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images in {self.path}")
        f = self._file
        image = np.asarray(f[self._img[i, 0]]).transpose(2, 1, 0)
        mask = np.asarray(f[f[self._gt[i, 0]][0, 0]]).transpose(1, 0)
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != mask.shape:
            raise DatasetError(f"{self.path} item {i}: image {image.shape} and mask {mask.shape} do not fit")
        return np.ascontiguousarray(image.astype(np.uint8)), np.ascontiguousarray(mask != 0)

    def close(self) -> None:
        self._file.close()


def _table(path: Path, what: str) -> dict[int, str]:
    if not path.is_file():
        raise DatasetError(f"{path} is missing: not a CUB-200-2011 folder ({what})")
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        key, _, value = line.strip().partition(" ")
        try:
            out[int(key)] = value.strip()
        except ValueError:
            raise DatasetError(f"{path}:{n}: expected '<id> <{what}>', got {line!r}") from None
    return out


class CubSplit:
    """CUB-200-2011's ``train`` or ``test`` split: ``ds[i] -> (uint8 [H, W, 3], label)``, the same
    interface as ``ImageFolderSplit`` (``classes``, ``paths``, ``labels``, ``image(i)``)."""

    has_masks = False
    concepts = None

    def __init__(self, root: str | Path, split: str, input_size: tuple[int, int] | None = None) -> None:
        if split not in ("train", "test"):
            raise DatasetError(f"CUB-200-2011 has the splits train and test, not {split!r}")
        self.root, self.split, self.input_size = Path(root), split, input_size
        images = _table(self.root / "images.txt", "relative image path")
        is_train = _table(self.root / "train_test_split.txt", "1 for train, 0 for test")
        labels = _table(self.root / "image_class_labels.txt", "class id")
        classes = _table(self.root / "classes.txt", "class folder name")
        self.classes = [classes[k].split(".", 1)[-1].replace("_", " ") for k in sorted(classes)]
        index = {k: n for n, k in enumerate(sorted(classes))}
        want = "1" if split == "train" else "0"
        ids = [k for k in sorted(images) if is_train.get(k) == want]
        missing = [k for k in ids if k not in labels]
        if missing:
            raise DatasetError(f"{self.root}: image ids {missing[:5]} have no line in image_class_labels.txt")
        self.paths = [self.root / "images" / images[k] for k in ids]
        self.labels = [index[int(labels[k])] for k in ids]

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int) -> np.ndarray:
        return load_image(self.paths[i], self.input_size)

    def __getitem__(self, i: int):
        import torch

        return torch.from_numpy(self.image(i)), self.labels[i]
