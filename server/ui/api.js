// The console's calls to the gateway: the keys (kept in this browser session only), fetch with
// them, and small DOM and number helpers. Paths are relative to /ui/, so a reverse proxy's prefix
// still works.
const API_KEY = "vramgate.apiKey";
const ADMIN_KEY = "vramgate.adminKey";

export const keys = {
  api: sessionStorage.getItem(API_KEY) || "",
  admin: sessionStorage.getItem(ADMIN_KEY) || "",
};

export function saveKeys(api, admin) {
  keys.api = api.trim();
  keys.admin = admin.trim();
  for (const [name, value] of [[API_KEY, keys.api], [ADMIN_KEY, keys.admin]]) {
    if (value) sessionStorage.setItem(name, value); else sessionStorage.removeItem(name);
  }
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function url(path) {
  return new URL("../" + path, location.href).href;
}

// fetch(path) with the API key (or, with admin: true, the admin key); throws ApiError with the
// error envelope's message on any status but 2xx.
export async function call(path, { method = "GET", body, admin = false, signal } = {}) {
  const headers = {};
  const key = admin ? keys.admin || keys.api : keys.api || keys.admin;
  if (key) headers.Authorization = "Bearer " + key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(url(path), {
    method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!resp.ok) {
    let message = resp.status + " " + resp.statusText;
    try {
      const data = await resp.json();
      message = (data.error && data.error.message) || message;
    } catch (_) { /* not JSON: keep the status line */ }
    throw new ApiError(resp.status, message);
  }
  return resp;
}

export async function json(path, options) {
  return (await call(path, options)).json();
}

// h("div", {class: "x"}, "text", child): an element; text is always set as text, never as HTML.
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function gib(bytes) {
  if (bytes === null || bytes === undefined) return "–";
  return (bytes / 2 ** 30).toFixed(2) + " GiB";
}

export function seconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 90) return s.toFixed(1) + " s";
  if (s < 5400) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(1) + " h";
}
