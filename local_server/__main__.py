"""`python -m remote_vae.local_server`: the same as the `remote-vae-server` command."""

from .cli import main

main()
