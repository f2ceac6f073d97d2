"""The web extension in a real browser: headless Debian chromium against a real ComfyUI with this pack.

ComfyUI 0.3.75 (tests/support/comfyui_harness.py) runs in its own process; our VAE server hosts a tiny random
sd15 VAE in this one. Chromium is driven over the DevTools protocol (tests/support/cdp.py). Every test
fails on any console error after the page has loaded, except the frontend's own calls to internet
hosts that a machine without network cannot resolve. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterator
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

from remote_vae.remote.presets import PRESETS
from remote_vae.testing import random_vae
from support.cdp import CHROMIUM, Chromium
from support.comfyui_harness import REPO, running_comfyui
from support.net import free_port
from support.serving import hosting

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium) for the browser test",
    ),
]

ARTIFACTS = REPO / "test-artifacts"
EXTENSION = "remote_vae.ui"
NODE_TYPES = ("RemoteVAEDecode", "RemoteVAEEncode", "RemoteVideoDecode")
INPUT_WIDGETS = {"preset", "endpoint", "transfer", "timeout"}
OUR_WIDGETS = ["check endpoint", "remote_vae_info"]
APP = "window.comfyAPI.app.app"
# The frontend asks api.comfy.org for release notes and node metadata; without network (or under the
# harness's content security policy) that fails. Our extension only ever calls ComfyUI itself.
OFFLINE = re.compile(
    r"(net::ERR_(NAME_NOT_RESOLVED|INTERNET_DISCONNECTED|NETWORK_CHANGED) |^Connecting to ')https://(?!127\.0\.0\.1)"
)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def vae_server() -> Iterator[str]:
    model = random_vae("sd15", 1)
    with hosting({"sd15": ("sd15", model)}) as (url, _host):
        yield url


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    with running_comfyui(tmp_path_factory.mktemp("comfyui")) as comfy:
        # Skip the first-run template browser: its dialog would cover the canvas.
        request = urllib.request.Request(
            comfy.url + "/api/settings/Comfy.TutorialCompleted", data=b"true", method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            assert reply.status == 200
        yield comfy


@pytest.fixture(scope="module")
def browser(comfy, tmp_path_factory):
    with Chromium(tmp_path_factory.mktemp("chromium") / "profile") as chromium:
        page = chromium.page
        page.navigate(comfy.url)
        # Ready once the frontend has opened its default workflow: tests that clear the graph before
        # then would see it replaced under them.
        page.wait_for(f"!!window.comfyAPI?.app?.app?.graph && {APP}.graph.nodes.length > 0", timeout=120)
        chromium.load_errors = page.console_errors()
        yield chromium


@pytest.fixture
def page(browser):
    """The loaded page, with a clean graph; the test fails on any console error it causes."""
    page = browser.page
    page.events.clear()
    page.evaluate(f"{APP}.graph.clear(); {APP}.canvas.ds.offset = [0, 0]; {APP}.canvas.ds.scale = 1; true")
    yield page
    errors = [e for e in page.console_errors() if not OFFLINE.search(e)]
    assert errors == []


# --------------------------------------------------------------------------- page helpers


def add_nodes(page, *types: str) -> list[int]:
    return page.evaluate(
        f"""(() => {{
          const app = {APP};
          return {json.dumps(types)}.map((type, i) => {{
            const node = LiteGraph.createNode(type);
            app.graph.add(node);
            node.pos = [90 + 400 * i, 200];
            return node.id;
          }});
        }})()"""
    )


def set_widget(page, node_id: int, name: str, value, *, as_user: bool = True) -> None:
    """Set a widget's value; `as_user` also calls its callback and redraws, as picking in the UI does."""
    page.evaluate(
        f"""(() => {{
          const widget = {APP}.graph.getNodeById({node_id}).widgets.find((w) => w.name === {json.dumps(name)});
          widget.value = {json.dumps(value)};
          if ({json.dumps(as_user)}) {{
            widget.callback?.(widget.value);
            {APP}.canvas.setDirty(true, true);
          }}
          return true;
        }})()"""
    )


def panel_line(page, node_id: int, line: str) -> str:
    return page.evaluate(
        f"""{APP}.graph.getNodeById({node_id}).widgets.find((w) => w.name === "remote_vae_info")
             .element.querySelector('[data-line="{line}"]').textContent"""
    )


def wait_panel_fits(page, node_id: int) -> None:
    """Wait until the node is tall enough to show its whole panel (nothing scrolled out of view)."""
    page.wait_for(
        f"""(() => {{
          {APP}.canvas.draw(true, true);
          const element = {APP}.graph.getNodeById({node_id}).widgets.find((w) => w.name === "remote_vae_info").element;
          return element.clientHeight > 0 && element.scrollHeight <= element.clientHeight + 1;
        }})()""",
        timeout=10,
    )


def wait_line(page, node_id: int, line: str, prefixes: tuple[str, ...], timeout: float = 60) -> str:
    """The panel line once it starts with one of `prefixes`; fails with the text it had instead."""
    deadline = time.monotonic() + timeout
    while not (text := panel_line(page, node_id, line)).startswith(prefixes):
        assert time.monotonic() < deadline, f"node {node_id} {line} line is still {text!r}, not {prefixes}"
        time.sleep(0.2)
    return text


def click_widget(page, node_id: int, name: str) -> None:
    """A real mouse click (through chromium's input pipeline) on the middle of a canvas widget."""
    page.evaluate(f"{APP}.canvas.draw(true, true); true")  # lay the widgets out
    x, y = page.evaluate(
        f"""(() => {{
          const app = {APP};
          const node = app.graph.getNodeById({node_id});
          const widget = node.widgets.find((w) => w.name === {json.dumps(name)});
          const height = widget.computedHeight ?? LiteGraph.NODE_WIDGET_HEIGHT;
          const [x, y] = app.canvas.ds.convertOffsetToCanvas(
            [node.pos[0] + node.size[0] / 2, node.pos[1] + widget.y + height / 2]);
          const box = app.canvas.canvas.getBoundingClientRect();
          return [box.left + x, box.top + y];
        }})()"""
    )
    page.click(x, y)


def screenshot(page, name: str) -> Path:
    path = ARTIFACTS / f"browser-{name}.png"
    page.screenshot(path)
    return path


def preset_line(name: str) -> str:
    """What the node shows for a preset, from the same table the route serves."""
    p = PRESETS[name]
    parts = [f"{p.latent_channels} latent channels", f"{p.spatial_compression}× spatial"]
    if p.is_video:
        parts.append(f"{p.temporal_compression}× temporal")
    if p.uses_mean_std:
        parts.append("per-channel mean/std")
    else:
        parts.append(f"scale {p.scaling_factor:g}" + ("" if p.shift_factor is None else f", shift {p.shift_factor:g}"))
    return f"{p.label}: " + " · ".join(parts)


def fixed(value: float, digits: int) -> str:
    """JavaScript's `value.toFixed(digits)` for value >= 0: the exact binary value, ties rounded up."""
    return str(Decimal(value).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def size(count: int) -> str:
    """The node's byte counts: B, else KiB/MiB/GiB with one decimal."""
    units = ["B", "KiB", "MiB", "GiB"]
    value, unit = float(count), 0
    while value >= 1024 and unit < len(units) - 1:
        value, unit = value / 1024, unit + 1
    return f"{fixed(value, 1)} {units[unit]}" if unit else f"{count} B"


def transfer_line(event: dict) -> str:
    """What the node shows for a `remote_vae.transfer` event."""
    server, endpoint = event["server"], event["endpoint"]
    where = f"{server} at {endpoint}" if server and endpoint and server != endpoint else server or endpoint or "?"
    requests = event["requests"]
    return (
        f"last run: sent {size(event['bytes_sent'])}, received {size(event['bytes_received'])} "
        f"in {fixed(event['seconds'], 2)} s, {requests} request{'' if requests == 1 else 's'} · {where}"
    )


# --------------------------------------------------------------------------- tests


def test_extension_loads_once_without_errors_of_its_own(browser, comfy):
    page = browser.page
    with urllib.request.urlopen(comfy.url + "/extensions", timeout=30) as reply:
        scripts = json.load(reply)
    assert any(s.endswith("/remote_vae.js") for s in scripts)
    assert page.evaluate(f"{APP}.extensions.filter((e) => e.name === {json.dumps(EXTENSION)}).length") == 1
    ours = [e for e in browser.load_errors if re.search(r"remote[_-]vae", e, re.I)]
    assert ours == []


def test_a_second_copy_of_the_script_does_not_register_twice(page):
    # ComfyUI lists the web folder under both the folder name and the pyproject name when they differ.
    page.evaluate('import("/extensions/remote-vae/remote_vae.js?second-copy").then(() => true)')
    assert page.evaluate(f"{APP}.extensions.filter((e) => e.name === {json.dumps(EXTENSION)}).length") == 1


def test_nodes_render_their_widgets_and_preset_facts(page):
    ids = add_nodes(page, *NODE_TYPES)
    page.evaluate(f"{APP}.canvas.draw(true, true); true")
    for node_id in ids:
        names = page.evaluate(f"{APP}.graph.getNodeById({node_id}).widgets.map((w) => w.name)")
        assert set(names[:-2]) == INPUT_WIDGETS and names[-2:] == OUR_WIDGETS
        assert panel_line(page, node_id, "preset") == "auto: the preset is picked from the latent's shape"
        assert page.evaluate(
            f"""(() => {{
              const widget = {APP}.graph.getNodeById({node_id}).widgets.find((w) => w.name === "remote_vae_info");
              const box = widget.element.getBoundingClientRect();
              return box.width > 100 && box.height > 20 && getComputedStyle(widget.element).display !== "none";
            }})()"""
        )

    decode, encode, video = ids
    for node_id, preset in ((decode, "sd15"), (encode, "flux"), (video, "hunyuan_video")):
        set_widget(page, node_id, "preset", preset)
        assert wait_line(page, node_id, "preset", (PRESETS[preset].label,)) == preset_line(preset)
    set_widget(page, video, "preset", "wan21")
    assert wait_line(page, video, "preset", (PRESETS["wan21"].label,)) == preset_line("wan21")

    # Our widgets stay out of saved workflows and of the prompt sent to the server.
    saved, prompt = page.evaluate(
        f"""(async () => {{
          const app = {APP};
          const node = app.graph.serialize().nodes.find((n) => n.id === {decode});
          return [node.widgets_values, (await app.graphToPrompt()).output[{decode}].inputs];
        }})()"""
    )
    assert saved == ["sd15", "", "lossless", 300]
    assert set(prompt) == INPUT_WIDGETS

    # Opening a saved workflow sets widget values without callbacks; the preset line still follows.
    page.evaluate(
        f"""(async () => {{
          const app = {APP};
          const workflow = app.graph.serialize();
          app.graph.clear();
          await app.loadGraphData(workflow);
          app.canvas.ds.offset = [0, 0];
          app.canvas.ds.scale = 1;
          return true;
        }})()"""
    )
    for node_id, preset in ((decode, "sd15"), (encode, "flux"), (video, "wan21")):
        assert wait_line(page, node_id, "preset", (PRESETS[preset].label,)) == preset_line(preset)
    screenshot(page, "nodes")


def test_check_button_shows_the_servers_models(page, vae_server):
    decode, encode = add_nodes(page, "RemoteVAEDecode", "RemoteVAEEncode")
    endpoint = vae_server + "/sd15"  # a model path: the check finds the server's /v1/models above it
    set_widget(page, decode, "endpoint", endpoint, as_user=False)
    click_widget(page, decode, "check endpoint")
    assert wait_line(page, decode, "check", ("✓", "✗")) == f"✓ {endpoint} is up · models: sd15 (loaded)"
    wait_panel_fits(page, decode)
    assert page.evaluate(
        f"""getComputedStyle({APP}.graph.getNodeById({decode}).widgets.find((w) => w.name === "remote_vae_info")
             .element.querySelector('[data-line="check"]')).color"""
    ) == "rgb(102, 204, 102)"

    port = free_port()
    set_widget(page, encode, "endpoint", f"http://127.0.0.1:{port}/", as_user=False)
    click_widget(page, encode, "check endpoint")
    assert wait_line(page, encode, "check", ("✓", "✗")).startswith(f"✗ cannot connect to 127.0.0.1:{port}: ")

    # No endpoint and no preset to take a Hugging Face endpoint from: said without a request.
    set_widget(page, encode, "endpoint", "", as_user=False)
    click_widget(page, encode, "check endpoint")
    assert wait_line(page, encode, "check", ("✗ enter",)) == (
        "✗ enter an endpoint, or pick a preset that has a Hugging Face endpoint"
    )
    screenshot(page, "check")


def test_a_run_shows_the_transfer_on_the_node(page, vae_server):
    endpoint = vae_server + "/sd15"
    # Also record the event as the page receives it over ComfyUI's websocket, to compare with the node.
    page.evaluate(
        """window.__remoteVaeTransfers = [];
           window.comfyAPI.api.api.addEventListener("remote_vae.transfer",
             ({detail}) => window.__remoteVaeTransfers.push(detail)); true"""
    )
    decode = page.evaluate(
        f"""(() => {{
          const app = {APP};
          const empty = LiteGraph.createNode("EmptyLatentImage");
          const decode = LiteGraph.createNode("RemoteVAEDecode");
          const preview = LiteGraph.createNode("PreviewImage");
          [empty, decode, preview].forEach((node, i) => {{ app.graph.add(node); node.pos = [90 + 380 * i, 200]; }});
          const set = (node, name, value) => {{ node.widgets.find((w) => w.name === name).value = value; }};
          set(empty, "width", 64); set(empty, "height", 64); set(empty, "batch_size", 1);
          set(decode, "preset", "sd15"); set(decode, "endpoint", {json.dumps(endpoint)});
          empty.connect(0, decode, 0);
          decode.connect(0, preview, 0);
          return decode.id;
        }})()"""
    )
    page.evaluate(f"{APP}.queuePrompt(0, 1).then(() => true)")
    line = wait_line(page, decode, "transfer", ("last run:",), timeout=300)
    (event,) = page.evaluate("window.__remoteVaeTransfers")
    assert event["node"] == str(decode) and event["requests"] == 1
    assert event["bytes_sent"] > 0 and event["bytes_received"] >= 64 * 64 * 3
    assert line == transfer_line(event)
    # The preset was set without a callback (as a loaded workflow does); the panel shows it anyway.
    assert panel_line(page, decode, "preset") == preset_line("sd15")
    wait_panel_fits(page, decode)
    screenshot(page, "run")


def test_warnings_become_toasts(page):
    # Dispatched in the page, as the websocket client dispatches server events (the run above covers
    # the websocket itself): a remote failure with a local fallback needs a real local VAE checkpoint.
    (decode,) = add_nodes(page, "RemoteVAEDecode")
    message = "Remote VAE decode failed, used the connected VAE locally instead: test"
    page.evaluate(
        f"""window.comfyAPI.api.api.dispatchEvent(new CustomEvent("remote_vae.warning",
             {{detail: {{node: "{decode}", message: {json.dumps(message)}}}}})); true"""
    )
    toast = page.wait_for(
        """Array.from(document.querySelectorAll(".p-toast-message-warn")).map((e) => e.textContent)
             .find((text) => text.includes("Remote VAE decode failed"))"""
    )
    assert toast == "Remote VAE" + message
    screenshot(page, "warning")

    # A frontend without toasts: the warning goes on the node instead.
    page.evaluate(
        f"""window.__savedExtensionManager = {APP}.extensionManager;
            {APP}.extensionManager = {{}};
            try {{
              window.comfyAPI.api.api.dispatchEvent(new CustomEvent("remote_vae.warning",
                {{detail: {{node: "{decode}", message: "on the node"}}}}));
            }} finally {{
              {APP}.extensionManager = window.__savedExtensionManager;
            }}
            true"""
    )
    assert wait_line(page, decode, "warning", ("⚠",)) == "⚠ on the node"


# --------------------------------------------------------------------------- server tokens


def test_the_settings_entry_binds_a_token_and_never_shows_it(page, comfy, vae_server):
    secret = "s3cret-from-the-browser"
    page.evaluate(
        f"""(() => {{
          const extension = {APP}.extensions.find((e) => e.name === {json.dumps(EXTENSION)});
          const entry = extension.settings.find((s) => s.id === "RemoteVAE.ServerTokens");
          const box = entry.type(entry.name, () => {{}}, entry.defaultValue);
          box.id = "token-settings";
          document.body.append(box);
          box.querySelector("input[name=endpoint]").value = {json.dumps(vae_server + "/sd15")};
          box.querySelector("input[name=token]").value = {json.dumps(secret)};
          box.querySelector("button").click();
          return true;
        }})()"""
    )
    status = page.wait_for(
        """document.querySelector("#token-settings .remote-vae-token-status")?.textContent || "" """
    )
    assert status == f"✓ token saved for {vae_server}"
    listed = page.wait_for(
        """document.querySelector("#token-settings .remote-vae-token-origin")?.textContent || "" """
    )
    assert listed.startswith(vae_server)
    assert page.evaluate('document.querySelector("#token-settings input[name=token]").value') == ""
    assert secret not in page.evaluate("document.body.innerHTML")
    with urllib.request.urlopen(comfy.url + "/api/remote_vae/tokens", timeout=30) as reply:
        text = reply.read().decode()
    assert json.loads(text)["servers"] == [{"origin": vae_server, "allow_http": False}] and secret not in text
    page.evaluate(  # the Remove button unbinds it
        """document.querySelector("#token-settings .remote-vae-token-origin button").click(); true"""
    )
    assert page.wait_for(
        """(document.querySelector("#token-settings .remote-vae-token-status")?.textContent || "")
             .startsWith("✓ token removed") && document.querySelector("#token-settings .remote-vae-token-list")
             .textContent"""
    ) == "No server has a token."
    page.evaluate('document.querySelector("#token-settings").remove(); true')


def test_an_old_workflow_with_a_token_variable_loads_and_warns_once(page):
    (decode,) = add_nodes(page, "RemoteVAEDecode")
    count = """Array.from(document.querySelectorAll(".p-toast-message-warn"))
                 .filter((e) => e.textContent.includes("names a token variable")).length"""
    for _ in range(2):
        page.evaluate(
            f"""(async () => {{
              const app = {APP};
              const workflow = app.graph.serialize();
              workflow.nodes.find((n) => n.id === {decode}).widgets_values.push("REMOTE_VAE_TOKEN");
              app.graph.clear();
              await app.loadGraphData(workflow);
              return true;
            }})()"""
        )
        assert page.wait_for(count) == 1
    values = page.evaluate(f"{APP}.graph.getNodeById({decode}).widgets.map((w) => w.value)")
    assert values[:4] == ["auto", "", "lossless", 300]



def test_a_pack_that_takes_our_node_id_is_named_once(page):
    """A definition of one of our ids without our inputs came from a pack that loaded after this one."""
    page.evaluate(
        f"""(async () => {{
          const app = {APP};
          const extension = app.extensions.find((e) => e.name === {json.dumps(EXTENSION)});
          const theirs = {{
            name: "RemoteVAEDecode", python_module: "custom_nodes.other-pack",
            input: {{ required: {{ samples: ["LATENT"] }} }}, output: ["IMAGE"],
          }};
          for (let i = 0; i < 2; i++) await extension.beforeRegisterNodeDef(class {{}}, theirs, app);
          return true;
        }})()"""
    )
    toasts = """Array.from(document.querySelectorAll(".p-toast-message-warn"))
                  .filter((e) => e.textContent.includes("now belongs to custom_nodes.other-pack")).length"""
    assert page.wait_for(toasts) == 1
    time.sleep(0.5)
    assert page.evaluate(toasts) == 1
