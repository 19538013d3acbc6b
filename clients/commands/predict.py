"""`salfctl predict`: top-k classes per image, streamed on one ``Stream`` call (offline scoring)."""
from __future__ import annotations

from salf.cli import DEFAULT_REPO, DEFAULT_TIMEOUT, CaCert, Json, Repo, Timeout, Token, TopK, Url

from .inputs import Images, expand_inputs
from .rows import InFlight, Output, Resume, message_dict, resumable, rich_table, run, stream_rows


def predict(images: Images, top_k: TopK = 0, url: Url = None, model_repository: Repo = DEFAULT_REPO,
            timeout: Timeout = DEFAULT_TIMEOUT, token: Token = None, ca_cert: CaCert = None,
            as_json: Json = False, in_flight: InFlight = 8, output: Output = None, resume: Resume = False) -> None:
    """Top-k classes with probabilities for each image (JSON: PredictResponse). Folders are walked:
    offline scoring streams one JSON Lines row per image (--output FILE, --resume after a stop)."""
    images = resumable(expand_inputs(images), output, resume, in_flight)

    def table(console, row):
        console.print(rich_table(row["image"], ("rank", "class", "probability", "logit"),
                                 [(str(n), c["name"], f"{c['probability']:.4f}", f"{c['logit']:+.3f}")
                                  for n, c in enumerate(row["classes"], 1)]))

    run((url, model_repository, timeout, token, ca_cert), as_json, table, lambda client: stream_rows(
        client, images, "predict", lambda data: client.pb.PredictRequest(image=data, top_k=top_k),
        lambda item, data, r: message_dict(r), in_flight), output)
