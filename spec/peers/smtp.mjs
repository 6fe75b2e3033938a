// spec/peers/smtp.mjs — a real SMTP submission server (the npm smtp-server
// package) for the integration specs: XOAUTH2 checked against one token,
// PLAIN/LOGIN against one password, STARTTLS or implicit TLS with the test
// PKI, per-recipient refusals, and every accepted message appended to a
// JSON-lines spool the spec reads back.
// With cfg.introspect it also serves an RFC 7662 token introspection
// endpoint (for Dovecot's passdb oauth2) and, with tls "none" and no auth,
// acts as the relay sink behind Dovecot's submission service. With
// cfg.crash_in_data the process kills itself in the middle of the data.
// Usage: node smtp.mjs config.json   (prints "listening on PORT")
import { SMTPServer } from 'smtp-server';
import fs from 'node:fs';
import http from 'node:http';

const cfg = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const reject = new Set(Array.isArray(cfg.reject) ? cfg.reject : []);

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
  onAuth(auth, session, callback) {
    if (auth.method === 'XOAUTH2') {
      if (auth.username === cfg.user && auth.accessToken === cfg.token) return callback(null, { user: auth.username });
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
      }) + '\n');
      callback(null, 'queued as m' + Date.now());
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
