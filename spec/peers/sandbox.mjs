// spec/peers/sandbox.mjs — the oauthmail sandbox: a local submission server
// built on the real smtp-server package that answers the way Exchange Online
// does (greeting, 535 5.7.3, 250 2.0.0 OK <id> [Hostname=...]) and can be told
// to misbehave on demand: refuse an AUTH, answer MAIL with 421 / 432 / 451,
// refuse a recipient, drop the connection in the middle of DATA, right
// after the 250 or after storing the message but before the 250 is written
// (drop_before_ok), stop reading in the middle of DATA for a while (hold,
// hold_ms), or never answer the end of DATA (stall: nothing stored;
// stall_after_store: stored).
// Bearer tokens are accepted when they are JWTs signed by a configured
// issuer's keys (the local oidc-provider) and not expired, or when they are
// on the allow list. Every accepted message is written to maildir as
// NNNN.eml plus one line in maildir/index.jsonl.
// Usage: node sandbox.mjs config.json
//   config: {port, tls: "starttls"|"implicit"|"none", cert, key, maildir, user,
//            tokens: [..], jwks_uri, ca, control_port}
// Prints "SANDBOX READY smtp=<port> control=<port>".
// Control (HTTP on 127.0.0.1): POST /faults {faults:[...]} appends one-shot
// faults; DELETE /faults; POST /tokens {tokens:[..]}; GET /stats.
import { SMTPServer } from 'smtp-server';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import path from 'node:path';

const cfg = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const HOST = 'sandbox.oauthmail.test';
fs.mkdirSync(cfg.maildir, { recursive: true });

const allowed = new Map();   // token -> label
(Array.isArray(cfg.tokens) ? cfg.tokens : []).forEach((t, i) => allowed.set(t, 'list-' + (i + 1)));
let faults = [];             // {stage, ...}; each is used once (skip: N lets the stage pass N times first)
const stats = { connections: 0, auths: 0, auth_ok: 0, auth_failed: 0, delivered: 0, mail: 0, faults_used: [] };
let jwks = null;

function takeFault(stage, pred) {
  const i = faults.findIndex(f => f.stage === stage && (!pred || pred(f)));
  if (i < 0) return null;
  const f = faults[i];
  if (f.skip > 0) { f.skip -= 1; return null; }
  if (f.times && f.times > 1) f.times -= 1; else faults.splice(i, 1);
  stats.faults_used.push(stage + ':' + (f.code || f.action || 'challenge'));
  return f;
}

function replyError(f, fallbackCode) {
  const err = new Error([f.enhanced, f.text].filter(Boolean).join(' ') || 'Error');
  err.responseCode = f.code || fallbackCode;
  return err;
}

function fetchJwks() {
  return new Promise((resolve) => {
    if (!cfg.jwks_uri) return resolve(null);
    const opts = cfg.ca ? { ca: fs.readFileSync(cfg.ca) } : {};
    https.get(cfg.jwks_uri, opts, res => {
      let body = '';
      res.on('data', c => { body += c; });
      res.on('end', () => { try { resolve(JSON.parse(body)); } catch { resolve(null); } });
    }).on('error', () => resolve(null));
  });
}

const ALGS = {
  RS256: { hash: 'sha256' },
  PS256: { hash: 'sha256', padding: crypto.constants.RSA_PKCS1_PSS_PADDING, saltLength: 32 },
  ES256: { hash: 'sha256', dsaEncoding: 'ieee-p1363' },
};

// A label for the token when it is acceptable, else null. The token itself
// never reaches a file or the output.
async function checkToken(token) {
  if (allowed.has(token)) return allowed.get(token);
  const parts = token.split('.');
  if (parts.length !== 3) return null;
  let header, payload;
  try {
    header = JSON.parse(Buffer.from(parts[0], 'base64url').toString());
    payload = JSON.parse(Buffer.from(parts[1], 'base64url').toString());
  } catch { return null; }
  if (!jwks) jwks = await fetchJwks();
  if (!jwks || !ALGS[header.alg]) return null;
  const jwk = jwks.keys.find(k => !header.kid || k.kid === header.kid);
  if (!jwk) return null;
  const a = ALGS[header.alg];
  const key = crypto.createPublicKey({ key: jwk, format: 'jwk' });
  const ok = crypto.verify(a.hash, Buffer.from(parts[0] + '.' + parts[1]),
    { key, padding: a.padding, saltLength: a.saltLength, dsaEncoding: a.dsaEncoding },
    Buffer.from(parts[2], 'base64url'));
  if (!ok) return null;
  if (typeof payload.exp !== 'number' || payload.exp * 1000 < Date.now()) return null;
  return 'jwt-' + crypto.createHash('sha256').update(token).digest('hex').slice(0, 8);
}

function connectionOf(session) {
  for (const c of server.connections) if (c.session === session) return c;
  return null;
}

let seq = 0;
const server = new SMTPServer({
  name: HOST,
  secure: cfg.tls === 'implicit',
  key: fs.readFileSync(cfg.key),
  cert: fs.readFileSync(cfg.cert),
  hideSTARTTLS: cfg.tls === 'none',
  allowInsecureAuth: cfg.tls === 'none',
  authMethods: ['XOAUTH2'],
  banner: 'Microsoft ESMTP MAIL Service ready (oauthmail sandbox)',
  logger: false,
  disableReverseLookup: true,
  size: 35882577,
  onConnect(session, callback) {
    stats.connections += 1;
    const f = takeFault('connect');
    if (f) return callback(replyError(f, 421));
    callback();
  },
  onAuth(auth, session, callback) {
    stats.auths += 1;
    const fail = (f) => { stats.auth_failed += 1; callback(f); };
    const f = takeFault('auth');
    if (f && f.challenge) {
      stats.auth_failed += 1;
      return callback(null, { data: f.challenge });
    }
    if (f) return fail(replyError(f, 535));
    if (auth.method !== 'XOAUTH2' || (cfg.user && auth.username !== cfg.user)) {
      return fail(replyError({ code: 535, enhanced: '5.7.3', text: 'Authentication unsuccessful [' + HOST + ']' }));
    }
    checkToken(auth.accessToken || '').then(label => {
      if (!label) {
        return fail(replyError({ code: 535, enhanced: '5.7.3', text: 'Authentication unsuccessful [' + HOST + ']' }));
      }
      stats.auth_ok += 1;
      callback(null, { user: { name: auth.username, token: label } });
    }, () => fail(replyError({ code: 454, enhanced: '4.7.0', text: 'Temporary authentication failure' })));
  },
  onMailFrom(address, session, callback) {
    stats.mail += 1;
    const f = takeFault('mail');
    if (f) return callback(replyError(f, 451));
    callback();
  },
  onRcptTo(address, session, callback) {
    const f = takeFault('rcpt', x => !x.address || x.address === address.address);
    if (f) return callback(replyError(f, 550));
    callback();
  },
  onData(stream, session, callback) {
    const f = takeFault('data');
    const conn = connectionOf(session);
    const parts = [];
    if (f && f.action === 'drop') {
      // cut the connection once the body has started to arrive
      stream.once('data', () => { if (conn) conn._socket.destroy(); });
    }
    if (f && f.action === 'hold' && conn) {
      // stop reading once the body has started (the client blocks writing),
      // then read on after hold_ms: a test kills the client in between
      stream.once('data', () => {
        conn._socket.pause();
        setTimeout(() => conn._socket.resume(), f.hold_ms || 2000);
      });
    }
    stream.on('data', c => parts.push(c));
    stream.on('error', () => {});
    stream.on('end', () => {
      if (f && f.action === 'drop') return;
      if (f && f.action === 'stall') return;   // never answer; the client must time out
      if (f && f.code) return callback(replyError(f, 451));
      seq += 1;
      const data = Buffer.concat(parts);
      const id = String(seq).padStart(4, '0');
      const file = path.join(cfg.maildir, id + '.eml');
      fs.writeFileSync(file, data);
      const mid = (/^message-id:\s*<([^>\r\n]*)>/im.exec(data.toString('latin1')) || [])[1] || null;
      fs.appendFileSync(path.join(cfg.maildir, 'index.jsonl'), JSON.stringify({
        n: seq, file, from: session.envelope.mailFrom.address,
        to: session.envelope.rcptTo.map(r => r.address), size: data.length, message_id: mid,
        user: session.user && session.user.name, token: session.user && session.user.token,
      }) + '\n');
      stats.delivered += 1;
      if (f && f.action === 'stall_after_store') return;   // delivered, the 250 never comes
      if (f && f.action === 'drop_before_ok' && conn) {
        // delivered, but the connection dies before the 250 is written: the
        // client cannot tell this from a loss (RFC 1047)
        conn._socket.destroy();
        return;
      }
      callback(null, '2.0.0 OK <' + id + '.sandbox@' + HOST + '> [Hostname=' + HOST + ']');
      if (f && f.action === 'drop_after_ok' && conn) {
        // FIN after the 250 has been written: the client reads the reply, then sees the close
        setImmediate(() => conn._socket.end());
      }
    });
  },
});
server.on('error', err => console.error('sandbox error:', err.message));

const control = http.createServer((req, res) => {
  let body = '';
  req.on('data', c => { body += c; });
  req.on('end', () => {
    let doc = {};
    try { doc = body ? JSON.parse(body) : {}; } catch { res.writeHead(400); res.end('{}'); return; }
    const json = (status, v) => { res.writeHead(status, { 'content-type': 'application/json', connection: 'close' }); res.end(JSON.stringify(v)); };
    if (req.url === '/faults' && req.method === 'POST') { faults = faults.concat(Array.isArray(doc.faults) ? doc.faults : []); return json(200, { queued: faults.length }); }
    if (req.url === '/faults' && req.method === 'DELETE') { faults = []; return json(200, {}); }
    if (req.url === '/tokens' && req.method === 'POST') {
      (Array.isArray(doc.tokens) ? doc.tokens : []).forEach(t => allowed.set(t, 'list-' + (allowed.size + 1)));
      return json(200, {});
    }
    if (req.url === '/stats') return json(200, Object.assign({ pending_faults: faults.length }, stats));
    json(404, {});
  });
});

control.listen(cfg.control_port || 0, '127.0.0.1', () => {
  server.listen(cfg.port || 0, '127.0.0.1', () => {
    console.log('SANDBOX READY smtp=' + server.server.address().port + ' control=' + control.address().port);
  });
});
