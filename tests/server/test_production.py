"""The server in production: auth, limits, queue bounds, deadlines, metrics, request ids, tiling,
out-of-memory and NaN fallbacks, batching, and a bounded load test."""

import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from remote_vae.local_server.app import Settings, create_app
from remote_vae.local_server.limits import Limits
from remote_vae.local_server.registry import ModelRegistry, Tuning
from remote_vae.remote import protocol
from remote_vae.remote.client import RemoteVAEError, send
from remote_vae.remote.presets import PRESETS
from remote_vae.testing import random_vae
from support.hooked import Wrapped
from support.serving import error_of, post_decode, post_encode, serve, tensor_of


def z(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def hosting(model, settings=None, options=None, dtype="float32", preset="sd15"):
    host = ModelRegistry(options=options)
    host.add(preset, PRESETS[preset], model=model, device="cpu", dtype=dtype)
    try:
        with serve(create_app(host, settings)) as url:
            yield url
    finally:
        host.close()


def pt(url, latent, extra_params=(), model="sd15", **kw):
    params = [("output_dtype", "float32"), *extra_params]
    return post_decode(f"{url}/{model}", latent, output_type="pt", do_scaling=False, extra_params=params, **kw)


@pytest.fixture(scope="module")
def vae():
    return random_vae("sd15", 7, size="micro", init="default")


def reference(vae, latent):
    with torch.inference_mode():
        return vae.decode(latent).sample


# --------------------------------------------------------------------------- auth


def test_bearer_token_is_required_except_for_health(vae, caplog):
    with hosting(vae, Settings(token="s3cret-token")) as url, caplog.at_level(logging.DEBUG):
        answer = pt(url, z(1, 4, 8, 8))
        assert "missing or wrong bearer token" in error_of(answer, 401)
        assert answer.headers["www-authenticate"] == "Bearer"
        error_of(pt(url, z(1, 4, 8, 8), headers={"Authorization": "Bearer nope"}), 401)
        assert requests.get(url + "/health", timeout=10).status_code == 200
        assert requests.get(url + "/metrics", timeout=10).status_code == 401
        assert requests.get(url + "/v1/models", timeout=10).status_code == 401
        wire = protocol.build_decode_request(z(1, 4, 8, 8), output_type="pt", do_scaling=False)
        reply = send(url + "/sd15", wire, token="s3cret-token")
        assert reply.tensor().shape == (1, 3, 64, 64)
    assert "s3cret-token" not in caplog.text


# --------------------------------------------------------------------------- limits, queue, deadline


def test_limits_are_named_in_413_answers(vae):
    limits = Limits(max_pixels=64 * 64, max_request_bytes=4096, max_frames=9)
    with hosting(vae, Settings(limits=limits)) as url:
        assert "exceeds the server's limit of 4096 pixels" in error_of(pt(url, z(1, 4, 16, 16)), 413)
        big = z(1, 4, 32, 32)  # 16 KiB of float32
        assert "exceeds the server's limit of 4096 bytes" in error_of(pt(url, big), 413)
        encode = post_encode(url + "/sd15/encode", torch.zeros(1, 128, 128, 3, dtype=torch.uint8))
        assert "limit" in error_of(encode, 413)
        assert tensor_of(pt(url, z(1, 4, 8, 8))).shape == (1, 3, 64, 64)


def test_full_queue_answers_503_with_retry_after_at_once_and_a_retry_resolves_it(vae):
    started, release = threading.Event(), threading.Event()

    def block(_z):
        started.set()
        assert release.wait(30)

    model = Wrapped(vae, before=block)
    settings = Settings(limits=Limits(max_in_flight=1))
    with hosting(model, settings) as url, ThreadPoolExecutor(2) as pool:
        first = pool.submit(pt, url, z(1, 4, 8, 8))
        assert started.wait(30)
        busy = pt(url, z(1, 4, 8, 8))
        assert "the server is busy" in error_of(busy, 503)
        assert busy.headers["retry-after"] == "1"
        wire = protocol.build_decode_request(z(1, 4, 8, 8), output_type="pt", do_scaling=False)
        retried = pool.submit(send, url + "/sd15", wire, retries=5, backoff=0.05)
        threading.Timer(0.3, release.set).start()
        assert first.result(30).status_code == 200
        assert retried.result(30).transfer.attempts >= 2
        metrics = requests.get(url + "/metrics", timeout=10).text
        assert 'remote_vae_rejected_total{reason="queue_full"}' in metrics


def test_requests_past_the_deadline_get_504(vae):
    release = threading.Event()
    model = Wrapped(vae, before=lambda _z: release.wait(30))
    with hosting(model, Settings(limits=Limits(request_timeout=0.5))) as url:
        try:
            assert "longer than the server's limit of 0.5 s" in error_of(pt(url, z(1, 4, 8, 8)), 504)
        finally:
            release.set()


# --------------------------------------------------------------------------- metrics and request ids


def test_metrics_and_request_ids(vae, caplog):
    with hosting(vae) as url, caplog.at_level(logging.INFO, logger="remote_vae.server"):
        ok = pt(url, z(1, 4, 8, 8), headers={"X-Request-ID": "abc-123"})
        assert ok.headers["x-request-id"] == "abc-123"
        generated = pt(url, z(1, 4, 8, 8), headers={"X-Request-ID": "bad id with spaces"}).headers["x-request-id"]
        assert generated != "bad id with spaces" and len(generated) == 16
        error_of(post_decode(url + "/sd15", z(1, 16, 8, 8), output_type="pt", do_scaling=False), 400)
        text = requests.get(url + "/metrics", timeout=10).text
    assert 'remote_vae_requests_total{model="sd15",op="decode",outcome="ok",status="200"} 2' in text
    assert 'remote_vae_requests_total{model="sd15",op="decode",outcome="client_error",status="400"} 1' in text
    for name in ("queue", "compute", "render", "request"):
        assert f'remote_vae_{name}_seconds_count{{model="sd15",op="decode"}}' in text
    assert 'remote_vae_bytes_in_total{model="sd15"} ' in text and "remote_vae_queue_depth 0" in text
    line = next(r.getMessage() for r in caplog.records if "abc-123" in r.getMessage())
    assert "sd15 decode shape=[1, 4, 8, 8] status=200" in line and "compute=" in line


# --------------------------------------------------------------------------- tiling and fallbacks


def test_tiling_on_request_and_by_memory_budget(vae):
    latent = z(1, 4, 48, 48, seed=3)
    whole = reference(vae, latent)
    # A 48x48 latent needs ~1.3 GB by the estimate; 600 MiB gives tiles of about 32 latent pixels.
    with hosting(vae, options=Tuning(memory_budget=600 << 20)) as url:
        auto = tensor_of(pt(url, latent))
        forced_off = tensor_of(pt(url, latent, extra_params=[("tile", "off")]))
        text = requests.get(url + "/metrics", timeout=10).text
    assert (auto - whole).abs().mean() < 0.04 and not torch.equal(auto, whole)
    torch.testing.assert_close(forced_off, whole, rtol=1e-4, atol=1e-4)
    assert 'remote_vae_tiled_total{model="sd15"} 1' in text
    with hosting(vae) as url:
        on = tensor_of(pt(url, latent, extra_params=[("tile", "on"), ("tile_size", "24")]))
    assert (on - whole).abs().mean() < 0.05


def test_tiled_encode(vae):
    pixels = (torch.rand(1, 256, 256, 3, generator=torch.Generator().manual_seed(5)) * 255).to(torch.uint8)
    with hosting(vae) as url:
        whole = tensor_of(post_encode(url + "/sd15/encode", pixels))
        tiled = tensor_of(post_encode(url + "/sd15/encode", pixels, extra_params=[("tile", "on"), ("tile_size", "16")]))
    assert tiled.shape == whole.shape == (1, 4, 32, 32)
    assert (tiled - whole).abs().mean() < 0.04


def test_out_of_memory_falls_back_to_smaller_plans(vae):
    def oom_when_big(latent):
        if latent.shape[0] > 1 or latent.shape[-1] > 24:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    model = Wrapped(vae, before=oom_when_big)
    latent = z(2, 4, 32, 32, seed=4)
    with hosting(model) as url:
        out = tensor_of(pt(url, latent))
        text = requests.get(url + "/metrics", timeout=10).text
    assert out.shape == (2, 3, 256, 256)
    assert (out - reference(vae, latent)).abs().mean() < 0.1  # 16-pixel tiles: seams of a random model
    assert model.batches[:2] == [2, 1] and 'remote_vae_fallback_total{model="sd15",kind="oom"}' in text


def test_out_of_memory_everywhere_is_a_507(vae):
    def always(_z):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with hosting(Wrapped(vae, before=always)) as url:
        assert "does not fit in device memory even tiled" in error_of(pt(url, z(1, 4, 16, 16)), 507)


def test_nan_in_half_precision_is_retried_in_float32(vae):
    class NaNInBF16(Wrapped):
        def decode(self, latent):
            out = self.inner.decode(latent)
            if latent.dtype == torch.bfloat16:
                out.sample.fill_(float("nan"))
            return out

    latent = z(1, 4, 8, 8)
    with hosting(NaNInBF16(random_vae("sd15", 7, size="micro", init="default")), dtype="bfloat16") as url:
        out = tensor_of(pt(url, latent))
        text = requests.get(url + "/metrics", timeout=10).text
    assert torch.isfinite(out).all()
    rounded = random_vae("sd15", 7, size="micro", init="default").to(torch.bfloat16).float()  # the retry runs the bf16-rounded weights in float32
    torch.testing.assert_close(out, reference(rounded, latent), rtol=1e-4, atol=1e-4)
    assert 'remote_vae_fallback_total{model="sd15",kind="nan"} 1' in text


# --------------------------------------------------------------------------- batching and load


def test_batching_groups_concurrent_same_shape_requests(vae):
    model = Wrapped(vae)
    latents = [z(1, 4, 8, 8, seed=i) for i in range(3)]
    options = Tuning(batching=True, batch_window=0.5)
    with hosting(model, options=options) as url, ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda t: tensor_of(pt(url, t)), latents))
    assert model.batches == [3]
    for latent, out in zip(latents, outs, strict=True):
        torch.testing.assert_close(out, reference(vae, latent), rtol=1e-4, atol=1e-4)


def test_bounded_load_every_request_answered_correctly(vae):
    """8 clients x 4 requests against a queue of 2: 503s happen and client retries resolve them."""
    latents = [z(1, 4, 8, 8, seed=i) for i in range(32)]
    settings = Settings(limits=Limits(max_in_flight=2))

    def decode(latent):
        wire = protocol.build_decode_request(latent, output_type="pt", do_scaling=False, extensions=protocol.Extensions(output_dtype="float32"))
        return send(url + "/sd15", wire, retries=30, backoff=0.05, timeout=(5, 60))

    with hosting(vae, settings) as url, ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(decode, latents))
        text = requests.get(url + "/metrics", timeout=10).text
    for latent, reply in zip(latents, replies, strict=True):
        torch.testing.assert_close(reply.tensor(), reference(vae, latent), rtol=1e-4, atol=1e-4)
    assert 'remote_vae_requests_total{model="sd15",op="decode",outcome="ok",status="200"} 32' in text


def test_a_client_error_from_the_queue_is_clear():
    with pytest.raises(RemoteVAEError, match="refused the connection"):
        send("http://127.0.0.1:9/sd15", protocol.build_decode_request(z(1, 4, 1, 1), output_type="pt"), retries=0)


# --------------------------------------------------------------------------- ComfyUI parity


def test_reference_comfyui_unmasks_hunyuan_video_attention_only_when_asked():
    from remote_vae.local_server.parity import behaving_like

    model = random_vae("hunyuan_video", 4, size="micro", init="default")
    latent = z(1, 16, 3, 4, 4, seed=9)
    with hosting(model, preset="hunyuan_video") as url:
        default = tensor_of(pt(url, latent, model="hunyuan_video"))
        comfy = tensor_of(pt(url, latent, [("reference", "comfyui")], model="hunyuan_video"))
        refused = pt(url, latent, [("reference", "blender")], model="hunyuan_video")
        assert "reference='blender' is not one of diffusers, comfyui" in error_of(refused, 400)
    with torch.inference_mode():
        masked = model.decode(latent).sample
        with behaving_like(model, "comfyui"):
            unmasked = model.decode(latent).sample
        again = model.decode(latent).sample  # the model is itself again afterwards
    torch.testing.assert_close(default, masked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(comfy, unmasked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, masked, rtol=0, atol=0)
    assert (comfy - default).abs().max() > 1e-3  # multi-frame decodes really differ


def test_reference_changes_nothing_for_models_without_a_difference(vae):
    latent = z(1, 4, 8, 8)
    with hosting(vae) as url:
        plain = tensor_of(pt(url, latent))
        comfy = tensor_of(pt(url, latent, extra_params=[("reference", "comfyui")]))
    torch.testing.assert_close(plain, comfy, rtol=0, atol=0)


def test_video_tiling_uses_the_models_own_tiles():
    model = random_vae("wan21", 5, size="micro", init="default")
    latent = z(1, 16, 2, 24, 24, seed=6)  # 192 pixels a side: several 128-pixel tiles
    with hosting(model, preset="wan21") as url:
        whole = tensor_of(pt(url, latent, model="wan21"))
        tiled = tensor_of(pt(url, latent, [("tile", "on"), ("tile_size", "16")], model="wan21"))
        metrics = requests.get(url + "/metrics", timeout=10).text
    assert tiled.shape == whole.shape == (1, 3, 5, 192, 192)
    assert not torch.equal(tiled, whole) and (tiled - whole).abs().mean() < 0.05
    assert 'remote_vae_tiled_total{model="wan21"} 1' in metrics
    assert not model.use_tiling  # switched off again after the tiled request


def test_cors_only_when_configured(vae):
    origin = {"Origin": "https://app.example"}
    with hosting(vae) as url:
        assert "access-control-allow-origin" not in requests.get(url + "/health", headers=origin, timeout=10).headers
    with hosting(vae, Settings(cors_origins=["https://app.example"])) as url:
        answer = requests.get(url + "/health", headers=origin, timeout=10)
    assert answer.headers["access-control-allow-origin"] == "https://app.example"


def test_refused_tokens_are_counted_and_logged_on_job_routes_only(vae, caplog):
    with hosting(vae, Settings(token="s3cret-token")) as url, caplog.at_level(logging.INFO, logger="remote_vae.server"):
        refused = pt(url, z(1, 4, 8, 8), headers={"X-Request-ID": "no-token-1"})
        assert error_of(refused, 401) and refused.headers["x-request-id"] == "no-token-1"
        assert "x-request-id" not in requests.get(url + "/metrics", timeout=10).headers
        text = requests.get(url + "/metrics", headers={"Authorization": "Bearer s3cret-token"}, timeout=10).text
    assert 'remote_vae_rejected_total{reason="auth"} 1' in text
    assert 'remote_vae_requests_total{model="-",op="-",outcome="client_error",status="401"} 1' in text
    assert any("no-token-1 - - shape=[] status=401" in r.getMessage() for r in caplog.records)
