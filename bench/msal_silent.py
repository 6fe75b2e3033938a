"""bench/msal_silent.py — Python MSAL's acquire_token_silent from a serialized
token cache, as one process per call (what a passwordeval helper built on MSAL
does). MSAL fetches its authority's OpenID discovery document when the app is
made; here a local http_client hands it over from memory, so no network is
involved and MSAL is measured at its best.

  python3 bench/msal_silent.py seed CACHE   # put an app token into CACHE (one fake token call)
  python3 bench/msal_silent.py silent CACHE # print the cached token (exit 1 if none)
"""
import json
import sys

import msal

TENANT = "contoso.onmicrosoft.com"
AUTHORITY = "https://login.microsoftonline.com/" + TENANT
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
SCOPES = ["https://outlook.office365.com/.default"]
BASE = AUTHORITY + "/oauth2/v2.0"


class Response:
    def __init__(self, body, status=200):
        self.status_code = status
        self.text = json.dumps(body)
        self.headers = {}

    def raise_for_status(self):
        pass


class LocalHttp:
    """Answers MSAL's discovery (and, for seed, one token request) from memory."""

    def __init__(self, token_calls):
        self.token_calls = token_calls

    def get(self, url, **_):
        if "openid-configuration" in url:
            return Response({
                "token_endpoint": BASE + "/token",
                "authorization_endpoint": BASE + "/authorize",
                "device_authorization_endpoint": BASE + "/devicecode",
                "issuer": "https://login.microsoftonline.com/" + TENANT + "/v2.0",
            })
        if "instance" in url or "discovery" in url:
            return Response({"tenant_discovery_endpoint": AUTHORITY + "/v2.0/.well-known/openid-configuration",
                             "metadata": []})
        raise RuntimeError("unexpected GET " + url)

    def post(self, url, **_):
        if url.endswith("/token") and self.token_calls:
            return Response({"access_token": "bench-msal-access-token-" + "x" * 1200,
                             "token_type": "Bearer", "expires_in": 3600})
        raise RuntimeError("unexpected POST " + url)

    def close(self):
        pass


def app(cache, token_calls=False):
    return msal.ConfidentialClientApplication(
        CLIENT_ID, client_credential="bench-client-secret", authority=AUTHORITY,
        token_cache=cache, http_client=LocalHttp(token_calls), instance_discovery=False)


def main():
    mode, path = sys.argv[1], sys.argv[2]
    cache = msal.SerializableTokenCache()
    if mode == "seed":
        result = app(cache, token_calls=True).acquire_token_for_client(SCOPES)
        assert "access_token" in result, result
        with open(path, "w") as f:
            f.write(cache.serialize())
        return 0
    with open(path) as f:
        cache.deserialize(f.read())
    result = app(cache).acquire_token_silent(SCOPES, account=None)
    if not result or "access_token" not in result:
        return 1
    sys.stdout.write(result["access_token"] + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
