"""remote-vae's self-hosted VAE server (needs the `server` extra).

`app.create_app(models)` builds the ASGI app around a `registry.ModelRegistry` (the hosted models),
`jobs.JobRunner` runs decode and encode through a `backends` model, `cli.main` is the `remote-vae-server`
command.
"""
