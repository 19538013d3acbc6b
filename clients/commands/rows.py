"""One row per result, whatever the command: requests (a thread pool, or one ``Stream`` call) answered
in input order, a failed request an error row, resumable JSON Lines output, tables or JSON Lines on
stdout, and the exit code (1 when any row is an error)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from salf.cli import EXIT_FAILED, EXIT_USAGE, CliError

from .connect import connect

InFlight = Annotated[int, typer.Option("--in-flight", help="Requests kept in flight; files are read while "
                                                           "others are answered. Results keep the input order.")]
Output = Annotated[Optional[Path], typer.Option("--output", "-O", dir_okay=False,
                                                help="Write the JSON Lines here (one row per image, flushed as "
                                                     "each finishes) instead of stdout.")]
Resume = Annotated[bool, typer.Option("--resume", help="With --output: keep its rows and skip the images it "
                                                       "already answered without error (a stopped run goes on).")]
GEOMETRY_RULE = ("bilinear, align_corners=False: grid cell (i, j) is centred at image pixel "
                 "((i + 0.5) * image_height / grid_height, (j + 0.5) * image_width / grid_width)")


def message_dict(message, drop: tuple[str, ...] = ("heatmap",)) -> dict:
    """A response message as a JSON-ready dict (proto field names, defaults included), without ``drop``."""
    from google.protobuf import json_format

    doc = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=True)

    def prune(node):
        if isinstance(node, dict):
            return {k: prune(v) for k, v in node.items() if k not in drop}
        if isinstance(node, list):
            return [prune(v) for v in node]
        return node
    return prune(doc)


def error_row(item, exc) -> dict:
    return {"image": str(item), "error": {"code": exc.code().name, "message": exc.details()}}


def request_rows(client, inputs: list, what: str, request: Callable, in_flight: int = 1):
    """``request(client, item) -> dict`` for each input, yielded in input order; a failed RPC becomes an
    error row. ``in_flight > 1``: that many requests run at once (threads; each reads its file too)."""
    import grpc
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    def one(item):
        try:
            return {"image": str(item), **request(client, item)}
        except grpc.RpcError as exc:
            return error_row(item, exc)

    bar = tqdm(total=len(inputs), desc=what, unit="image", file=sys.stderr, disable=len(inputs) < 2, leave=False)
    if in_flight <= 1:
        for item in inputs:
            yield one(item)
            bar.update(1)
    else:
        window: deque = deque()
        with ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="salfctl") as pool:
            for item in inputs:
                window.append(pool.submit(one, item))
                if len(window) >= 2 * in_flight:  # a bounded read-ahead, whatever the input count
                    yield window.popleft().result()
                    bar.update(1)
            while window:
                yield window.popleft().result()
                bar.update(1)
    bar.close()


def stream_rows(client, inputs: list[Path], what: str, request: Callable, finish: Callable, window: int):
    """Offline scoring on one ``Stream`` call (docs/DESIGN.md "Streaming"): ``request(data) -> PredictRequest
    | ExplainRequest`` per file, read as the gateway takes them; ``finish(item, data, response) -> dict``
    per answer; rows yielded in input order (answers come in completion order, at most ``window`` apart).
    A failed item is an error row; if the stream itself fails, every item not answered yet is one."""
    import grpc
    from tqdm import tqdm

    rows: dict[int, dict] = {}  # answered, not yet yielded (written by the sending thread for unreadable files)
    data: dict[int, bytes] = {}

    def items():
        for n, item in enumerate(inputs):
            try:
                data[n] = item.read_bytes()
            except OSError as exc:
                rows[n] = {"image": str(item), "error": {"code": "UNREADABLE", "message": str(exc)}}
                continue
            yield str(n), request(data[n])

    bar = tqdm(total=len(inputs), desc=what, unit="image", file=sys.stderr, disable=len(inputs) < 2, leave=False)
    following = 0
    try:
        for response in client.stream(items(), window=window):
            n = int(response.id)
            item = inputs[n]
            if response.WhichOneof("result") == "error":
                rows[n] = {"image": str(item), "error": {"code": response.error.code, "message": response.error.message}}
            else:
                try:
                    rows[n] = {"image": str(item), **finish(item, data[n], getattr(response, response.WhichOneof("result")))}
                except grpc.RpcError as exc:  # a follow-up call (a region) failed: this item only
                    rows[n] = error_row(item, exc)
            del data[n]
            while following in rows:
                yield rows.pop(following)
                following += 1
                bar.update(1)
    except grpc.RpcError as exc:
        for n in range(following, len(inputs)):
            rows.setdefault(n, error_row(inputs[n], exc))
    for n in range(following, len(inputs)):  # the stream ended: what is left, in order
        yield rows.pop(n)
        bar.update(1)
    bar.close()


def resumable(inputs: list[Path], output: Optional[Path], resume: bool, in_flight: int) -> list[Path]:
    """Usage checks of --output/--resume/--in-flight; the inputs still to do (all, unless resuming)."""
    if in_flight < 1:
        raise typer.BadParameter("--in-flight must be >= 1")
    if resume and output is None:
        raise typer.BadParameter("--resume needs --output FILE")
    if output is None or not output.exists() or output.stat().st_size == 0:
        return inputs
    if not resume:
        raise CliError(f"{output} already exists: pass --resume to go on with it, or choose another --output",
                       EXIT_USAGE)
    data = output.read_bytes()
    if not data.endswith(b"\n"):  # a run killed mid-row: drop the partial row (its image is done again)
        with open(output, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
    done = set()
    for line in output.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "error" not in row and "image" in row:
            done.add(row["image"])
    todo = [p for p in inputs if str(p) not in done]
    typer.echo(f"resuming {output}: {len(inputs) - len(todo)} of {len(inputs)} images already answered", err=True)
    return todo


def emit(rows, as_json: bool, table: Callable, output: Optional[Path] = None) -> int:
    """Print results as they come (JSON Lines or tables; with ``output``, JSON Lines appended to that
    file, flushed per row) and errors; returns the number of errors."""
    from rich.console import Console

    console = Console()
    failed = 0
    sink = open(output, "a") if output is not None else None
    try:
        for row in rows:
            if "error" in row:
                failed += 1
                typer.echo(f"error: {row['image']}: {row['error']['code']}: {row['error']['message']}", err=True)
            if sink is not None:
                sink.write(json.dumps(row) + "\n")
                sink.flush()
            elif as_json:
                print(json.dumps(row), flush=True)
            elif "error" not in row:
                table(console, row)
    finally:
        if sink is not None:
            sink.close()
    return failed


def run(conn: tuple, as_json: bool, table: Callable, produce: Callable, output: Optional[Path] = None) -> None:
    """Connect with ``conn = (url, repo, timeout, token, ca_cert)``; print the rows of ``produce(client)``
    as they come (a long video streams its records); exit 1 if any row is an error."""
    with connect(*conn) as client:
        failed = emit(produce(client), as_json, table, output)
    raise typer.Exit(EXIT_FAILED if failed else 0)


def rich_table(title: str, columns: tuple[str, ...], rows: list[tuple], left: tuple[str, ...] = ("class", "concept")):
    from rich.table import Table

    t = Table(title=title)
    for col in columns:
        t.add_column(col, justify="left" if col in left else "right")
    for r in rows:
        t.add_row(*r)
    return t
