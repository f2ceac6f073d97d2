"""The nodes' side of "the client always returns": the node's timeout bounds its whole call, and every
bad answer ends in a RemoteVAEError, so the connected VAE's local fallback runs. Stub servers only."""

from __future__ import annotations

import time

import pytest
import torch

from remote_vae.nodes import operations
from remote_vae.nodes.operations import NodeRequest
from support import stub_servers
from support.stub_servers import Canned

pytestmark = pytest.mark.timeout(60)

NODE_TIMEOUT = 5  # the widget's minimum
LOCAL = torch.full((1, 32, 32, 3), 0.5)
PIXELS = stub_servers.tensor_answer(torch.zeros(1, 32, 32, 3, dtype=torch.uint8))  # what 1x4x4x4 decodes to


def decode_with_fallback(url: str, transfer: str) -> tuple[torch.Tensor, float]:
    request = NodeRequest(preset="sd15", endpoint=url, transfer=transfer, timeout=NODE_TIMEOUT)
    started = time.monotonic()
    out = operations.run_node(
        "7",
        lambda: operations.decode_latent(torch.zeros(1, 4, 4, 4), request),
        lambda: LOCAL,
        "decode",
    )
    return out, time.monotonic() - started


@pytest.mark.parametrize(
    ("answer", "transfer"),
    [
        (Canned(200, PIXELS.headers, PIXELS.body, trickle=0.5, chunk=1), "lossless"),  # each recv in time
        (stub_servers.json_error(503, "busy", extra=[("Retry-After", "999999")]), "lossless"),
        (Canned(200, [("shape", "[" * 30_000 + "]" * 30_000), ("dtype", "uint8")], PIXELS.body), "lossless"),
        (Canned(200, [("Content-Type", "image/jpeg")], stub_servers.declared_jpeg(60000, 60000)), "compact"),
    ],
    ids=["trickle", "retry-after", "nested-shape", "jpeg-bomb"],
)
def test_the_node_falls_back_within_its_timeout(answer, transfer):
    with stub_servers.recorder(answer) as stub:
        out, seconds = decode_with_fallback(stub.url + "sd15", transfer)
    assert out is LOCAL
    assert seconds < NODE_TIMEOUT + 1.5
