"""`reference=comfyui`: ComfyUI's behaviour where its VAE code differs from diffusers'."""

import torch

from remote_vae.testing import random_vae
from support.one_model import hosting, pt, z
from support.serving import error_of, tensor_of


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
