"""`salfctl explain` on a video: frames explained a few at a time, one row per frame, and with --out and
--concept an annotated video per concept (PyAV I/O is clients/video.py)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from salf.cli import EXIT_FAILED, CliError

from .inputs import slug
from .rows import GEOMETRY_RULE, error_row, message_dict


def explain_video(client, video: Path, class_name, top_k, tracked: list[str], out: Optional[Path], name: str,
                  every: int, max_frames: Optional[int]):
    """One row per explained frame (frames in flight a few at a time), then the annotated videos."""
    import io
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from salf import figures as figure
    from .. import video as vid

    def explain_frame(rgb):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG")
        return client.explain(buf.getvalue(), class_name=class_name, top_k=top_k, heatmaps="none", concepts=tracked)

    try:
        frames = vid.read_frames(video, every, max_frames)
        fps = vid.frame_rate(video) / every
    except (OSError, ValueError) as exc:  # PyAV's errors are OSError subclasses
        raise CliError(f"cannot read the video {video}: {exc}", EXIT_FAILED) from exc
    small: list[np.ndarray] = []
    maps: dict[str, list[np.ndarray]] = {c: [] for c in tracked}
    window: deque = deque()
    bar = tqdm(desc=f"explain {video.name}", unit="frame", file=sys.stderr, leave=False)

    def finished(item):
        index, t, rgb, future = item
        key = f"{video}#{index}"
        try:
            r = future.result()
        except grpc.RpcError as exc:
            return error_row(key, exc)
        bar.update(1)
        row = {"image": key, "video": str(video), "frame": index, "time_s": round(t, 4), **message_dict(r)}
        grid = (r.grid_height, r.grid_width)
        row["geometry"] = {"grid": list(grid), "image_size": [r.image_height, r.image_width],
                           "upsampling": GEOMETRY_RULE}
        if out is not None and tracked:
            dh, dw = figure.display_size(rgb.shape[:2])
            small.append(np.asarray(Image.fromarray(rgb).resize((dw, dh), Image.BILINEAR)))
            for c in r.requested:
                maps[c.name].append(np.asarray(c.grid_map, np.float32).reshape(grid))
        return row

    with ThreadPoolExecutor(max_workers=4) as pool:
        for index, t, rgb in frames:
            window.append((index, t, rgb, pool.submit(explain_frame, rgb)))
            if len(window) >= 8:
                yield finished(window.popleft())
        while window:
            yield finished(window.popleft())
    bar.close()
    if out is not None and tracked and small:
        for c in tracked:
            lo_hi = figure.value_range(maps[c]) if maps[c] else (0.0, 1.0)
            annotated = [figure.overlay_frame(f, m, lo_hi, f"{c}   frame {k * every}") for k, (f, m)
                         in enumerate(zip(small, maps[c]))]
            if annotated:
                path = vid.write_video(out / f"{name}.{slug(c)}.mp4", annotated, fps)
                typer.echo(f"wrote {path}", err=True)
