// Preload with NODE_OPTIONS="--require tests/clients/no-egress.cjs" (the Continue CLI test uses it).
// Blocks any outbound fetch/http/https/net connection whose host is not loopback,
// so a client's update checks / telemetry fail instantly instead of doing DNS.
// Set NO_EGRESS_LOG=/path to append blocked URLs there.
'use strict';
const net = require('net');
const fs = require('fs');
const LOOP = new Set(['127.0.0.1', 'localhost', '::1', '[::1]', '0.0.0.0']);
function ok(host) { if (!host) return true; host = String(host).toLowerCase(); return LOOP.has(host) || host.startsWith('127.'); }
function note(what) { const f = process.env.NO_EGRESS_LOG; if (f) try { fs.appendFileSync(f, `${process.pid} blocked ${what}\n`); } catch (_) {} }
if (typeof globalThis.fetch === 'function') {
  const orig = globalThis.fetch;
  globalThis.fetch = function (input, init) {
    let u; try { u = new URL(typeof input === 'string' ? input : (input && (input.url || input.href)) || String(input)); } catch (_) { return orig.apply(this, arguments); }
    if (!ok(u.hostname)) { note(u.href); return Promise.reject(new TypeError('fetch blocked by no-egress: ' + u.host)); }
    return orig.apply(this, arguments);
  };
}
const origConnect = net.Socket.prototype.connect;
net.Socket.prototype.connect = function (...args) {
  let opts = args[0];
  let host = null;
  if (Array.isArray(opts)) opts = opts[0];
  if (opts && typeof opts === 'object') host = opts.path ? null : (opts.host || 'localhost');
  else if (typeof opts === 'number' || (typeof opts === 'string' && /^\d+$/.test(opts))) host = typeof args[1] === 'string' ? args[1] : 'localhost';
  if (host && !ok(host)) { note('socket ' + host); const s = this; process.nextTick(() => s.destroy(new Error('connect blocked by no-egress: ' + host))); return this; }
  return origConnect.apply(this, args);
};
