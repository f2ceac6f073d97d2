"""The Ray Serve deployment: two CPU replicas on a local Ray instance serve our client correctly."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from diffusers import AutoencoderKL

from remote_vae.remote import protocol
from remote_vae.remote.client import send
from remote_vae.testing import random_vae
from support.net import free_port

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> tuple[AutoencoderKL, str]:
    vae = random_vae("sd15")
    folder = tmp_path_factory.mktemp("ray") / "sd15-tiny"
    vae.save_pretrained(folder)
    return vae, str(folder)


@pytest.fixture(scope="module")
def ray_endpoint(tiny_vae):
    from remote_vae.local_server.ray_app import build

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {
            "models": f"sd15={tiny_vae[1]}",
            "num_replicas": "2",
            "cpus_per_replica": "0.5",
            "device": "cpu",
        }
        serve.run(build(args), route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_both_replicas_serve_correct_results(ray_endpoint, tiny_vae):
    vae = tiny_vae[0]
    latents = [torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(16)]

    def decode(z: torch.Tensor):
        wire = protocol.build_decode_request(
            z, output_type="pt", do_scaling=False, extensions=protocol.Extensions(output_dtype="float32")
        )
        reply = send(f"{ray_endpoint}/sd15", wire, timeout=(10, 120), retries=2)
        return reply.headers["x-remote-vae-replica"], reply.tensor()

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(decode, latents))
    assert len({replica for replica, _ in results}) == 2, "requests were not spread over both replicas"
    with torch.inference_mode():
        for z, (_, out) in zip(latents, results, strict=True):
            torch.testing.assert_close(out, vae.decode(z).sample, rtol=1e-4, atol=1e-4)


def test_deployment_options_from_serve_run_arguments():
    from remote_vae.local_server.ray_app import deployment_options

    fixed = deployment_options({"num_replicas": "2", "gpus_per_replica": "1", "cpus_per_replica": "4"})
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_gpus": 1.0, "num_cpus": 4.0}
    auto = deployment_options({"min_replicas": "1", "max_replicas": "3", "target_ongoing_requests": "4"})
    assert auto["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 4.0,
    }
