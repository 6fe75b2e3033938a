// spec/peers/token_counter.mjs — a tiny OAuth2 token endpoint that counts the
// requests reaching it, for the token manager's many-process and crash tests.
// It rotates refresh tokens on every use like Microsoft does, and like
// Microsoft it keeps an earlier refresh token of the same grant usable (the
// real oidc-provider, used for the rotation tests, does not).
//
//   node token_counter.mjs CONFIG.json
//   CONFIG: { cert, key, delay_ms, initial_refresh_token, client_id }
// Prints "COUNTER READY <port>" once it listens on 127.0.0.1 (HTTPS).
//   POST /token       grant_type=refresh_token | client_credentials (form body)
//   GET  /test/stats  { token_requests, refresh_requests, client_credentials_requests, rejected }
import https from 'node:https';
import fs from 'node:fs';
import crypto from 'node:crypto';

const conf = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const stats = { token_requests: 0, refresh_requests: 0, client_credentials_requests: 0, rejected: 0 };
const known = new Set([conf.initial_refresh_token]);
const delay = conf.delay_ms || 0;

function reply(res, status, doc) {
  const body = JSON.stringify(doc);
  res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store',
    'content-length': Buffer.byteLength(body) });
  res.end(body);
}

function issue(withRefresh) {
  const n = stats.token_requests;
  const doc = {
    access_token: `cnt-at-${n}-${crypto.randomBytes(9).toString('hex')}`,
    token_type: 'Bearer',
    expires_in: 3600,
    scope: 'mail.send',
  };
  if (withRefresh) {
    doc.refresh_token = `cnt-rt-${n}-${crypto.randomBytes(9).toString('hex')}`;
    known.add(doc.refresh_token);
  }
  return doc;
}

const server = https.createServer({ cert: fs.readFileSync(conf.cert), key: fs.readFileSync(conf.key) }, (req, res) => {
  const chunks = [];
  let size = 0;
  req.on('data', (c) => {
    size += c.length;
    if (size > 65536) req.destroy();
    else chunks.push(c);
  });
  req.on('end', () => {
    const url = new URL(req.url, 'https://127.0.0.1');
    if (req.method === 'GET' && url.pathname === '/test/stats') return reply(res, 200, stats);
    if (req.method !== 'POST' || url.pathname !== '/token') return reply(res, 404, { error: 'not_found' });
    stats.token_requests += 1;
    const form = new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
    const grant = form.get('grant_type');
    setTimeout(() => {
      if (grant === 'refresh_token') {
        stats.refresh_requests += 1;
        if (!known.has(form.get('refresh_token'))) {
          stats.rejected += 1;
          return reply(res, 400, { error: 'invalid_grant', error_description: 'unknown refresh token' });
        }
        return reply(res, 200, issue(true));
      }
      if (grant === 'client_credentials') {
        stats.client_credentials_requests += 1;
        return reply(res, 200, issue(false));
      }
      stats.rejected += 1;
      return reply(res, 400, { error: 'unsupported_grant_type' });
    }, delay);
    return undefined;
  });
});

server.listen(0, '127.0.0.1', () => {
  process.stdout.write(`COUNTER READY ${server.address().port}\n`);
});
