"""The web extension in a real browser: headless Debian chromium against a real ComfyUI with this pack.

ComfyUI 0.3.75 (tests/support/comfyui_harness.py) runs in its own process; our VAE server hosts a tiny random
sd15 VAE in this one. Chromium is driven over the DevTools protocol (tests/support/cdp.py). Every test
fails on any console error after the page has loaded, except the frontend's own calls to internet
hosts that a machine without network cannot resolve. Screenshots go to test-artifacts/.

Two frontends: the one ComfyUI 0.3.75 pins (LiteGraph canvas nodes), and the newest that works with its
server, NEWEST_FRONTEND (installed under .cache/frontend/ at test time), with Nodes 2.0 (Vue nodes) on.
Tests marked BOTH run on each.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import urllib.request
from collections.abc import Iterator
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest
from PIL import Image

from remote_vae.remote.presets import PRESETS
from remote_vae.testing import random_vae
from support import comfyui_harness
from support.cdp import CHROMIUM, Chromium
from support.comfyui_harness import REPO, HarnessError, frontend_root, running_comfyui
from support.layout import overlapping, saved_box
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
CHECK_BUTTON = "check endpoint"
OUR_WIDGETS = [CHECK_BUTTON, "remote_vae_info"]
APP = "window.comfyAPI.app.app"
# The newest comfyui-frontend-package that works with ComfyUI 0.3.75's server: from 1.38.4 on the frontend
# reads the queue and history from /api/jobs, which 0.3.75 does not have (its queue and history stay empty).
NEWEST_FRONTEND = "1.38.3"
VUE_NODES = "Comfy.VueNodes.Enabled"
BOTH = pytest.mark.parametrize("page", ["pinned", "newest"], indirect=True)
EXAMPLES = sorted((REPO / "example_workflows").glob("*.json"))
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


def prepare(comfy, settings: dict) -> None:
    """Settings for the page to open with, and the picture the img2img example loads."""
    # Skip the first-run template browser: its dialog would cover the canvas. No minimap over the nodes.
    for key, value in {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, **settings}.items():
        request = urllib.request.Request(
            f"{comfy.url}/api/settings/{key}", data=json.dumps(value).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            assert reply.status == 200
    Image.new("RGB", (512, 512), (90, 120, 160)).save(comfy.input_dir / "example.png")


@contextlib.contextmanager
def opened(comfy, profile: Path) -> Iterator[Chromium]:
    with Chromium(profile) as chromium:
        page = chromium.page
        # First, on the same origin: dismiss the pinned frontend's "Try Nodes 2.0" banner over the canvas.
        page.navigate(comfy.url + "/system_stats")
        page.wait_for("location.pathname === '/system_stats' && document.readyState === 'complete'")
        page.evaluate("localStorage.setItem('vueNodesBannerDismissed', 'true'); true")
        page.navigate(comfy.url)
        # Ready once the frontend has opened its default workflow: tests that clear the graph before
        # then would see it replaced under them.
        page.wait_for(f"!!window.comfyAPI?.app?.app?.graph && {APP}.graph.nodes.length > 0", timeout=120)
        chromium.load_errors = page.console_errors()
        yield chromium


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    with running_comfyui(tmp_path_factory.mktemp("comfyui")) as comfy:
        prepare(comfy, {})
        yield comfy


@pytest.fixture(scope="module")
def browser(comfy, tmp_path_factory):
    with opened(comfy, tmp_path_factory.mktemp("chromium") / "profile") as chromium:
        yield chromium


@pytest.fixture(scope="module")
def newest_comfy(tmp_path_factory):
    root = frontend_root(NEWEST_FRONTEND)
    with running_comfyui(tmp_path_factory.mktemp("comfyui-newest"), front_end_root=root) as comfy:
        prepare(comfy, {VUE_NODES: True})
        yield comfy


@pytest.fixture(scope="module")
def newest_browser(newest_comfy, tmp_path_factory):
    with opened(newest_comfy, tmp_path_factory.mktemp("chromium-newest") / "profile") as chromium:
        yield chromium


@pytest.fixture
def page(request):
    """The loaded page (the pinned frontend's; "newest" as a parameter: NEWEST_FRONTEND's with Vue nodes),
    with a clean graph; the test fails on any console error it causes."""
    newest = getattr(request, "param", "pinned") == "newest"
    page = request.getfixturevalue("newest_browser" if newest else "browser").page
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
            node.pos = [90 + 400 * i, 200];  // before adding: Vue nodes take their place when added
            app.graph.add(node);
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


def vue_nodes(page) -> bool:
    """Whether the frontend draws nodes as Vue components (Nodes 2.0) instead of on the canvas."""
    return page.evaluate(f"{APP}.extensionManager.setting?.get?.({json.dumps(VUE_NODES)}) === true")


def node_element(node_id: int | str) -> str:
    """A script expression for the Vue node's element (`node_id` may be a template placeholder)."""
    return f"""document.querySelector(`[data-node-id="{node_id}"]`)"""


def click_element(page, element: str, timeout: float = 10) -> None:
    """A real mouse click on the middle of the element that the script expression `element` finds, once
    it has stopped moving (dropdowns open and scroll with an animation)."""
    where = f"""(() => {{
      const box = ({element})?.getBoundingClientRect();
      return box && box.width > 0 && [box.left + box.width / 2, box.top + box.height / 2];
    }})()"""
    deadline = time.monotonic() + timeout
    last = None
    while (now := page.wait_for(where, timeout=timeout)) != last:
        assert time.monotonic() < deadline, f"{element} keeps moving"
        last = now
        time.sleep(0.15)
    page.click(*now)


def pick(page, node_id: int, name: str, value: str) -> None:
    """Pick a combo widget's value through a Vue node's own dropdown, as a user does."""
    click_element(page, f"""{node_element(node_id)}.querySelector('[role=combobox][aria-label="{name}"]')""")
    option = f"""Array.from(document.querySelectorAll("[role=option]"))
                   .find((option) => option.textContent.trim() === {json.dumps(value)})"""
    page.wait_for(
        f"""(() => {{ const found = {option}; found?.scrollIntoView({{ block: "nearest" }}); return !!found; }})()""",
        timeout=10,
    )
    click_element(page, option)
    page.wait_for('!document.querySelector("[role=listbox]")', timeout=10)  # the dropdown has closed


def click_widget(page, node_id: int, name: str) -> None:
    """A real mouse click (through chromium's input pipeline) on the middle of a canvas widget, or on the
    button of that name on a Vue node."""
    if vue_nodes(page):
        click_element(
            page,
            f"""Array.from({node_element(node_id)}.querySelectorAll("button"))
                  .find((button) => button.textContent.trim() === {json.dumps(name)})""",
        )
        return
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
    path = ARTIFACTS / f"browser-{name}{'-vue' if vue_nodes(page) else ''}.png"
    page.screenshot(path)
    return path


def next_frame(page) -> None:
    page.evaluate(
        "new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(() => done(true))))"
    )


def load_example(page, path: Path) -> dict:
    """Open an example workflow as Browse Templates does (with its saved view); wait until our panels
    have sized their nodes."""
    workflow = json.loads(path.read_text(encoding="utf-8"))
    page.evaluate(f"{APP}.loadGraphData({json.dumps(workflow)}).then(() => true)")
    page.wait_for(
        f"""{APP}.graph.nodes.length === {len(workflow["nodes"])} && {APP}.graph.nodes.every((node) => {{
              const panel = node.widgets?.find((w) => w.name === "remote_vae_info");
              return !panel || panel.element.querySelector('[data-line="preset"]').textContent !== "";
            }})"""
    )
    next_frame(page)
    page.evaluate(f"{APP}.canvas.draw(true, true); true")
    return workflow


def drawn_boxes(page) -> dict[str, tuple[float, ...]]:
    """Each node's box as drawn, by "type #id": its canvas bounding rectangle (title bar included), or with
    Vue nodes its element's rectangle (screen pixels: overlap does not depend on the zoom)."""
    boxes = page.wait_for(
        f"""(() => {{
          const boxes = {{}};
          for (const node of {APP}.graph.nodes) {{
            const name = `${{node.type}} #${{node.id}}`;
            if ({json.dumps(vue_nodes(page))}) {{
              const box = {node_element("${node.id}")}?.getBoundingClientRect();
              if (!box) return null;
              boxes[name] = [box.left, box.top, box.right, box.bottom];
            }} else {{
              const [x, y, width, height] = node.boundingRect;
              boxes[name] = [x, y, x + width, y + height];
            }}
          }}
          return boxes;
        }})()"""
    )
    return {name: tuple(box) for name, box in boxes.items()}


def notes_fit(page) -> bool:
    """Every Note's text is in view: its text area is shown and does not scroll."""
    return page.evaluate(
        f"""{APP}.graph.nodes.filter((node) => node.type === "Note").every((node) => {{
              const area = {node_element("${node.id}")}?.querySelector("textarea")
                ?? node.widgets[0].inputEl ?? node.widgets[0].element;
              return area.clientHeight > 0 && area.scrollHeight <= area.clientHeight + 1;
            }})"""
    )


@contextlib.contextmanager
def full_hd(page) -> Iterator[None]:
    """A 1920×1080 page: an example fits at a zoom where the canvas still draws node text."""
    page.call(
        "Emulation.setDeviceMetricsOverride", width=1920, height=1080, deviceScaleFactor=1, mobile=False
    )
    try:
        page.wait_for(f"{APP}.canvas.canvas.clientWidth > 1800")
        yield
    finally:
        page.call("Emulation.clearDeviceMetricsOverride")


def fit_view(page) -> None:
    """Zoom so the whole graph is in view (right of the sidebar, below the top bar), for screenshots."""
    page.evaluate(
        f"""(() => {{
          const app = {APP};
          const [left, top, right, bottom] = app.graph.nodes.reduce(([l, t, r, b], node) => {{
            const [x, y, width, height] = node.boundingRect;
            return [Math.min(l, x), Math.min(t, y), Math.max(r, x + width), Math.max(b, y + height)];
          }}, [Infinity, Infinity, -Infinity, -Infinity]);
          const [x0, y0] = [90, 150];  // clear of the sidebar, the tabs and the workflow menu
          const canvas = app.canvas.canvas;
          const scale = Math.min(
            (canvas.clientWidth - x0 - 30) / (right - left), (canvas.clientHeight - y0 - 30) / (bottom - top));
          app.canvas.ds.scale = scale;
          app.canvas.ds.offset = [x0 / scale - left, y0 / scale - top];
          app.canvas.setDirty(true, true);
          // An earlier test's toasts would cover the nodes.
          document.querySelectorAll(".p-toast-close-button").forEach((button) => button.click());
          return true;
        }})()"""
    )
    page.wait_for('!document.querySelector(".p-toast-message")', timeout=10)  # faded out
    next_frame(page)


def preset_line(name: str) -> str:
    """What the node shows for a preset, from the same table the route serves."""
    p = PRESETS[name]
    parts = [f"{p.latent_channels} latent channels", f"{p.spatial_compression}× spatial"]
    if p.is_video:
        parts.append(f"{p.temporal_compression}× temporal")
    if p.uses_mean_std:
        parts.append("per-channel mean/std")
    else:
        parts.append(
            f"scale {p.scaling_factor:g}" + ("" if p.shift_factor is None else f", shift {p.shift_factor:g}")
        )
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
    where = (
        f"{server} at {endpoint}" if server and endpoint and server != endpoint else server or endpoint or "?"
    )
    requests = event["requests"]
    form = f" ({event['form']})" if event.get("form") else ""
    return (
        f"last run: sent {size(event['bytes_sent'])}, received {size(event['bytes_received'])}{form} "
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


@BOTH
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
    assert saved == ["sd15", "", "auto", 300]
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


@BOTH
def test_check_button_shows_the_servers_models(page, vae_server):
    decode, encode = add_nodes(page, "RemoteVAEDecode", "RemoteVAEEncode")
    endpoint = vae_server + "/sd15"  # a model path: the check finds the server's /v1/models above it
    set_widget(page, decode, "endpoint", endpoint, as_user=False)
    click_widget(page, decode, "check endpoint")
    assert wait_line(page, decode, "check", ("✓", "✗")) == f"✓ {endpoint} is up · models: sd15 (loaded)"
    wait_panel_fits(page, decode)
    assert (
        page.evaluate(
            f"""getComputedStyle({APP}.graph.getNodeById({decode}).widgets.find((w) => w.name === "remote_vae_info")
             .element.querySelector('[data-line="check"]')).color"""
        )
        == "rgb(102, 204, 102)"
    )

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


@BOTH
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
          [empty, decode, preview].forEach((node, i) => {{ node.pos = [90 + 380 * i, 200]; app.graph.add(node); }});
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


@BOTH
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
    # The status is said first, then the list is fetched again: wait for both (waiting on the status alone
    # read the list before its refresh on a loaded machine).
    assert page.wait_for(
        """(document.querySelector("#token-settings .remote-vae-token-status")?.textContent || "")
         .startsWith("✓ token removed") && document.querySelector("#token-settings .remote-vae-token-list")
         .textContent === "No server has a token." """
    )
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
    assert values[:4] == ["auto", "", "auto", 300]


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


# --------------------------------------------------------------------------- layout and Nodes 2.0


@BOTH
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_workflows_show_every_node_apart(page, path):
    workflow = load_example(page, path)
    drawn = drawn_boxes(page)
    assert overlapping(drawn) == [], f"{path.stem}: these nodes overlap as drawn"
    if not vue_nodes(page):  # drawn at the saved sizes: the offline layout test sees what the canvas shows
        saved = {f"{node['type']} #{node['id']}": saved_box(node) for node in workflow["nodes"]}
        assert {name: [round(v) for v in box] for name, box in drawn.items()} == {
            name: [round(v) for v in box] for name, box in saved.items()
        }
    assert notes_fit(page), f"{path.stem}: the Note's text scrolls"
    with full_hd(page):
        fit_view(page)
        screenshot(page, f"example-{path.stem}")


@pytest.mark.parametrize("page", ["newest"], indirect=True)
def test_nodes_2_0_shows_our_widgets_and_panel_and_follows_a_picked_preset(page):
    assert page.evaluate("window.__COMFYUI_FRONTEND_VERSION__") == NEWEST_FRONTEND and vue_nodes(page)
    ids = add_nodes(page, *NODE_TYPES)
    for node_id in ids:
        labels = sorted(INPUT_WIDGETS | {CHECK_BUTTON})
        page.wait_for(  # the node's element shows every widget's label and our button
            f"""(() => {{
              const shown = ({node_element(node_id)}?.innerText ?? "").split("\\n");
              return {json.dumps(labels)}.every((label) => shown.includes(label));
            }})()""",
            timeout=10,
        )
        assert page.evaluate(
            f"""(() => {{
              const panel = {APP}.graph.getNodeById({node_id}).widgets
                .find((w) => w.name === "remote_vae_info").element;
              const box = panel.getBoundingClientRect();
              return {node_element(node_id)}.contains(panel) && box.width > 100 && box.height > 20;
            }})()"""
        )
    decode, encode, video = ids
    for node_id, preset in ((decode, "sd15"), (encode, "flux"), (video, "wan21")):
        pick(page, node_id, "preset", preset)
        assert wait_line(page, node_id, "preset", (PRESETS[preset].label,)) == preset_line(preset)
    screenshot(page, "nodes-2-0")


def test_a_frontend_that_cannot_be_installed_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(comfyui_harness, "FRONTEND_CACHE", tmp_path)
    with pytest.raises(HarnessError, match=r"could not install comfyui-frontend-package==not a version"):
        frontend_root("not a version")
    assert not (tmp_path / "not a version").exists()
