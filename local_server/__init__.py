"""remote-vae's self-hosted VAE server (needs the `server` extra).

`app.create_app(host)` builds the ASGI app, `engine.ModelHost` holds the models and their worker
threads, `cli.main` is the `remote-vae-server` command.
"""
