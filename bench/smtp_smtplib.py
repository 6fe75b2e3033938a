#!/usr/bin/python3
# bench/smtp_smtplib.py — the reference client for bench/smtp_throughput:
# Python's smtplib over implicit TLS with XOAUTH2, one message at a time
# (smtplib waits for every reply). Prints "smtplib N seconds bytes".
import base64, smtplib, ssl, sys, time

n, port, ca = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
s = smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=120)
s.ehlo()
blob = "user=bench@example.org\x01auth=Bearer bench-token-%s\x01\x01" % ("x" * 1200)
code, _ = s.docmd("AUTH", "XOAUTH2 " + base64.b64encode(blob.encode()).decode())
assert code == 235, code
body = ("From: bench@example.org\r\nTo: sink@example.org\r\nSubject: bench\r\n\r\n" +
        "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?-+=/\r\n" * 13)
body = body[:1022] + "\r\n"
t0 = time.monotonic()
for _ in range(n):
    s.sendmail("bench@example.org", ["sink@example.org"], body)
dt = time.monotonic() - t0
s.quit()
print("smtplib %d %.4f %d" % (n, dt, n * len(body)))
