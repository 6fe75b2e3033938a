// fault_http.mjs — a small HTTPS (or HTTP) server with fault switches, for
// the http and OAuth specs. Run from spec/peers:
//
//   node fault_http.mjs --cert server.crt --key server.key [--ca ca.crt --request-cert | --require-cert]
//                       [--plain | --h2] [--port 0] [--host 127.0.0.1]
//
// It prints "fault_http listening on port N" once it accepts connections.
// --request-cert asks for a client certificate and lets the route decide;
// --require-cert makes TLS itself refuse clients without a trusted one.
// --h2 serves HTTP/2 over TLS (ALPN "h2", HTTP/1.1 still accepted), as
// Microsoft's and Google's endpoints do.
//
// Built-in routes (any method):
//   /echo                  200 JSON {method, path, query, headers, body, client_cert, http_version}
//   /status/NNN            status NNN; ?retry_after=S adds Retry-After, ?body=... sets the body
//   /redirect?to=URL       302 (or ?status=301/303/307/308) with Location: URL
//   /big?mb=N[&length=1]   streams N MiB of "x" (Content-Length only with length=1)
//   /hang                  accepts the request and never answers
//   /slow?ms=N             answers 200 "slow" after N ms
//   /close                 closes the connection without a response
//   /clientcert            200 JSON {subject} when a trusted client certificate was
//                          presented (needs --ca and --request-cert), else 401
//
// Scenarios (for retry / error tests). A response spec is a JSON object:
//   {"status":429, "headers":{"Retry-After":"2"}, "body":"text"}   or "json": {...}
//   {"delay_ms":500, ...}   answer after a delay
//   {"hang":true}           never answer          {"close":true}  drop the connection
//   {"big_mb":50}           stream N MiB
// Give one per request with the query parameter ?scenario=<url-encoded JSON>, or
// queue several for a path:
//   POST   /_scenario  {"path":"/token", "responses":[spec, spec, ...], "repeat_last":false}
//          each request to /token takes the next spec; when the queue is empty the
//          path falls back to its built-in route (404 JSON if none), or keeps
//          answering the last spec when repeat_last is true.
//   DELETE /_scenario  forget every queue
//   GET    /_requests  JSON list of the requests received so far
//                      [{method, path, query, headers, body, http_version}], newest last (max 500)
//   DELETE /_requests  forget them
import https from 'node:https';
import http from 'node:http';
import http2 from 'node:http2';
import fs from 'node:fs';

const args = { port: '0', host: '127.0.0.1' };
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i];
  if (a === '--plain' || a === '--h2' || a === '--request-cert' || a === '--require-cert') args[a.slice(2)] = true;
  else if (a.startsWith('--')) args[a.slice(2)] = process.argv[++i];
}

const queues = new Map();
let requests = [];

function readBody(req) {
  return new Promise((resolve) => {
    const chunks = [];
    let size = 0;
    req.on('data', (c) => { size += c.length; if (size <= 4 * 1024 * 1024) chunks.push(c); });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', () => resolve(''));
  });
}

function streamBig(res, mb, withLength, status = 200, headers = {}) {
  const total = mb * 1024 * 1024;
  const chunk = Buffer.alloc(64 * 1024, 'x');
  const h = { 'Content-Type': 'application/octet-stream', ...headers };
  if (withLength) h['Content-Length'] = String(total);
  res.writeHead(status, h);
  let sent = 0;
  const pump = () => {
    while (sent < total) {
      const n = Math.min(chunk.length, total - sent);
      sent += n;
      if (!res.write(n === chunk.length ? chunk : chunk.subarray(0, n))) { res.once('drain', pump); return; }
    }
    res.end();
  };
  res.on('close', () => { if (sent < total) console.log(`big: client went away after ${sent} bytes`); });
  pump();
}

function send(req, res, spec) {
  const go = () => {
    if (spec.hang) return;
    if (spec.close) { req.socket.destroy(); return; }
    const headers = { ...(spec.headers || {}) };
    if (spec.big_mb) return streamBig(res, spec.big_mb, spec.length, spec.status || 200, headers);
    let body = spec.body ?? '';
    if (spec.json !== undefined) {
      body = JSON.stringify(spec.json);
      if (!Object.keys(headers).some((k) => k.toLowerCase() === 'content-type')) headers['Content-Type'] = 'application/json';
    }
    res.writeHead(spec.status || 200, headers);
    res.end(body);
  };
  if (spec.delay_ms) setTimeout(go, spec.delay_ms); else go();
}

function clientCert(req) {
  const c = req.socket.getPeerCertificate ? req.socket.getPeerCertificate() : null;
  if (!c || !c.subject) return null;
  return { subject: c.subject.CN, authorized: req.socket.authorized };
}

async function handle(req, res) {
  const url = new URL(req.url, 'http://x');
  const path = url.pathname;
  const query = Object.fromEntries(url.searchParams);
  const body = await readBody(req);
  const json = (status, obj, headers = {}) => send(req, res, { status, json: obj, headers });

  if (path === '/_scenario') {
    if (req.method === 'DELETE') { queues.clear(); return json(200, { ok: true }); }
    let s;
    try { s = JSON.parse(body); } catch { return json(400, { error: 'scenario is not JSON' }); }
    if (!s.path || !Array.isArray(s.responses)) return json(400, { error: 'need path and responses[]' });
    queues.set(s.path, { responses: s.responses.slice(), repeat_last: !!s.repeat_last });
    return json(200, { ok: true, queued: s.responses.length });
  }
  if (path === '/_requests') {
    if (req.method === 'DELETE') { requests = []; return json(200, { ok: true }); }
    return json(200, requests);
  }

  requests.push({ method: req.method, path, query, headers: req.headers, body: body.slice(0, 65536),
                  http_version: req.httpVersion });
  if (requests.length > 500) requests.shift();

  if (query.scenario) {
    let spec;
    try { spec = JSON.parse(query.scenario); } catch { return json(400, { error: 'scenario is not JSON' }); }
    return send(req, res, spec);
  }
  const q = queues.get(path);
  if (q && q.responses.length > 0) {
    const spec = (q.repeat_last && q.responses.length === 1) ? q.responses[0] : q.responses.shift();
    return send(req, res, spec);
  }

  if (path === '/echo') {
    return json(200, { method: req.method, path, query, headers: req.headers, body, client_cert: clientCert(req),
                       http_version: req.httpVersion });
  }
  let m = path.match(/^\/status\/(\d{3})$/);
  if (m) {
    const headers = { 'Content-Type': 'text/plain' };
    if (query.retry_after) headers['Retry-After'] = query.retry_after;
    return send(req, res, { status: Number(m[1]), headers, body: query.body ?? `status ${m[1]}` });
  }
  if (path === '/redirect') {
    return send(req, res, { status: Number(query.status || 302), headers: { Location: query.to || '/echo' }, body: '' });
  }
  if (path === '/big') return streamBig(res, Number(query.mb || 50), query.length === '1');
  if (path === '/hang') return;
  if (path === '/slow') return send(req, res, { delay_ms: Number(query.ms || 1000), body: 'slow' });
  if (path === '/close') { req.socket.destroy(); return; }
  if (path === '/clientcert') {
    const c = clientCert(req);
    if (c && c.authorized) return json(200, { subject: c.subject });
    return json(401, { error: 'client certificate required', presented: !!c });
  }
  return json(404, { error: 'not found', path });
}

const onRequest = (req, res) => {
  handle(req, res).catch((e) => { try { res.writeHead(500); res.end(String(e)); } catch { /* gone */ } });
};

let server;
if (args.plain) {
  server = http.createServer(onRequest);
} else {
  const opts = { cert: fs.readFileSync(args.cert), key: fs.readFileSync(args.key) };
  if (args.ca) opts.ca = fs.readFileSync(args.ca);
  if (args['request-cert']) { opts.requestCert = true; opts.rejectUnauthorized = false; }
  if (args['require-cert']) { opts.requestCert = true; opts.rejectUnauthorized = true; }
  if (args.h2) server = http2.createSecureServer({ ...opts, allowHTTP1: true }, onRequest);
  else server = https.createServer(opts, onRequest);
}
server.keepAliveTimeout = 1000;
server.listen(Number(args.port), args.host, () => {
  console.log(`fault_http listening on port ${server.address().port}`);
});
process.on('SIGTERM', () => process.exit(0));
