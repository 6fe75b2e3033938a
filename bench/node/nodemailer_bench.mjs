// bench/node/nodemailer_bench.mjs — the Node.js reference for
// bench/concurrent_sessions: N pooled Nodemailer transports (one connection
// each, XOAUTH2 with a fixed token, implicit TLS) in one process send M
// messages of 1 KB between them, all at once.
// Usage: node nodemailer_bench.mjs N M PORT CA
// Prints "nodemailer <N> <M> <seconds> <peak RSS kB>".
import fs from 'node:fs';
import nodemailer from 'nodemailer';

const [n, m, port] = process.argv.slice(2, 5).map(Number);
const ca = fs.readFileSync(process.argv[5]);
let body = 'From: bench@example.org\r\nTo: sink@example.org\r\nSubject: bench\r\n\r\n' +
  '0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?-+=/\r\n'.repeat(13);
body = body.slice(0, 1022) + '\r\n';
const token = 'bench-token-' + 'x'.repeat(1200);

const transports = [];
for (let i = 0; i < n; i++) {
  transports.push(nodemailer.createTransport({
    host: '127.0.0.1', port, secure: true, pool: true, maxConnections: 1, maxMessages: Infinity,
    auth: { type: 'OAuth2', user: 'bench@example.org', accessToken: token },
    tls: { ca, servername: 'localhost' },
  }));
}
// each transport sends its share one after the other, all transports at once
const per = Math.floor(m / n);
const t0 = process.hrtime.bigint();
await Promise.all(transports.map(async (t) => {
  for (let k = 0; k < per; k++) {
    await t.sendMail({ envelope: { from: 'bench@example.org', to: ['sink@example.org'] }, raw: body });
  }
}));
const dt = Number(process.hrtime.bigint() - t0) / 1e9;
transports.forEach((t) => t.close());
console.log(`nodemailer ${n} ${per * n} ${dt.toFixed(4)} ${process.resourceUsage().maxRSS}`);
