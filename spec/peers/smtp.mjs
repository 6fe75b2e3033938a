// spec/peers/smtp.mjs — a real SMTP submission server (the npm smtp-server
// package) for the integration specs: XOAUTH2 checked against one token,
// PLAIN/LOGIN against one password, STARTTLS or implicit TLS with the test
// PKI, per-recipient refusals, and every accepted message appended to a
// JSON-lines spool the spec reads back.
// With cfg.introspect it also serves an RFC 7662 token introspection
// endpoint (for Dovecot's passdb oauth2) and, with tls "none" and no auth,
// acts as the relay sink behind Dovecot's submission service. With
// cfg.crash_in_data the process kills itself in the middle of the data.
// For the concurrency specs: cfg.tokens (more accepted tokens; the spool
// records which one a session used as token_index), cfg.data_delay_ms (the
// reply to the end of a message comes that much later), cfg.max_connections
// (a connection beyond it gets 432 4.3.2 at the greeting) and cfg.stats (a
// file kept up to date with {connections, current, max_concurrent, refused}).
// Usage: node smtp.mjs config.json   (prints "listening on PORT")
import { SMTPServer } from 'smtp-server';
import fs from 'node:fs';
import http from 'node:http';

const cfg = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const reject = new Set(Array.isArray(cfg.reject) ? cfg.reject : []);
const tokens = [cfg.token, ...(Array.isArray(cfg.tokens) ? cfg.tokens : [])];
const counts = { connections: 0, current: 0, max_concurrent: 0, refused: 0 };
function saveStats() {
  if (!cfg.stats) return;
  // replaced whole, so a reader never sees a half-written file
  fs.writeFileSync(cfg.stats + '.tmp', JSON.stringify(counts));
  fs.renameSync(cfg.stats + '.tmp', cfg.stats);
}

const server = new SMTPServer({
  secure: cfg.tls === 'implicit',
  key: fs.readFileSync(cfg.key),
  cert: fs.readFileSync(cfg.cert),
  hideSTARTTLS: cfg.tls === 'none' || cfg.hide_starttls,
  allowInsecureAuth: cfg.tls === 'none',
  authMethods: Array.isArray(cfg.auth) ? cfg.auth : [],
  authOptional: !!cfg.auth_optional,
  size: cfg.size || 0,
  logger: false,
  disableReverseLookup: true,
  banner: 'oauthmail test peer',
  onConnect(session, callback) {
    if (cfg.max_connections && counts.current >= cfg.max_connections) {
      counts.refused += 1;
      saveStats();
      const err = new Error('4.3.2 Concurrent connections limit exceeded');
      err.responseCode = 432;
      return callback(err);
    }
    session.counted = true;
    counts.connections += 1;
    counts.current += 1;
    if (counts.current > counts.max_concurrent) counts.max_concurrent = counts.current;
    saveStats();
    callback();
  },
  onClose(session) {
    if (session.counted) {
      session.counted = false;
      counts.current -= 1;
      saveStats();
    }
  },
  onAuth(auth, session, callback) {
    if (auth.method === 'XOAUTH2') {
      const index = tokens.indexOf(auth.accessToken);
      if (auth.username === cfg.user && auth.accessToken && index >= 0) {
        session.token_index = index;
        return callback(null, { user: auth.username });
      }
      // the error challenge Google sends, answered by the client, then 535
      return callback(null, { data: { status: '401', schemes: 'Bearer', scope: 'https://mail.example.org/smtp.send' } });
    }
    if (cfg.password && auth.username === cfg.user && auth.password === cfg.password) {
      return callback(null, { user: auth.username });
    }
    const err = new Error('5.7.8 Authentication credentials invalid');
    err.responseCode = 535;
    return callback(err);
  },
  onRcptTo(address, session, callback) {
    if (reject.has(address.address)) {
      const err = new Error('5.1.1 <' + address.address + '>: Recipient address rejected: User unknown');
      err.responseCode = 550;
      return callback(err);
    }
    callback();
  },
  onData(stream, session, callback) {
    // cfg.crash_in_data: the server process dies (SIGKILL) once the body
    // starts to arrive, for the fault matrix
    if (cfg.crash_in_data) stream.once('data', () => process.kill(process.pid, 'SIGKILL'));
    const parts = [];
    stream.on('data', c => parts.push(c));
    stream.on('end', () => {
      const data = Buffer.concat(parts).toString('binary');
      fs.appendFileSync(cfg.spool, JSON.stringify({
        from: session.envelope.mailFrom.address,
        to: session.envelope.rcptTo.map(r => r.address),
        size: data.length,
        data: data.length <= 65536 ? data : undefined,
        user: session.user,
        token_index: session.token_index,
        at: Date.now(),
      }) + '\n');
      const done = () => callback(null, 'queued as m' + Date.now());
      if (cfg.data_delay_ms) setTimeout(done, cfg.data_delay_ms); else done();
    });
  },
});
server.on('error', err => console.error('server error:', err.message));
function startSmtp() {
  server.listen(cfg.port || 0, '127.0.0.1', () => {
    console.log('listening on ' + server.server.address().port);
  });
}

if (cfg.introspect) {
  // POST token=... -> {"active":true,"username":...} only for the one good token
  const web = http.createServer((req, res) => {
    let body = '';
    req.on('data', c => { body += c; });
    req.on('end', () => {
      const token = new URLSearchParams(body).get('token') ||
        (req.headers.authorization || '').replace(/^Bearer /i, '');
      const ok = token === cfg.token;
      fs.appendFileSync(cfg.spool + '.introspect', (ok ? 'active' : 'inactive') + '\n');
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify(ok ? { active: true, username: cfg.user, scope: 'smtp' } : { active: false }));
    });
  });
  web.listen(0, '127.0.0.1', () => {
    console.log('introspection on ' + web.address().port);
    startSmtp();
  });
} else {
  startSmtp();
}
