"""remote-vae's self-hosted VAE server (needs the `server` extra)."""
