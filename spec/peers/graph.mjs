// spec/peers/graph.mjs — a Microsoft Graph sendMail peer for the specs, on
// 127.0.0.1 over HTTPS with the test PKI. It takes only what Graph takes
// for MIME: POST /v1.0/users/{user}/sendMail, Content-Type text/plain, a
// body that is the base64 of an RFC 5322 message. The bearer token must be
// a JWT signed by the oidc-provider's keys (its JWKS), not expired, for the
// configured audience and with the configured scope. Accepted messages are
// parsed (header recipients, Bcc included) and kept; 202 is the answer.
//
//   node graph.mjs CONFIG.json
//   CONFIG: {cert, key, ca, jwks_uri, audience, scope, user}
// Prints "GRAPH READY https://127.0.0.1:PORT".
//
// Control routes (same server):
//   POST   /_faults {faults: [{status, code, message, retry_after, times, action}]}
//          the next sendMail requests get these answers in order (Graph's
//          JSON error shape with innerError request-id and date); action
//          "drop" reads the whole request and then closes the connection
//          without an answer (the message is kept: it may have been taken).
//   DELETE /_faults
//   POST   /_slow {ms}   every sendMail is answered ms later (0 ends it)
//   GET    /_stats   {requests, accepted, refused, unauthorized, faults_used, current,
//                     max_concurrent, messages: [...]}
//   DELETE /_messages   (and the counters)
import https from 'node:https';
import crypto from 'node:crypto';
import fs from 'node:fs';

const cfg = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const CA = fs.readFileSync(cfg.ca);
let faults = [];
let messages = [];
const stats = { requests: 0, accepted: 0, refused: 0, unauthorized: 0, faults_used: [], current: 0, max_concurrent: 0 };
let slowMs = 0;  // each sendMail answered this much later (the concurrency spec)
let jwks = null;

function fetchJwks() {
  return new Promise((resolve) => {
    https.get(cfg.jwks_uri, { ca: CA }, (res) => {
      let body = '';
      res.on('data', (c) => { body += c; });
      res.on('end', () => { try { resolve(JSON.parse(body)); } catch { resolve(null); } });
    }).on('error', () => resolve(null));
  });
}

// Why the token is refused, or null with its claims when it is good.
async function checkToken(auth) {
  const m = /^Bearer ([A-Za-z0-9_.~+/=-]+)$/.exec(auth || '');
  if (!m) return { why: 'no bearer token' };
  const parts = m[1].split('.');
  if (parts.length !== 3) return { why: 'not a JWT' };
  let header;
  let payload;
  try {
    header = JSON.parse(Buffer.from(parts[0], 'base64url').toString());
    payload = JSON.parse(Buffer.from(parts[1], 'base64url').toString());
  } catch { return { why: 'malformed JWT' }; }
  if (!jwks) jwks = await fetchJwks();
  const jwk = jwks && jwks.keys.find((k) => k.kid === header.kid);
  if (!jwk || header.alg !== 'RS256') return { why: 'unknown signing key' };
  const ok = crypto.verify('sha256', Buffer.from(`${parts[0]}.${parts[1]}`),
    crypto.createPublicKey({ key: jwk, format: 'jwk' }), Buffer.from(parts[2], 'base64url'));
  if (!ok) return { why: 'bad signature' };
  if (typeof payload.exp !== 'number' || payload.exp * 1000 < Date.now()) return { why: 'expired' };
  const aud = Array.isArray(payload.aud) ? payload.aud : [payload.aud];
  if (!aud.includes(cfg.audience)) return { why: 'Invalid audience.' };
  const scopes = String(payload.scope || payload.scp || '').split(' ');
  if (!scopes.includes(cfg.scope)) return { why: 'missing scope' };
  return { claims: payload, label: `jwt-${crypto.createHash('sha256').update(m[1]).digest('hex').slice(0, 8)}` };
}

function graphError(res, status, code, message, extra = {}) {
  res.writeHead(status, { 'content-type': 'application/json', 'request-id': crypto.randomUUID(), ...extra });
  res.end(JSON.stringify({
    error: {
      code, message,
      innerError: { date: new Date().toISOString().slice(0, 19), 'request-id': crypto.randomUUID(),
        'client-request-id': crypto.randomUUID() },
    },
  }));
}

// Header fields of an RFC 5322 message (unfolded), lower-case names.
function headerFields(text) {
  const end = text.search(/\r?\n\r?\n/);
  const head = end < 0 ? text : text.slice(0, end);
  const out = [];
  for (const line of head.replace(/\r?\n[ \t]+/g, ' ').split(/\r?\n/)) {
    const i = line.indexOf(':');
    if (i > 0) out.push([line.slice(0, i).trim().toLowerCase(), line.slice(i + 1).trim()]);
  }
  return out;
}

function addresses(value) {
  return (value.match(/[^\s<>,;:"]+@[^\s<>,;"]+/g) || []).map((a) => a.toLowerCase());
}

async function readBody(req, limit) {
  const chunks = [];
  let size = 0;
  for await (const c of req) {
    size += c.length;
    if (size > limit) return null;
    chunks.push(c);
  }
  return Buffer.concat(chunks).toString('latin1');
}

async function sendMail(req, res, user) {
  stats.requests += 1;
  const tok = await checkToken(req.headers.authorization);
  const fault = faults.length ? faults[0] : null;
  if (fault) {
    if (fault.times && fault.times > 1) fault.times -= 1; else faults.shift();
    stats.faults_used.push(String(fault.action || fault.status));
  }
  if (fault && fault.status === 401) {
    stats.unauthorized += 1;
    return graphError(res, 401, fault.code || 'InvalidAuthenticationToken',
      fault.message || 'Access token has expired or is not yet valid.');
  }
  if (tok.why) {
    stats.unauthorized += 1;
    return graphError(res, 401, 'InvalidAuthenticationToken', `Access token validation failure. ${tok.why}`);
  }
  if (decodeURIComponent(user).toLowerCase() !== cfg.user.toLowerCase()) {
    return graphError(res, 404, 'ErrorInvalidUser', `The requested user '${decodeURIComponent(user)}' is invalid.`);
  }
  const ct = (req.headers['content-type'] || '').split(';')[0].trim().toLowerCase();
  if (ct !== 'text/plain') {
    return graphError(res, 415, 'UnsupportedMediaType', 'Only text/plain (MIME) is accepted by this peer.');
  }
  const body = await readBody(req, 4 * 1024 * 1024);
  if (body === null) return graphError(res, 413, 'RequestEntityTooLarge', 'The request is larger than 4 MB.');
  if (fault && fault.action === 'drop') {
    // taken, but the answer never comes
    const b = Buffer.from(body.replace(/\s+/g, ''), 'base64').toString('latin1');
    messages.push({ user: cfg.user, b64: Buffer.from(b, 'latin1').toString('base64'), dropped: true, token: tok.label });
    req.socket.destroy();
    return undefined;
  }
  if (fault && fault.status) {
    stats.refused += 1;
    const extra = fault.retry_after !== undefined ? { 'retry-after': String(fault.retry_after) } : {};
    return graphError(res, fault.status, fault.code || 'ErrorInternalServerError',
      fault.message || 'An internal server error occurred.', extra);
  }
  const compact = body.replace(/\s+/g, '');
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(compact) || compact.length % 4 !== 0 || compact.length === 0) {
    return graphError(res, 400, 'ErrorMimeContentInvalidBase64String', 'Invalid base64 string for MIME content.');
  }
  const data = Buffer.from(compact, 'base64').toString('latin1');
  const fields = headerFields(data);
  const get = (n) => fields.filter(([k]) => k === n).map(([, v]) => v);
  const to = get('to').flatMap(addresses);
  const cc = get('cc').flatMap(addresses);
  const bcc = get('bcc').flatMap(addresses);
  if (to.length + cc.length + bcc.length === 0) {
    return graphError(res, 400, 'ErrorInvalidRecipients',
      "At least one recipient isn't valid., A message can't be sent because it contains no recipients.");
  }
  const mid = (get('message-id')[0] || '').replace(/^<|>$/g, '');
  stats.accepted += 1;
  messages.push({ user: cfg.user, b64: Buffer.from(data, 'latin1').toString('base64'), to, cc, bcc, message_id: mid, token: tok.label,
    aud: tok.claims.aud, scope: tok.claims.scope });
  res.writeHead(202, { 'request-id': crypto.randomUUID(), 'content-length': '0' });
  res.end();
  return undefined;
}

const server = https.createServer({ cert: fs.readFileSync(cfg.cert), key: fs.readFileSync(cfg.key) });
server.on('request', async (req, res) => {
  const path = req.url.split('?')[0];
  try {
    const m = /^\/v1\.0\/users\/([^/]+)\/sendMail$/.exec(path);
    if (m && req.method === 'POST') {
      stats.current += 1;
      if (stats.current > stats.max_concurrent) stats.max_concurrent = stats.current;
      try {
        if (slowMs) await new Promise((resolve) => { setTimeout(resolve, slowMs); });
        await sendMail(req, res, m[1]);
      } finally {
        stats.current -= 1;
      }
      return;
    }
    if (path === '/_slow' && req.method === 'POST') {
      slowMs = JSON.parse((await readBody(req, 1e6)) || '{}').ms || 0;
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ slow: slowMs }));
      return;
    }
    if (path === '/_faults' && req.method === 'POST') {
      const doc = JSON.parse((await readBody(req, 1e6)) || '{}');
      faults = faults.concat(Array.isArray(doc.faults) ? doc.faults : []);
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ queued: faults.length }));
      return;
    }
    if (path === '/_faults' && req.method === 'DELETE') { faults = []; res.writeHead(200); res.end('{}'); return; }
    if (path === '/_messages' && req.method === 'DELETE') {
      messages = [];
      Object.assign(stats, { requests: 0, accepted: 0, refused: 0, unauthorized: 0, faults_used: [], max_concurrent: 0 });
      res.writeHead(200);
      res.end('{}');
      return;
    }
    if (path === '/_stats') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ ...stats, messages }));
      return;
    }
    graphError(res, 404, 'UnknownError', 'No such route in the test peer.');
  } catch (e) {
    console.error('graph peer error:', e);
    if (!res.headersSent) graphError(res, 500, 'ErrorInternalServerError', String(e.message));
    else res.end();
  }
});
server.listen(0, '127.0.0.1', () => {
  console.log(`GRAPH READY https://127.0.0.1:${server.address().port}`);
});
