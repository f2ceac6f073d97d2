"""Websocket events for the web extension: transfer statistics and warnings.

Both are fire-and-forget: outside ComfyUI (no PromptServer) they only log.
"""

from __future__ import annotations

from collections.abc import Sequence

from .comfy_runtime import log, prompt_server

TRANSFER_EVENT = "remote_vae.transfer"
WARNING_EVENT = "remote_vae.warning"


def _send(event: str, data: dict) -> bool:
    server = prompt_server()
    if server is None:
        return False
    server.send_sync(event, data)
    return True


def transfer_summary(node_id: str | None, transfers: Sequence, seconds: float | None = None) -> dict:
    """One event payload for all requests of a run; `seconds` is the wall time (requests overlap)."""
    servers = sorted({t.server for t in transfers if t.server})
    endpoints = sorted({t.endpoint for t in transfers})
    return {
        "node": node_id,
        "bytes_sent": sum(t.bytes_sent for t in transfers),
        "bytes_received": sum(t.bytes_received for t in transfers),
        "seconds": round(seconds if seconds is not None else sum(t.seconds for t in transfers), 4),
        "server": ", ".join(servers) or None,
        "endpoint": ", ".join(endpoints) or None,
        "requests": len(transfers),
    } | _form(transfers)


def _form(transfers: Sequence) -> dict:
    """{"form": "jxl 0.29x raw"} / {"form": "raw uint8"} for pixel answers (the status line names it)."""
    forms = []
    for codec in sorted({t.codec or "" for t in transfers if getattr(t, "pixel_bytes", None)}):
        same = [t for t in transfers if t.pixel_bytes and (t.codec or "") == codec]
        ratio = sum(t.bytes_received for t in same) / sum(t.pixel_bytes for t in same)
        forms.append(f"{codec} {ratio:.2f}x raw" if codec else "raw uint8")
    return {"form": " + ".join(forms)} if forms else {}


def report_transfer(node_id: str | None, transfers: Sequence, seconds: float | None = None) -> bool:
    """Send `remote_vae.transfer` for a finished run; False when there is no ComfyUI to send to."""
    summary = transfer_summary(node_id, transfers, seconds)
    log.debug("remote VAE transfer: %s", summary)
    return _send(TRANSFER_EVENT, summary)


def report_warning(node_id: str | None, message: str) -> bool:
    """Log a warning and show it in the browser as a toast (`remote_vae.warning`)."""
    log.warning("%s", message)
    return _send(WARNING_EVENT, {"node": node_id, "message": message})
