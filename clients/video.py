"""Video in and out for `salfctl explain clip.mp4` (paper appendix E.2), with PyAV (``pip install av``;
its wheels carry their own FFmpeg). Any container PyAV reads is accepted; frames are decoded to RGB,
sent to the gateway as PNG (lossless: the model sees the decoded frame), and an annotated video is
written with H.264 (``libx264``) or MPEG-4 Part 2 where that encoder is missing.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".ts")


def _av():
    try:
        import av
    except ImportError as exc:
        raise ImportError("explaining a video needs PyAV: pip install av (the [video] extra)") from exc
    return av


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def read_frames(path: Path, every: int = 1, max_frames: int | None = None
                ) -> Iterator[tuple[int, float, np.ndarray]]:
    """``(frame index, time in seconds, uint8 RGB [h, w, 3])`` for every ``every``-th frame of the first
    video stream, at most ``max_frames`` of them."""
    av = _av()
    if every < 1:
        raise ValueError(f"--every must be >= 1, got {every}")
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        sent = 0
        for index, frame in enumerate(container.decode(stream)):
            if index % every:
                continue
            if max_frames is not None and sent >= max_frames:
                return
            t = float(frame.pts * stream.time_base) if frame.pts is not None else index / float(stream.average_rate or 25)
            yield index, t, frame.to_ndarray(format="rgb24")
            sent += 1


def frame_rate(path: Path) -> Fraction:
    av = _av()
    with av.open(str(path)) as container:
        rate = container.streams.video[0].average_rate
    return Fraction(rate) if rate else Fraction(25)


def write_video(path: Path, frames: list[np.ndarray], fps: Fraction) -> Path:
    """Encode uint8 RGB frames (all one size) to ``path``; sides are cropped to even numbers (yuv420p)."""
    av = _av()
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    h, w = frames[0].shape[:2]
    h, w = h - h % 2, w - w % 2
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[:h, :w]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
