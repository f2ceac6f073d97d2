"""Model backends: what differs between VAE implementations (`base.Backend`); `diffusers` is the default."""
