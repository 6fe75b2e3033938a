// spec/peers/oidc.mjs — the real OpenID provider (oidc-provider) the OAuth2
// specs run against, on 127.0.0.1 over HTTPS with the test CA.
//
//   node oidc.mjs CONFIG.json
//
// CONFIG.json (written by spec/support/oidc.lua): { cert, key, ca, clients: [client metadata...] }
// A client may carry `jwks_pem: [path...]` (public keys in PEM) or `jwks_cert: [path...]`
// (certificates, registered with x5c for self_signed_tls_client_auth) instead of `jwks`.
// The server asks every TLS client for a certificate (RFC 8705 client auth) and requires none.
// Prints "OIDC READY https://127.0.0.1:PORT" once it listens.
//
// Besides the provider itself it serves, for the tests only:
//   GET/POST /interaction/:uid[/login|/confirm|/abort]  login and consent pages for the fixed
//            user "testuser" / "test-password" (a real interaction, cookies and all)
//   POST /test/browse  {url, decision: "approve"|"deny", follow: bool}
//            acts as the user's browser: follows the authorization URL with a cookie jar,
//            logs in, consents (or denies), and either returns the final redirect
//            {location} (follow=false) or answers 202 at once and then delivers that
//            redirect to the loopback listener (follow=true), like a real browser would.
//   POST /test/device  {user_code, decision}  approves or denies a device code through
//            the real /device pages (xsrf forms, login, consent).
//   POST /test/inject  {path, responses: [{status, headers, body}], clear}  the next requests to
//            `path` get these canned answers in order (slow_down, 429, ...); clear drops
//            what is still queued first.
//   GET  /test/stats   {token_requests, last_browse, injected_requests: [{path, method, headers, body}]}
//   POST /test/slow  {path, ms}  requests to `path` are answered that much later (0 ends it)
import https from 'node:https';
import http from 'node:http';
import fs from 'node:fs';
import crypto from 'node:crypto';
import Provider, { errors } from 'oidc-provider';

// `node oidc.mjs --open ISSUER CA_FILE URL [approve|deny]` is a browser command
// for the tests: it hands URL to the running provider's scripted browser.
if (process.argv[2] === '--open') {
  const [, , , target, caFile, url, decision = 'approve'] = process.argv;
  const body = JSON.stringify({ url, decision, follow: true });
  const req = https.request(`${target}/test/browse`, {
    method: 'POST', ca: fs.readFileSync(caFile), headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
  }, (res) => { res.resume(); res.on('end', () => process.exit(res.statusCode === 202 ? 0 : 1)); });
  req.on('error', (e) => { console.error(e); process.exit(1); });
  req.end(body);
} else {
  main();
}

function main() {
  const conf = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  const TLS = { cert: fs.readFileSync(conf.cert), key: fs.readFileSync(conf.key) };
  const CA = fs.readFileSync(conf.ca);
  const RESOURCE = 'urn:oauthmail:test:mail';
  // the Graph peer's audience (spec/peers/graph.mjs), asked for with resource=
  const GRAPH = 'https://graph.oauthmail.test';
  const USER = 'testuser';
  const PASSWORD = 'test-password';

  const stats = { token_requests: 0, last_browse: null, injected_requests: [] };
  const injected = new Map();
  const delays = new Map();  // path -> ms, for the concurrency specs

  for (const c of conf.clients) {
    // Lua's JSON encoder writes an empty list as {}.
    for (const k of ['grant_types', 'response_types', 'redirect_uris']) {
      if (c[k] && !Array.isArray(c[k])) c[k] = [];
    }
    if (c.jwks_cert) {
      // self_signed_tls_client_auth: the certificate itself is registered (x5c)
      c.jwks = {
        keys: c.jwks_cert.map((p, i) => {
          const x = new crypto.X509Certificate(fs.readFileSync(p));
          return { ...x.publicKey.export({ format: 'jwk' }), kid: `c${i}`, x5c: [x.raw.toString('base64')] };
        }),
      };
      delete c.jwks_cert;
    }
    if (c.jwks_pem) {
      c.jwks = {
        keys: c.jwks_pem.map((p, i) => ({
          ...crypto.createPublicKey(fs.readFileSync(p)).export({ format: 'jwk' }),
          kid: `k${i}`,
        })),
      };
      delete c.jwks_pem;
    }
  }

  const signing = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const providerJwks = {
    keys: [{ ...signing.privateKey.export({ format: 'jwk' }), kid: 'op-rs256', use: 'sig', alg: 'RS256' }],
  };

  function html(title, inner) {
    return `<!DOCTYPE html><html><head><meta charset="utf-8"><title>${title}</title></head><body>${inner}</body></html>`;
  }

  const configuration = {
    clients: conf.clients,
    jwks: providerJwks,
    clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'private_key_jwt', 'none',
      'tls_client_auth', 'self_signed_tls_client_auth'],
    cookies: { keys: [crypto.randomBytes(16).toString('hex')] },
    scopes: ['openid', 'offline_access', 'email'],
    claims: { openid: ['sub'], email: ['email'] },
    findAccount: async (_ctx, sub) => (sub === USER ? {
      accountId: sub,
      claims: async () => ({ sub, email: 'testuser@example.test' }),
    } : undefined),
    interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
    // conf.code_ttl (seconds) shortens authorization codes, for the expired-code test;
    // conf.access_ttl (seconds) the client-credentials access tokens, for the fault matrix.
    ...(conf.code_ttl ? { ttl: { AuthorizationCode: conf.code_ttl } } : {}),
    // PKCE on every authorization request, so a client that forgets it fails here.
    pkce: { required: () => true },
    // Issue refresh tokens whenever the client may use them (not only with
    // offline_access + prompt=consent), and rotate them on every use.
    issueRefreshToken: async (_ctx, client) => client.grantTypeAllowed('refresh_token'),
    rotateRefreshToken: true,
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      // RFC 8705 client authentication at the token endpoint: the TLS client
      // certificate of the request's connection (requested, never required)
      mTLS: {
        enabled: true,
        tlsClientAuth: true,
        selfSignedTlsClientAuth: true,
        getCertificate: (ctx) => {
          const c = ctx.socket.getPeerCertificate && ctx.socket.getPeerCertificate();
          if (!c || !c.raw) return undefined;
          return `-----BEGIN CERTIFICATE-----\n${c.raw.toString('base64').match(/.{1,64}/g).join('\n')}\n-----END CERTIFICATE-----\n`;
        },
        certificateAuthorized: (ctx) => ctx.socket.authorized === true,
        certificateSubjectMatches: (ctx, property, expected) => {
          const c = ctx.socket.getPeerCertificate();
          if (property === 'tls_client_auth_subject_dn') return `CN=${c.subject && c.subject.CN}` === expected;
          return false;
        },
      },
      revocation: { enabled: true },
      deviceFlow: {
        enabled: true,
        userCodeInputSource: async (ctx, form, _out, err) => {
          ctx.body = html('device', `${err ? `<p class="err">${err.error || err.name}: ${err.error_description || err.message}</p>` : ''}${form}`);
        },
        userCodeConfirmSource: async (ctx, form, _client, _info, userCode) => {
          ctx.body = html('confirm', `<p>code <code>${userCode}</code></p>${form}`);
        },
        successSource: async (ctx) => { ctx.body = html('success', '<p>device-approved</p>'); },
      },
      resourceIndicators: {
        enabled: true,
        // client_credentials always targets the test resource server; the user
        // flows keep plain OpenID tokens (userinfo audience) unless asked.
        defaultResource: async (ctx, _client, oneOf) => {
          if (oneOf) return oneOf;
          return ctx.oidc.params?.grant_type === 'client_credentials' ? RESOURCE : undefined;
        },
        useGrantedResource: async () => false,
        getResourceServerInfo: async (_ctx, indicator) => {
          if (indicator === GRAPH) {
            return { scope: 'Mail.Send', audience: GRAPH, accessTokenTTL: 3600, accessTokenFormat: 'jwt' };
          }
          if (indicator !== RESOURCE) throw new errors.InvalidTarget();
          return { scope: 'mail.send mail.read', audience: RESOURCE, accessTokenTTL: conf.access_ttl || 3600, accessTokenFormat: 'jwt' };
        },
      },
    },
  };

  let provider;
  let issuer;
  let handler;

  async function readBody(req) {
    const chunks = [];
    let size = 0;
    for await (const c of req) {
      size += c.length;
      if (size > 1e6) throw new Error('body too large');
      chunks.push(c);
    }
    return Buffer.concat(chunks).toString('utf8');
  }

  function json(res, status, obj) {
    res.writeHead(status, { 'content-type': 'application/json' });
    res.end(JSON.stringify(obj));
  }

  async function interaction(req, res, path) {
    const m = path.match(/^\/interaction\/([^/]+)(?:\/(login|confirm|abort))?$/);
    if (!m) { res.writeHead(404); res.end(); return; }
    const details = await provider.interactionDetails(req, res);
    if (details.uid !== m[1]) throw new Error('interaction uid mismatch');
    const action = m[2];
    const { prompt } = details;
    if (req.method === 'GET' && !action) {
      const form = prompt.name === 'login'
        ? `<form id="login" method="post" action="/interaction/${details.uid}/login">
           <input name="login"><input name="password" type="password"></form>`
        : `<form id="consent" method="post" action="/interaction/${details.uid}/confirm"></form>`;
      res.writeHead(200, { 'content-type': 'text/html' });
      res.end(html(prompt.name, `${form}<form id="abort" method="post" action="/interaction/${details.uid}/abort"></form>`));
      return;
    }
    if (req.method !== 'POST') { res.writeHead(405); res.end(); return; }
    const form = new URLSearchParams(await readBody(req));
    let result;
    if (action === 'abort') {
      result = { error: 'access_denied', error_description: 'End-User aborted interaction' };
    } else if (action === 'login') {
      if (form.get('login') !== USER || form.get('password') !== PASSWORD) {
        res.writeHead(403, { 'content-type': 'text/html' });
        res.end(html('login', '<p>wrong user or password</p>'));
        return;
      }
      result = { login: { accountId: USER } };
    } else {
      const { params, session } = details;
      const grant = details.grantId
        ? await provider.Grant.find(details.grantId)
        : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
      const d = prompt.details;
      if (d.missingOIDCScope) grant.addOIDCScope(d.missingOIDCScope.join(' '));
      if (d.missingOIDCClaims) grant.addOIDCClaims(d.missingOIDCClaims);
      if (d.missingResourceScopes) {
        for (const [indicator, scopes] of Object.entries(d.missingResourceScopes)) {
          grant.addResourceScope(indicator, scopes.join(' '));
        }
      }
      result = { consent: { grantId: await grant.save() } };
    }
    await provider.interactionFinished(req, res, result, { mergeWithLastSubmission: true });
  }

  // A minimal browser: one request to the provider with a cookie jar.
  function fetchOnce(jar, method, url, body) {
    return new Promise((resolve, reject) => {
      const u = new URL(url);
      const headers = { cookie: [...jar].map(([k, v]) => `${k}=${v}`).join('; ') };
      if (body !== undefined) {
        headers['content-type'] = 'application/x-www-form-urlencoded';
        headers['content-length'] = Buffer.byteLength(body);
      }
      const mod = u.protocol === 'https:' ? https : http;
      const req = mod.request(u, { method, headers, ca: CA, timeout: 10000 }, (res) => {
        for (const sc of res.headers['set-cookie'] || []) {
          const [pair, ...attrs] = sc.split(';');
          const eq = pair.indexOf('=');
          const name = pair.slice(0, eq).trim();
          const value = pair.slice(eq + 1).trim();
          const expired = attrs.some((a) => /^\s*expires=/i.test(a) && Date.parse(a.split('=')[1]) < Date.now());
          if (!value || expired) jar.delete(name); else jar.set(name, value);
        }
        const chunks = [];
        res.on('data', (c) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks).toString('utf8') }));
      });
      req.on('timeout', () => req.destroy(new Error(`timeout: ${method} ${u.pathname}`)));
      req.on('error', reject);
      if (body !== undefined) req.write(body);
      req.end();
    });
  }

  function formAction(page, id) {
    const m = page.match(new RegExp(`<form[^>]*id="${id}"[^>]*action="([^"]+)"`))
      || page.match(new RegExp(`<form[^>]*action="([^"]+)"[^>]*id="${id}"`));
    return m && m[1];
  }

  function hiddenInputs(page) {
    const out = new URLSearchParams();
    for (const m of page.matchAll(/<input[^>]*type="hidden"[^>]*>/g)) {
      const name = m[0].match(/name="([^"]*)"/);
      const value = m[0].match(/value="([^"]*)"/);
      if (name) out.set(name[1], value ? value[1] : '');
    }
    return out;
  }

  // Walk redirects and our interaction pages until the provider sends the user
  // agent away from itself (to the client's redirect_uri) or a page ends it.
  async function walk(jar, start, decision, method = 'GET', body = undefined) {
    let url = start;
    let cur = { method, body };
    for (let hop = 0; hop < 20; hop += 1) {
      if (new URL(url).origin !== issuer) return { location: url };
      const r = await fetchOnce(jar, cur.method, url, cur.body);
      if (process.env.OIDC_DEBUG) console.error(cur.method, url, r.status, r.headers.location || "", r.body.slice(0, 200));
      if (r.status >= 300 && r.status < 400) {
        url = new URL(r.headers.location, url).href;
        cur = { method: 'GET' };
      } else if (r.status === 200 && /<title>(login|consent)<\/title>/.test(r.body)) {
        const kind = r.body.match(/<title>(login|consent)<\/title>/)[1];
        if (decision === 'deny') {
          url = new URL(formAction(r.body, 'abort'), url).href;
          cur = { method: 'POST', body: '' };
        } else if (kind === 'login') {
          url = new URL(formAction(r.body, 'login'), url).href;
          cur = { method: 'POST', body: new URLSearchParams({ login: USER, password: PASSWORD }).toString() };
        } else {
          url = new URL(formAction(r.body, 'consent'), url).href;
          cur = { method: 'POST', body: '' };
        }
      } else {
        return { status: r.status, page: r.body };
      }
    }
    throw new Error('too many hops');
  }

  async function browse({ url, decision = 'approve', follow = true }) {
    const jar = new Map();
    const end = await walk(jar, url, decision);
    if (!end.location || !follow) return end;
    // Deliver the redirect to the client's loopback listener, as the browser would.
    const r = await fetchOnce(new Map(), 'GET', end.location);
    return { location: end.location, delivered: r.status, page: r.body };
  }

  async function device({ user_code: userCode, decision = 'approve' }) {
    const jar = new Map();
    const base = `${issuer}/device`;
    const input = await fetchOnce(jar, 'GET', base);
    let form = hiddenInputs(input.body);
    form.set('user_code', userCode);
    const confirm = await fetchOnce(jar, 'POST', base, form.toString());
    if (confirm.status !== 200 || !/<title>confirm<\/title>/.test(confirm.body)) {
      return { status: confirm.status, page: confirm.body };
    }
    form = hiddenInputs(confirm.body);
    form.set('user_code', userCode);
    if (decision === 'deny') form.set('abort', 'yes'); else form.set('confirm', 'yes');
    const end = await walk(jar, base, decision, 'POST', form.toString());
    return { ...end, approved: /device-approved/.test(end.page || '') };
  }

  async function testRoute(req, res, path) {
    if (path === '/test/stats') { json(res, 200, stats); return; }
    const body = JSON.parse((await readBody(req)) || '{}');
    if (path === '/test/inject') {
      if (body.clear) injected.delete(body.path);
      const responses = Array.isArray(body.responses) ? body.responses : []; // Lua sends [] as {}
      injected.set(body.path, [...(injected.get(body.path) || []), ...responses]);
      json(res, 200, { queued: injected.get(body.path).length });
    } else if (path === '/test/slow') {
      if (body.ms > 0) delays.set(body.path, body.ms); else delays.delete(body.path);
      json(res, 200, { slow: body.ms || 0 });
    } else if (path === '/test/browse') {
      if (body.follow === false) { json(res, 200, await browse(body)); return; }
      stats.last_browse = { pending: true };
      json(res, 202, { started: true });
      browse(body).then((r) => { stats.last_browse = r; }, (e) => {
        stats.last_browse = { error: String(e) };
        console.error('browse failed:', e);
      });
    } else if (path === '/test/device') {
      json(res, 200, await device(body));
    } else {
      json(res, 404, { error: 'no such test route' });
    }
  }

  // a client certificate is asked for (mTLS client authentication) but never required
  const server = https.createServer({ ...TLS, ca: CA, requestCert: true, rejectUnauthorized: false });
  server.on('request', async (req, res) => {
    const path = req.url.split('?')[0];
    try {
      if (path === '/token' && req.method === 'POST') {
        stats.token_requests += 1;
      }
      if (delays.has(path)) await new Promise((resolve) => setTimeout(resolve, delays.get(path)));
      const queue = injected.get(path);
      if (queue && queue.length) {
        const canned = queue.shift();
        stats.injected_requests.push({
          path, method: req.method, headers: req.headers, body: await readBody(req),
        });
        res.writeHead(canned.status || 200, { 'content-type': 'application/json', ...(canned.headers || {}) });
        res.end(typeof canned.body === 'string' ? canned.body : JSON.stringify(canned.body || {}));
        return;
      }
      if (path.startsWith('/test/')) { await testRoute(req, res, path); return; }
      if (path.startsWith('/interaction/')) { await interaction(req, res, path); return; }
      handler(req, res);
    } catch (e) {
      console.error('harness error:', e);
      if (!res.headersSent) json(res, 500, { error: 'server_error', error_description: String(e.message) });
      else res.end();
    }
  });

  server.listen(0, '127.0.0.1', () => {
    const { port } = server.address();
    issuer = `https://127.0.0.1:${port}`;
    provider = new Provider(issuer, configuration);
    handler = provider.callback();
    provider.on('server_error', (_ctx, e) => console.error('provider server_error:', e));
    console.log(`OIDC READY ${issuer}`);
  });
}
