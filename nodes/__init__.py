"""ComfyUI glue for remote-vae."""
