"""Several endpoints: least-outstanding spreading and failover when one is down."""

import threading

import pytest
import torch

from remote_vae.remote import protocol
from remote_vae.remote.errors import RemoteVAEError
from remote_vae.remote.sending import EndpointPool, send, split_endpoints
from support.stub_servers import json_error, recorder, refused_url, serve, tensor_answer

OK = tensor_answer(torch.zeros(1, 3, 8, 8, dtype=torch.float16))


def wire() -> protocol.WireRequest:
    return protocol.build_decode_request(
        torch.zeros(1, 4, 1, 1, dtype=torch.float16), output_type="pt", do_scaling=False
    )


def test_split_endpoints_keeps_order_and_drops_repeats():
    text = " http://a:1/sd15,http://b:2/sd15\nhttp://a:1/sd15  http://c:3/x "
    assert split_endpoints(text) == ["http://a:1/sd15", "http://b:2/sd15", "http://c:3/x"]
    assert split_endpoints(["http://a", " ", "http://a"]) == ["http://a"]


def test_pool_picks_the_least_outstanding_then_the_healthy():
    pool = EndpointPool(["a", "b", "c"])
    assert [pool.acquire() for _ in range(4)] == ["a", "b", "c", "a"]
    pool.release("b", failed=False)
    assert pool.acquire() == "b"
    pool.release("c", failed=True)  # c now has 0 outstanding but failed just now
    assert pool.acquire() != "c"
    assert pool.acquire(exclude=["a", "b"]) == "c"  # still used when nothing else is left
    assert pool.acquire(exclude=["a", "b", "c"]) is None


def test_pool_needs_an_endpoint():
    with pytest.raises(ValueError, match="at least one endpoint"):
        EndpointPool([])


def test_failover_to_the_next_endpoint_when_one_is_down():
    with recorder(OK) as up:
        reply = send(f"{refused_url()}/sd15, {up.url}", wire(), retries=1, backoff=0.01)
        assert reply.transfer.endpoint == up.url
        assert len(up.requests) == 1


def test_requests_spread_over_endpoints_by_outstanding_count():
    release = threading.Event()
    seen: list[str] = []

    def hold(name):
        def respond(request, index):
            seen.append(name)
            release.wait(10)
            return OK

        return respond

    with serve(hold("one")) as one, serve(hold("two")) as two:
        endpoints = [one.url, two.url]
        threads = [threading.Thread(target=send, args=(endpoints, wire())) for _ in range(2)]
        for t in threads:
            t.start()
        while len(seen) < 2:
            threading.Event().wait(0.01)
        release.set()
        for t in threads:
            t.join(10)
    assert sorted(seen) == ["one", "two"]  # the second request went where nothing was outstanding


def test_a_client_error_is_not_failed_over():
    with (
        recorder(json_error(400, "latent has 16 channels but preset sd15 expects 4")) as bad,
        recorder(OK) as good,
    ):
        with pytest.raises(RemoteVAEError, match="answered 400: latent has 16 channels") as info:
            send([bad.url, good.url], wire())
    assert info.value.status == 400 and not good.requests


def test_all_endpoints_down_names_each_failure():
    down = [f"{refused_url()}/a", f"{refused_url()}/b"]
    with pytest.raises(
        RemoteVAEError, match="all 2 endpoints failed: .*refused the connection.*refused the connection"
    ):
        send(down, wire(), retries=0)


def test_retryable_status_fails_over():
    with recorder(json_error(503, "503 Service Unavailable")) as busy, recorder(OK) as good:
        reply = send([busy.url, good.url], wire(), retries=2, backoff=0.01)
    assert reply.transfer.endpoint == good.url
    assert len(busy.requests) == 1  # no retries on an endpoint that is not the last resort
