"""Content-addressed explanation ids: the same image explained by the same model gets the same id on every
gateway replica that shares the key.

``id = HMAC-SHA256(key, model identity | image size | decoded model input)``, 128 bits in hex. The model
identity is the repository version, the bundle's SHA-256 and the maps dtype (what changes the cached maps);
the image enters as the decoded, resized model input and the image's own size (region masks are drawn at
it), so a re-encoded copy of the same pixels gets the same id, and any other input another. Behind a
balancer, a follow-up that lands on another replica and is resent with the image recreates the same id
(no new id for clients to adopt, no duplicate cache entries), and a shared store can be keyed by it.

The key (``salfctl serve --id-key`` or ``SALF_ID_KEY``) is the deployment's secret: ids are unguessable
without the image and the key. Without one, each process draws a random key: ids are then stable within
that process only (a single-replica deployment).
"""
from __future__ import annotations

import hashlib
import hmac
import os

import numpy as np

ENV_KEY = "SALF_ID_KEY"
MIN_KEY_CHARS = 16
_DOMAIN = b"salf-explanation-id/v1\0"


class ExplanationIds:
    """Makes explanation ids with one key; ``shared`` says whether the key came from the deployment."""

    def __init__(self, key: str | bytes | None = None) -> None:
        if key is None or key == "":
            self._key, self.shared = os.urandom(32), False
        else:
            raw = key.encode("utf-8") if isinstance(key, str) else bytes(key)
            if len(raw) < MIN_KEY_CHARS:
                raise ValueError(f"the explanation id key must have at least {MIN_KEY_CHARS} characters "
                                 f"(got {len(raw)}); use e.g. `openssl rand -hex 32`")
            self._key, self.shared = raw, True

    @classmethod
    def from_env(cls, key: str | None = None) -> "ExplanationIds":
        """``key``, else ``$SALF_ID_KEY``, else a random per-process key."""
        return cls(key if key else os.environ.get(ENV_KEY) or None)

    def id_for(self, model: tuple, size: tuple[int, int], model_input: np.ndarray) -> str:
        """The id of ``model_input`` (the decoded ``[H, W, 3]``/``[3, H, W]`` array the model sees) of an image
        of ``size`` (h, w) under ``model`` (a tuple of what identifies the served model's maps)."""
        h = hmac.new(self._key, _DOMAIN, hashlib.sha256)
        h.update(repr(tuple(model)).encode("utf-8") + b"\0")
        h.update(f"{int(size[0])}x{int(size[1])}\0{model_input.dtype.str}\0{tuple(model_input.shape)}\0".encode())
        h.update(np.ascontiguousarray(model_input).tobytes())
        return h.hexdigest()[:32]
