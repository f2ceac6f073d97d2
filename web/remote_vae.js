// Remote VAE nodes in the ComfyUI editor: a "check endpoint" button, the chosen preset's latent
// layout, the last run's transfer, and the server's warnings; and a settings entry that binds bearer
// tokens to servers (write-only: a token goes to ComfyUI's server once and is never shown again).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION = "remote_vae.ui";
const PANEL = "remote_vae_info";
const CHECK_BUTTON = "check endpoint";
const STATE = Symbol("remote_vae");
// Our nodes are known by their inputs, so the extension follows renamed or prefixed node ids.
const SIGNATURE = ["preset", "endpoint", "transfer", "timeout"];
const TOKENS_SETTING = "RemoteVAE.ServerTokens";
const OUR_NODE_IDS = ["RemoteVAEDecode", "RemoteVAEEncode", "RemoteVideoDecode"];
const LINES = ["preset", "check", "transfer", "warning"];
const MIN_PANEL_HEIGHT = 40;
const PANEL_MARGIN = 4;
const PANEL_PADDING = 2;
const TONES = { info: "var(--input-text, #ddd)", ok: "#6c6", error: "#e66", muted: "#999" };

let presetTable = null; // Promise of {name: Preset.describe()}

function loadPresets() {
  presetTable ??= api
    .fetchApi("/remote_vae/presets")
    .then((response) => {
      if (!response.ok) throw new Error(`GET /remote_vae/presets answered ${response.status}`);
      return response.json();
    })
    .then((data) => Object.fromEntries(data.presets.map((preset) => [preset.name, preset])))
    .catch((error) => {
      presetTable = null; // try again next time
      throw error;
    });
  return presetTable;
}

function isRemoteVaeNode(nodeData) {
  const inputs = { ...nodeData?.input?.required, ...nodeData?.input?.optional };
  return SIGNATURE.every((name) => name in inputs);
}

function widgetValue(node, name) {
  return node.widgets?.find((widget) => widget.name === name)?.value;
}

// ----------------------------------------------------------------------------- the info panel

function makePanel() {
  const element = document.createElement("div");
  element.className = "remote-vae-info";
  Object.assign(element.style, {
    font: "11px sans-serif",
    lineHeight: "1.35",
    padding: `${PANEL_PADDING}px 6px`,
    boxSizing: "border-box",
    overflowY: "auto",
    overflowWrap: "anywhere",
    whiteSpace: "pre-wrap",
  });
  // The lines sit in a box of their natural height, which is what the panel measures.
  const content = document.createElement("div");
  element.append(content);
  const lines = {};
  for (const name of LINES) {
    const line = document.createElement("div");
    line.dataset.line = name;
    content.append(line);
    lines[name] = line;
  }
  return { element, content, lines };
}

// The panel is as tall as its text (at least MIN_PANEL_HEIGHT); the node grows to show all of it.
// ComfyUI sizes a DOM widget's element to its layout height less the margin on both sides.
function panelHeight(panel) {
  return Math.max(MIN_PANEL_HEIGHT, panel.content.offsetHeight + 2 * (PANEL_PADDING + PANEL_MARGIN));
}

function setLine(node, name, text, tone = "info") {
  const line = node[STATE]?.lines[name];
  if (!line) return;
  line.textContent = text;
  line.style.color = TONES[tone];
  requestAnimationFrame(() => {
    const [, height] = node.computeSize();
    if (node.size[1] < height) node.setSize([node.size[0], height]);
    node.setDirtyCanvas?.(true, true);
  });
}

// ----------------------------------------------------------------------------- what the lines say

function describePreset(name, facts) {
  if (!facts) {
    return name === "auto" ? "auto: the preset is picked from the latent's shape" : `unknown preset ${name}`;
  }
  const parts = [
    `${facts.latent_channels} latent channels`,
    `${facts.spatial_compression}× spatial`,
  ];
  if (facts.dims === 3) parts.push(`${facts.temporal_compression}× temporal`);
  if (facts.per_channel_mean_std) parts.push("per-channel mean/std");
  else parts.push(`scale ${facts.scaling_factor}` + (facts.shift_factor == null ? "" : `, shift ${facts.shift_factor}`));
  return `${facts.label}: ${parts.join(" · ")}`;
}

function modelLabel(model) {
  if (typeof model !== "object" || model === null) return String(model);
  const name = model.name ?? model.id ?? model.model ?? "?";
  let state = model.state ?? model.status ?? model.load_state;
  if (state === undefined && typeof model.loaded === "boolean") state = model.loaded ? "loaded" : "not loaded";
  if (state && model.error) state = `${state}: ${model.error}`;
  return state ? `${name} (${state})` : String(name);
}

function describeCheck(result) {
  if (!result.ok) return `✗ ${result.error || `answered ${result.status}`}`;
  const models = result.models ?? [];
  const hosted = models.length
    ? `models: ${models.map(modelLabel).join(", ")}`
    : "no model list (a Hugging Face endpoint answers health only)";
  const ready = result.ready === false ? ` · not ready: ${(result.not_ready ?? []).join(", ")}` : "";
  return `✓ ${result.endpoint} is up · ${hosted}${ready}`;
}

function formatBytes(count) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let value = Number(count) || 0;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${unit ? value.toFixed(1) : value} ${units[unit]}`;
}

function describeTransfer(event) {
  const requests = Number(event.requests) || 0;
  const where = event.server && event.endpoint && event.server !== event.endpoint
    ? `${event.server} at ${event.endpoint}`
    : event.server || event.endpoint || "?";
  const form = event.form ? ` (${event.form})` : ""; // how the pixels came: "raw uint8", "jxl 0.29x raw"
  return (
    `last run: sent ${formatBytes(event.bytes_sent)}, received ${formatBytes(event.bytes_received)}${form} ` +
    `in ${Number(event.seconds || 0).toFixed(2)} s, ${requests} request${requests === 1 ? "" : "s"} · ${where}`
  );
}

// ----------------------------------------------------------------------------- actions

async function showPreset(node) {
  const name = widgetValue(node, "preset");
  node[STATE].shownPreset = name;
  try {
    const table = await loadPresets();
    if (node[STATE].shownPreset !== name) return; // changed again while the table loaded
    setLine(node, "preset", describePreset(name, table[name]), "muted");
  } catch (error) {
    setLine(node, "preset", `preset table unavailable: ${error.message}`, "error");
  }
}

async function endpointFor(node) {
  const typed = String(widgetValue(node, "endpoint") ?? "").trim();
  if (typed) return typed;
  // An empty endpoint means the preset's Hugging Face endpoint.
  const table = await loadPresets().catch(() => ({}));
  const facts = table[widgetValue(node, "preset")];
  return (node[STATE].encodes ? facts?.hf_encode_endpoint : facts?.hf_decode_endpoint) ?? "";
}

async function checkEndpoint(node) {
  const endpoint = await endpointFor(node);
  if (!endpoint) {
    setLine(node, "check", "✗ enter an endpoint, or pick a preset that has a Hugging Face endpoint", "error");
    return;
  }
  setLine(node, "check", `checking ${endpoint} …`, "muted");
  const query = new URLSearchParams({ endpoint });
  try {
    const response = await api.fetchApi(`/remote_vae/health?${query}`);
    if (!response.ok) throw new Error(`GET /remote_vae/health answered ${response.status}`);
    const result = await response.json();
    setLine(node, "check", describeCheck(result), result.ok && result.ready !== false ? "ok" : "error");
  } catch (error) {
    setLine(node, "check", `✗ check failed: ${error.message}`, "error");
  }
}

// Execution ids of nodes inside subgraphs are paths like "12:5"; walk them down.
function findNode(id) {
  let graph = app.graph;
  let node = null;
  for (const part of String(id ?? "").split(":")) {
    node = graph?.getNodeById(part) ?? graph?.getNodeById(Number(part)) ?? null;
    graph = node?.subgraph;
  }
  return node;
}

function setUpNode(node, encodes) {
  const panel = makePanel();
  node[STATE] = { ...panel, encodes };
  // Appended after the input widgets and left out of saved workflows and prompts, so widget
  // positions in widgets_values stay what the Python node expects.
  const button = node.addWidget("button", CHECK_BUTTON, null, () => checkEndpoint(node), { serialize: false });
  button.serialize = false;
  const info = node.addDOMWidget(PANEL, "remote_vae_info", panel.element, {
    serialize: false,
    hideOnZoom: false,
    margin: PANEL_MARGIN,
    getValue: () => panel.element.textContent,
    setValue: () => {},
    getMinHeight: () => panelHeight(panel),
  });
  info.serialize = false;
  const preset = node.widgets?.find((widget) => widget.name === "preset");
  if (preset) watchValue(preset, () => showPreset(node));
  showPreset(node);
}

// Calls onChange whenever the widget's value changes, however it is set (picked, loaded with a workflow,
// set by another extension): Nodes 2.0 (Vue nodes) draws no canvas foreground to compare on.
function watchValue(widget, onChange) {
  let owner = widget;
  while (owner && !Object.hasOwn(owner, "value")) owner = Object.getPrototypeOf(owner);
  const descriptor = owner ? Object.getOwnPropertyDescriptor(owner, "value") : undefined;
  if ((owner === widget && !descriptor.configurable) || (descriptor?.get && !descriptor.set)) return;
  let stored = widget.value;
  let seen = stored; // compared with what was last seen here: newer frontends update their store first
  const read = descriptor?.get ?? (() => stored);
  const write = descriptor?.set ?? ((value) => { stored = value; });
  Object.defineProperty(widget, "value", {
    configurable: true,
    enumerable: true,
    get() {
      return read.call(this);
    },
    set(value) {
      write.call(this, value);
      const now = read.call(this);
      if (now === seen) return;
      seen = now;
      onChange();
    },
  });
}

// Workflows saved before tokens were bound to servers carry one more widget value (a variable name).
// It is ignored; say so once per session.
let warnedLegacyToken = false;

function warnIfLegacyToken(node, info) {
  const serialized = (node.widgets ?? []).filter((w) => w.serialize !== false && w.options?.serialize !== false);
  const extra = (info?.widgets_values ?? []).slice(serialized.length);
  if (warnedLegacyToken || !extra.some((value) => typeof value === "string" && value.trim())) return;
  warnedLegacyToken = true;
  notify(
    "This workflow names a token variable (token_env), which is now ignored: bind a server's token to its " +
      "address in Settings > Remote VAE instead. Workflows never carry secrets.",
    node,
  );
}

// ----------------------------------------------------------------------------- server tokens (settings)

async function tokenRequest(method, body) {
  const response = await api.fetchApi("/remote_vae/tokens", {
    method,
    headers: body ? { "Content-Type": "application/json" } : undefined,
    body: body ? JSON.stringify(body) : undefined,
  });
  const data = await response.json().catch(() => ({ error: `answered ${response.status}` }));
  if (!response.ok || data.error) throw new Error(data.error ?? `answered ${response.status}`);
  return data;
}

function element(tag, properties = {}, ...children) {
  const node = Object.assign(document.createElement(tag), properties);
  node.append(...children);
  return node;
}

// The settings entry: bound origins (never their tokens), and a form that binds or replaces one.
function renderTokenSettings() {
  const list = element("div", { className: "remote-vae-token-list" });
  const status = element("div", { className: "remote-vae-token-status" });
  const endpoint = element("input", { type: "text", placeholder: "https://gpu-box:8190", name: "endpoint" });
  const token = element("input", { type: "password", placeholder: "token", name: "token", autocomplete: "off" });
  const allowHttp = element("input", { type: "checkbox", name: "allow_http" });
  const save = element("button", { type: "button", textContent: "Save token" });
  const say = (text, tone = "info") => Object.assign(status, { textContent: text }).style.setProperty("color", TONES[tone]);

  async function refresh() {
    try {
      const data = await tokenRequest("GET");
      list.replaceChildren(
        ...data.servers.map((server) =>
          element(
            "div",
            { className: "remote-vae-token-origin" },
            `${server.origin}${server.allow_http ? " (plain http allowed)" : ""} `,
            element("button", {
              type: "button",
              textContent: "Remove",
              onclick: () => bind({ endpoint: server.origin, token: null }),
            }),
          ),
        ),
        ...data.environment.map((origin) => element("div", { textContent: `${origin} (from REMOTE_VAE_TOKENS)` })),
      );
      if (!data.servers.length && !data.environment.length) list.textContent = "No server has a token.";
    } catch (error) {
      say(`✗ ${error.message}`, "error");
    }
  }

  async function bind(body) {
    try {
      const answer = await tokenRequest("POST", body);
      say(answer.bound ? `✓ token saved for ${answer.origin}` : `✓ token removed for ${answer.origin}`, "ok");
    } catch (error) {
      say(`✗ ${error.message}`, "error");
    }
    await refresh();
  }

  save.onclick = async () => {
    await bind({ endpoint: endpoint.value.trim(), token: token.value, allow_http: allowHttp.checked });
    token.value = ""; // write-only: the field never keeps or shows a saved token
  };
  refresh();
  return element(
    "div",
    { className: "remote-vae-token-settings" },
    list,
    element("div", {}, endpoint, " ", token),
    element("label", {}, allowHttp, " allow over plain http (only for a server on a network you trust)"),
    element("div", {}, save),
    status,
  );
}

function notify(message, node = null) {
  const toast = app.extensionManager?.toast;
  if (typeof toast?.add === "function") {
    toast.add({ severity: "warn", summary: "Remote VAE", detail: message, life: 10000 });
    return;
  }
  if (node?.[STATE]) setLine(node, "warning", `⚠ ${message}`, "error");
}

// ----------------------------------------------------------------------------- node id conflicts

// Another pack that registers one of our node ids after us wins in ComfyUI, silently: its definition
// then lacks our inputs. (A pack we override is found by the Python side: GET /remote_vae/conflicts.)
const told = new Set();

function tellOnce(message) {
  if (told.has(message)) return;
  told.add(message);
  notify(message);
  console.warn(message);
}

function checkNodeId(nodeData) {
  if (!OUR_NODE_IDS.includes(nodeData?.name) || isRemoteVaeNode(nodeData)) return;
  tellOnce(
    `Remote VAE: the node id ${nodeData.name} now belongs to ${nodeData.python_module ?? "another pack"}, ` +
      "which registered it after remote-vae; workflows using it run that pack's node. " +
      "Uninstall or disable one of the two packs.",
  );
}

async function reportOverriddenPacks() {
  try {
    const response = await api.fetchApi("/remote_vae/conflicts");
    if (response.ok) for (const message of (await response.json()).messages ?? []) tellOnce(message);
  } catch {
    // an older server without the route: nothing to report
  }
}

function onTransfer({ detail }) {
  const node = findNode(detail?.node);
  if (node?.[STATE]) setLine(node, "transfer", describeTransfer(detail), "info");
}

function onWarning({ detail }) {
  notify(String(detail?.message ?? ""), findNode(detail?.node));
}

// ComfyUI may list this folder twice (under the pack's folder name and its pyproject name).
if (!app.extensions?.some((extension) => extension.name === EXTENSION)) {
  app.registerExtension({
    name: EXTENSION,

    settings: [
      {
        id: TOKENS_SETTING,
        category: ["Remote VAE", "Servers", "Tokens"],
        name: "Server tokens (bound to each server's address; never saved in workflows)",
        type: renderTokenSettings, // a custom entry: the value stays empty, tokens go to ComfyUI's server
        defaultValue: "",
      },
    ],

    async setup() {
      api.addEventListener("remote_vae.transfer", onTransfer);
      api.addEventListener("remote_vae.warning", onWarning);
      reportOverriddenPacks();
    },

    async beforeRegisterNodeDef(nodeType, nodeData) {
      checkNodeId(nodeData);
      if (!isRemoteVaeNode(nodeData)) return;
      const encodes = (nodeData.output ?? []).includes("LATENT");
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function (...args) {
        const result = onNodeCreated?.apply(this, args);
        setUpNode(this, encodes);
        return result;
      };
      const onConfigure = nodeType.prototype.onConfigure;
      nodeType.prototype.onConfigure = function (info, ...rest) {
        const result = onConfigure?.apply(this, [info, ...rest]);
        warnIfLegacyToken(this, info);
        return result;
      };
      // A frontend that replaces the widget's value property after setUpNode: compare on draw as well.
      const onDrawForeground = nodeType.prototype.onDrawForeground;
      nodeType.prototype.onDrawForeground = function (...args) {
        const result = onDrawForeground?.apply(this, args);
        if (this[STATE] && widgetValue(this, "preset") !== this[STATE].shownPreset) showPreset(this);
        return result;
      };
    },
  });
}
