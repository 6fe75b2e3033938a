-- oauthmail.version — the release name, in a module of its own so that
-- `oauthmail --version` loads nothing else (no OpenSSL, no libcurl).
return "oauthmail 0.1"
