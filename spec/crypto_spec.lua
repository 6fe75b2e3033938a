-- spec/crypto_spec.lua — oauthmail.crypto against published known answers
-- (RFC 4231, FIPS 180-2, McGrew-Viega GCM, RFC 4648, RFC 7914, RFC 7515) and
-- against the openssl command line for signatures and thumbprints.
local crypto = require "oauthmail.crypto"
local errors = require "oauthmail.errors"
local h = require "spec.support.helpers"
local certs = require "spec.support.certs"

local function unhex(s)
  return (s:gsub("%s", ""):gsub("..", function(x) return string.char(tonumber(x, 16)) end))
end

local function run(cmd)
  local ok, out = h.exec(cmd)
  assert(ok, cmd .. "\n" .. out)
  return out
end

-- R||S (JWS) -> DER ECDSA-Sig-Value, so `openssl dgst -verify` can check it.
local function der_int(b)
  b = b:gsub("^%z+", "")
  if b == "" or b:byte(1) >= 0x80 then b = "\0" .. b end
  return "\2" .. string.char(#b) .. b
end
local function raw_to_der(sig)
  local body = der_int(sig:sub(1, 32)) .. der_int(sig:sub(33, 64))
  return "\48" .. string.char(#body) .. body
end

local function expect_err(kind, reason, ok, err)
  assert.is_nil(ok)
  assert.is_true(errors.is(err), "expected an error value, got " .. tostring(err))
  assert.are.equal(kind, err.kind)
  assert.are.equal(reason, err.reason)
  return err
end

describe("crypto digests", function()
  it("SHA-256 known answers (FIPS 180-2)", function()
    assert.are.equal("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", crypto.hex(crypto.sha256("")))
    assert.are.equal("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", crypto.hex(crypto.sha256("abc")))
    assert.are.equal("248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
      crypto.hex(crypto.sha256("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")))
    assert.are.equal("cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0",
      crypto.hex(crypto.sha256(string.rep("a", 1000000))))
    assert.are.equal(32, #crypto.sha256("x"))
  end)

  it("HMAC-SHA-256 (RFC 4231 test cases 1-4, 6, 7)", function()
    local cases = {
      { string.rep("\11", 20), "Hi There", "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7" },
      { "Jefe", "what do ya want for nothing?", "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843" },
      { string.rep("\170", 20), string.rep("\221", 50), "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe" },
      { unhex("0102030405060708090a0b0c0d0e0f10111213141516171819"), string.rep("\205", 50),
        "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b" },
      { string.rep("\170", 131), "Test Using Larger Than Block-Size Key - Hash Key First",
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54" },
      { string.rep("\170", 131), "This is a test using a larger than block-size key and a larger than block-size data." ..
        " The key needs to be hashed before being used by the HMAC algorithm.",
        "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2" },
    }
    for i, c in ipairs(cases) do
      assert.are.equal(c[3], crypto.hex(crypto.hmac_sha256(c[1], c[2])), "RFC 4231 case " .. i)
    end
    -- Test case 5 is truncated to 128 bits.
    assert.are.equal("a3b6167473100ee06e0c796c2955552b",
      crypto.hex(crypto.hmac_sha256(string.rep("\12", 20), "Test With Truncation")):sub(1, 32))
  end)

  it("hex is lowercase and covers every byte", function()
    assert.are.equal("00ff7f80", crypto.hex("\0\255\127\128"))
    assert.are.equal("", crypto.hex(""))
  end)

  it("random gives the asked length and different bytes each time", function()
    local a, b = crypto.random(32), crypto.random(32)
    assert.are.equal(32, #a)
    assert.are_not.equal(a, b)
    assert.are.equal("", crypto.random(0))
    assert.has_error(function() crypto.random(-1) end)
  end)
end)

describe("crypto base64", function()
  local vectors = { { "", "" }, { "f", "Zg==" }, { "fo", "Zm8=" }, { "foo", "Zm9v" },
                    { "foob", "Zm9vYg==" }, { "fooba", "Zm9vYmE=" }, { "foobar", "Zm9vYmFy" } }

  it("encodes and decodes the RFC 4648 vectors", function()
    for _, v in ipairs(vectors) do
      assert.are.equal(v[2], crypto.b64encode(v[1]))
      assert.are.equal(v[1], crypto.b64decode(v[2]))
      local url = v[2]:gsub("=", "")
      assert.are.equal(url, crypto.b64url_encode(v[1]))
      assert.are.equal(v[1], crypto.b64url_decode(url))
      assert.are.equal(v[1], crypto.b64url_decode(v[2]), "base64url accepts correct padding too")
    end
  end)

  it("uses the two alphabets", function()
    local bytes = "\251\255\191"
    assert.are.equal("+/+/", crypto.b64encode(bytes))
    assert.are.equal("-_-_", crypto.b64url_encode(bytes))
    assert.are.equal(bytes, crypto.b64url_decode("-_-_"))
    local all = {}
    for i = 0, 255 do all[#all + 1] = string.char(i) end
    all = table.concat(all)
    assert.are.equal(all, crypto.b64decode(crypto.b64encode(all)))
    assert.are.equal(all, crypto.b64url_decode(crypto.b64url_encode(all)))
  end)

  it("rejects bad characters, bad padding and bad length (strict)", function()
    local bad = {
      "Zm9v!", "Zm9vYg=", "Zm9vYg", "Zm9vY===", "Zm=9vYg=", "Zm9v Yg==", "Zm9v\nYg==",
      "Zm9vYh==",  -- non-zero bits after the last byte
      "Z===", "Zm9vY", "-_-_", "====",
    }
    for _, s in ipairs(bad) do
      local ok, err = crypto.b64decode(s)
      expect_err("config", "decode", ok, err)
      assert.matches("invalid base64", err.message)
    end
  end)

  it("base64url rejects + / and garbage, and impossible lengths", function()
    for _, s in ipairs({ "+/+/", "ab+d", "ab/d", "a", "abcde", "ab$d", "ab.d", "ab==c" }) do
      local ok, err = crypto.b64url_decode(s)
      expect_err("config", "decode", ok, err)
      assert.matches("invalid base64url", err.message)
    end
  end)

  it("never repeats the input in the error", function()
    local secret = "c2VjcmV0LXZhbHVl!!"
    local _, err = crypto.b64decode(secret)
    assert.is_nil(tostring(err):find(secret, 1, true))
  end)
end)

describe("crypto AES-256-GCM", function()
  -- McGrew & Viega, "The Galois/Counter Mode of Operation", test cases 13-16 (256-bit key).
  local K0 = string.rep("\0", 32)
  local K = unhex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
  local IV = unhex("cafebabefacedbaddecaf888")
  local P = unhex("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72" ..
                  "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255")
  local C = unhex("522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa" ..
                  "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad")
  local A = unhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")

  it("matches the known-answer vectors when sealing with a fixed nonce (test hook)", function()
    local zero_iv = string.rep("\0", 12)
    assert.are.equal(zero_iv .. unhex("530f8afbc74536b9a963b4f1c4cb738b"),
      crypto._gcm_seal_with_nonce(K0, zero_iv, ""))
    assert.are.equal(zero_iv .. unhex("cea7403d4d606b6e074ec5d3baf39d18") .. unhex("d0d1c8a799996bf0265b98b5d48ab919"),
      crypto._gcm_seal_with_nonce(K0, zero_iv, string.rep("\0", 16)))
    assert.are.equal(IV .. C .. unhex("b094dac5d93471bdec1a502270e3cc6c"), crypto._gcm_seal_with_nonce(K, IV, P))
    assert.are.equal(IV .. C:sub(1, 60) .. unhex("76fc6ece0f4e1768cddf8853bb2d551b"),
      crypto._gcm_seal_with_nonce(K, IV, P:sub(1, 60), A))
  end)

  it("opens the known-answer blobs (nonce .. ciphertext .. tag)", function()
    assert.are.equal(P, crypto.aead_open(K, IV .. C .. unhex("b094dac5d93471bdec1a502270e3cc6c")))
    assert.are.equal(P:sub(1, 60), crypto.aead_open(K, IV .. C:sub(1, 60) .. unhex("76fc6ece0f4e1768cddf8853bb2d551b"), A))
  end)

  it("seals with a fresh nonce and round-trips", function()
    local key = crypto.random(32)
    local a = crypto.aead_seal(key, "token data", "store-v1")
    local b = crypto.aead_seal(key, "token data", "store-v1")
    assert.are.equal(12 + #"token data" + 16, #a)
    assert.are_not.equal(a:sub(1, 12), b:sub(1, 12))
    assert.are.equal("token data", crypto.aead_open(key, a, "store-v1"))
    assert.are.equal("", crypto.aead_open(key, crypto.aead_seal(key, "")))
  end)

  it("detects any flipped byte, a wrong key, wrong AAD and truncation", function()
    local key = crypto.random(32)
    local blob = crypto.aead_seal(key, "refresh-token-value", "aad")
    for i = 1, #blob do
      local flipped = blob:sub(1, i - 1) .. string.char((blob:byte(i) + 1) % 256) .. blob:sub(i + 1)
      local ok, err = crypto.aead_open(key, flipped, "aad")
      expect_err("config", "auth_failed", ok, err)
      assert.are.equal("decryption failed: wrong key or data was modified", err.message)
    end
    expect_err("config", "auth_failed", crypto.aead_open(crypto.random(32), blob, "aad"))
    expect_err("config", "auth_failed", crypto.aead_open(key, blob, "other"))
    expect_err("config", "auth_failed", crypto.aead_open(key, blob))
    expect_err("config", "auth_failed", crypto.aead_open(key, blob:sub(1, 27), "aad"))
    expect_err("config", "auth_failed", crypto.aead_open(key, blob:sub(1, -2), "aad"))
  end)

  it("raises on a key that is not 32 bytes (programmer error)", function()
    assert.has_error(function() crypto.aead_seal("short", "x") end)
    assert.has_error(function() crypto.aead_open(string.rep("k", 31), string.rep("x", 40)) end)
  end)

  -- OpenSSL takes int lengths; 2^31 bytes of additional data must be refused,
  -- not cut or turned negative. LuaJIT strings cannot be that long.
  if not jit then
    it("refuses additional data over INT_MAX bytes", function()
      local key = crypto.random(32)
      local parts, mb = {}, string.rep("a", 2 ^ 20)
      for i = 1, 2 ^ 11 do parts[i] = mb end
      local big = table.concat(parts)  -- string.rep stops at INT_MAX on 5.4
      parts = nil  -- luacheck: ignore
      assert.are.equal(2 ^ 31, #big)
      local blob = crypto.aead_seal(key, "x", "aad")
      local function expect_raise(f, ...)
        local ok, err = pcall(f, ...)
        assert.is_false(ok)
        assert.matches("additional data too large", tostring(err), 1, true)
      end
      expect_raise(crypto.aead_seal, key, "x", big)
      expect_raise(crypto.aead_open, key, blob, big)
      expect_raise(crypto._gcm_seal_with_nonce, key, string.rep("n", 12), "x", big)
      big = nil  -- luacheck: ignore
      collectgarbage()
    end)
  end
end)

describe("crypto scrypt", function()
  it("matches RFC 7914 section 12 vectors", function()
    assert.are.equal("77d6576238657b203b19ca42c18a0497f16b4844e3074ae8dfdffa3fede21442" ..
      "fcd0069ded0948f8326a753a0fc81f17e8d3e0fb2e0d3628cf35e20c38d18906",
      crypto.hex(crypto.scrypt("", "", { N = 16, r = 1, p = 1, len = 64 })))
    assert.are.equal("fdbabe1c9d3472007856e7190d01e9fe7c6ad7cbc8237830e77376634b373162" ..
      "2eaf30d92e22a3886ff109279d9830dac727afb94a83ee6d8360cbdfa2cc0640",
      crypto.hex(crypto.scrypt("password", "NaCl", { N = 1024, r = 8, p = 16, len = 64 })))
  end)

  it("defaults to N=32768, r=8, p=1, 32 bytes", function()
    local k = crypto.scrypt("pass phrase", "salt-salt-salt-1")
    assert.are.equal(32, #k)
    assert.are.equal(k, crypto.scrypt("pass phrase", "salt-salt-salt-1", { N = 32768, r = 8, p = 1, len = 32 }))
    assert.are_not.equal(k, crypto.scrypt("pass phrase", "salt-salt-salt-2"))
  end)

  it("raises on impossible parameters", function()
    assert.has_error(function() crypto.scrypt("p", "s", { N = 1000 }) end)
    assert.has_error(function() crypto.scrypt("p", "s", { len = 0 }) end)
    assert.has_error(function() crypto.scrypt(nil, "s") end)
  end)
end)

describe("crypto signatures", function()
  local dir, rsa_pem, ec_pem, rsa_pub, ec_pub
  local input = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ0ZXN0In0"

  setup(function()
    dir = h.tmpdir()
    run("openssl genrsa -out " .. dir .. "/rsa.pem 2048")
    run("openssl rsa -in " .. dir .. "/rsa.pem -pubout -out " .. dir .. "/rsa.pub")
    run("openssl ecparam -name prime256v1 -genkey -noout -out " .. dir .. "/ec.pem")
    run("openssl ec -in " .. dir .. "/ec.pem -pubout -out " .. dir .. "/ec.pub")
    run("openssl ecparam -name secp384r1 -genkey -noout -out " .. dir .. "/ec384.pem")
    run("openssl pkcs8 -topk8 -in " .. dir .. "/rsa.pem -v2 aes-256-cbc -passout pass:correct-horse -out " .. dir .. "/rsa_enc.pem")
    run("openssl rsa -in " .. dir .. "/rsa.pem -aes256 -traditional -passout pass:correct-horse -out " .. dir .. "/rsa_trad.pem")
    rsa_pem, ec_pem = h.read_file(dir .. "/rsa.pem"), h.read_file(dir .. "/ec.pem")
    rsa_pub, ec_pub = dir .. "/rsa.pub", dir .. "/ec.pub"
    h.write_file(dir .. "/input", input)
  end)

  local function verify(pub, sig, extra)
    h.write_file(dir .. "/sig", sig)
    return h.exec("openssl dgst -sha256 -verify " .. pub .. " -signature " .. dir .. "/sig " .. (extra or "") .. " " .. dir .. "/input")
  end

  it("RS256 verifies with openssl", function()
    local sig = assert(crypto.sign("RS256", rsa_pem, input))
    assert.are.equal(256, #sig)
    local ok, out = verify(rsa_pub, sig)
    assert.is_true(ok, out)
    -- flip the last byte (replacing it with a constant is a no-op 1 time in 256)
    assert.is_false((verify(rsa_pub, sig:sub(1, -2) .. string.char((sig:byte(-1) + 1) % 256))))
  end)

  it("PS256 (salt length 32) verifies with openssl", function()
    local sig = assert(crypto.sign("PS256", rsa_pem, input))
    local pss = "-sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:32"
    local ok, out = verify(rsa_pub, sig, pss)
    assert.is_true(ok, out)
    -- PSS is randomised; PKCS#1 v1.5 verification must fail on it.
    assert.are_not.equal(sig, crypto.sign("PS256", rsa_pem, input))
    assert.is_false((verify(rsa_pub, sig)))
  end)

  it("ES256 is raw R||S (64 bytes) and verifies with openssl after DER conversion", function()
    for _ = 1, 5 do  -- several, so a short R or S (leading zero) is likely covered
      local sig = assert(crypto.sign("ES256", ec_pem, input))
      assert.are.equal(64, #sig)
      local ok, out = verify(ec_pub, raw_to_der(sig))
      assert.is_true(ok, out)
    end
  end)

  -- luacheck: push no max line length
  it("RFC 7515 appendix A.2: exact RS256 signature", function()
    local jwk = [[{"kty":"RSA",
      "n":"ofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd_wWJcyQoTbji9k0l8W26mPddxHmfHQp-Vaw-4qPCJrcS2mJPMEzP1Pt0Bm4d4QlL-yRT-SFd2lZS-pCgNMsD1W_YpRPEwOWvG6b32690r2jZ47soMZo9wGzjb_7OMg0LOL-bSf63kpaSHSXndS5z5rexMdbBYUsLA9e-KXBdQOS-UTo7WTBEMa2R2CapHg665xsmtdVMTBQY4uDZlxvb3qCo5ZwKh9kG4LT6_I5IhlJH7aGhyxXFvUK-DWNmoudF8NAco9_h9iaGNj8q2ethFkMLs91kzk2PAcDTW9gb54h4FRWyuXpoQ",
      "e":"AQAB",
      "d":"Eq5xpGnNCivDflJsRQBXHx1hdR1k6Ulwe2JZD50LpXyWPEAeP88vLNO97IjlA7_GQ5sLKMgvfTeXZx9SE-7YwVol2NXOoAJe46sui395IW_GO-pWJ1O0BkTGoVEn2bKVRUCgu-GjBVaYLU6f3l9kJfFNS3E0QbVdxzubSu3Mkqzjkn439X0M_V51gfpRLI9JYanrC4D4qAdGcopV_0ZHHzQlBjudU2QvXt4ehNYTCBr6XCLQUShb1juUO1ZdiYoFaFQT5Tw8bGUl_x_jTj3ccPDVZFD9pIuhLhBOneufuBiB4cS98l2SR_RQyGWSeWjnczT0QU91p1DhOVRuOopznQ",
      "p":"4BzEEOtIpmVdVEZNCqS7baC4crd0pqnRH_5IB3jw3bcxGn6QLvnEtfdUdiYrqBdss1l58BQ3KhooKeQTa9AB0Hw_Py5PJdTJNPY8cQn7ouZ2KKDcmnPGBY5t7yLc1QlQ5xHdwW1VhvKn-nXqhJTBgIPgtldC-KDV5z-y2XDwGUc",
      "q":"uQPEfgmVtjL0Uyyx88GZFF1fOunH3-7cepKmtH4pxhtCoHqpWmT8YAmZxaewHgHAjLYsp1ZSe7zFYHj7C6ul7TjeLQeZD_YwD66t62wDmpe_HlB-TnBA-njbglfIsRLtXlnDzQkv5dTltRJ11BKBBypeeF6689rjcJIDEz9RWdc",
      "dp":"BwKfV3Akq5_MFZDFZCnW-wzl-CCo83WoZvnLQwCTeDv8uzluRSnm71I3QCLdhrqE2e9YkxvuxdBfpT_PI7Yz-FOKnu1R6HsJeDCjn12Sk3vmAktV2zb34MCdy7cpdTh_YVr7tss2u6vneTwrA86rZtu5Mbr1C1XsmvkxHQAdYo0",
      "dq":"h_96-mK1R_7glhsum81dZxjTnYynPbZpHziZjeeHcXYsXaaMwkOlODsWa7I9xXDoRwbKgB719rrmI2oKr6N3Do9U0ajaHF-NKJnwgjMd2w9cjz3_-kyNlxAr2v4IKhGNpmM5iIgOS1VZnOZ68m6_pbLBSp3nssTdlqvd0tIiTHU",
      "qi":"IYd7DHOhrWvxkwPQsRM2tOgrjbcrfvtQJipd-DlcxyVuuM9sQLdgjVk2oy26F0EmpScGLq2MowX7fhd_QJQ3ydy5cY7YIBi87w93IKLEdfnbJtoOPLUW0ITrJReOgo1cq9SbsxYawBgfp_gh6A5603k2-ZQwVK0JKSHuLFkuQ3U"}]]
    -- The RFC publishes the key as a JWK; node turns it into PEM at run time.
    h.write_file(dir .. "/a2.jwk", jwk)
    local pem = run("node -e \"const c=require('crypto');const fs=require('fs');" ..
      "process.stdout.write(c.createPrivateKey({key:JSON.parse(fs.readFileSync(process.argv[1],'utf8')),format:'jwk'})" ..
      ".export({type:'pkcs8',format:'pem'}))\" " .. dir .. "/a2.jwk")
    local a2_input = "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ"
    local expected = "cC4hiUPoj9Eetdgtv3hF80EGrhuB__dzERat0XF9g2VtQgr9PJbu3XOiZj5RZmh7AAuHIm4Bh-0Qc_lF5YKt_O8W2Fp5jujGbds9uJdbF9CUAr7t1dnZcAcQjbKBYNX4BAynRFdiuB--f_nZLgrnbyTyWzO75vRK5h6xBArLIARNPvkSjtQBMHlb1L07Qe7K0GarZRmB_eSN9383LcOLn6_dO--xi12jzDwusC-eOkHWEsqtFZESc6BfI7noOPqvhJ1phCnvWh6IeYI2w9QOYEUipUTI8np6LbgGY9Fs98rqVt5AXLIhWkWywlVmtVrBp0igcN_IoypGlUPQGe77Rw"
    assert.are.equal(expected, crypto.b64url_encode(assert(crypto.sign("RS256", pem, a2_input))))
  end)
  -- luacheck: pop

  it("signs with a passphrase-protected key (PKCS#8 and traditional PEM)", function()
    for _, f in ipairs({ "rsa_enc.pem", "rsa_trad.pem" }) do
      local pem = h.read_file(dir .. "/" .. f)
      local sig = assert(crypto.sign("RS256", pem, input, "correct-horse"))
      local ok, out = verify(rsa_pub, sig)
      assert.is_true(ok, out)
      local no, err = crypto.sign("RS256", pem, input, "wrong-horse")
      expect_err("config", "passphrase", no, err)
      assert.matches("wrong passphrase", err.message)
      assert.is_nil(tostring(err):find("wrong-horse", 1, true))
      no, err = crypto.sign("RS256", pem, input)
      expect_err("config", "passphrase", no, err)
      assert.matches("passphrase is required", err.message)
    end
  end)

  it("refuses a key of the wrong type with a clear message", function()
    local no, err = crypto.sign("ES256", rsa_pem, input)
    expect_err("config", "key", no, err)
    assert.matches("ES256 needs an EC P%-256 key, but the key is an RSA key", err.message)
    no, err = crypto.sign("RS256", ec_pem, input)
    expect_err("config", "key", no, err)
    assert.matches("RS256 needs an RSA key, but the key is an EC key", err.message)
    no, err = crypto.sign("ES256", h.read_file(dir .. "/ec384.pem"), input)
    expect_err("config", "key", no, err)
    assert.matches("not on curve P%-256", err.message)
  end)

  it("refuses things that are not keys", function()
    local no, err = crypto.sign("RS256", dir .. "/rsa.pem", input)
    expect_err("config", "key", no, err)
    assert.matches("not PEM text", err.message)
    expect_err("config", "key", crypto.sign("RS256", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", input))
    assert.has_error(function() crypto.sign("HS256", rsa_pem, input) end)
  end)

  it("jws_sign builds a compact JWS that verifies, with header extras", function()
    local jws = assert(crypto.jws_sign { alg = "RS256", key = rsa_pem, header = { kid = "k1", x5t = "abc" },
                                        payload = { iss = "client", aud = "https://login.example/token", exp = 1700000000 } })
    local h64, p64, s64 = jws:match("^([%w_-]+)%.([%w_-]+)%.([%w_-]+)$")
    assert.truthy(h64)
    assert.are.equal('{"alg":"RS256","typ":"JWT","kid":"k1","x5t":"abc"}', crypto.b64url_decode(h64))
    local header, claims = crypto.jwt_decode(jws)
    assert.are.same({ alg = "RS256", typ = "JWT", kid = "k1", x5t = "abc" }, header)
    assert.are.same({ iss = "client", aud = "https://login.example/token", exp = 1700000000 }, claims)
    h.write_file(dir .. "/input", h64 .. "." .. p64)
    local ok, out = verify(rsa_pub, crypto.b64url_decode(s64))
    h.write_file(dir .. "/input", input)
    assert.is_true(ok, out)
  end)

  it("jws_sign ES256 and PS256, string payloads, and errors", function()
    local jws = assert(crypto.jws_sign { alg = "ES256", key = ec_pem, payload = "hello" })
    local p64, s64 = jws:match("^[%w_-]+%.([%w_-]+)%.([%w_-]+)$")
    assert.are.equal("hello", crypto.b64url_decode(p64))
    assert.are.equal(64, #crypto.b64url_decode(s64))
    assert.truthy(crypto.jws_sign { alg = "PS256", key = rsa_pem, payload = {} })
    local no, err = crypto.jws_sign { alg = "ES256", key = rsa_pem, payload = {} }
    expect_err("config", "key", no, err)
    assert.has_error(function() crypto.jws_sign { alg = "none", key = rsa_pem, payload = {} } end)
    assert.has_error(function() crypto.jws_sign { alg = "RS256", key = rsa_pem } end)
    assert.has_error(function() crypto.jws_sign { alg = "RS256", key = rsa_pem, payload = {}, header = { alg = "ES256" } } end)
  end)
end)

describe("crypto jwt_decode", function()
  it("decodes header and claims without verifying", function()
    local tok = "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ.c2ln"
    local header, claims = crypto.jwt_decode(tok)
    assert.are.same({ alg = "RS256" }, header)
    assert.are.equal("joe", claims.iss)
    assert.are.equal(1300819380, claims.exp)
    assert.is_true(claims["http://example.com/is_root"])
  end)

  it("takes objects with white space before them, arrays inside them and big finite numbers", function()
    local b64u = crypto.b64url_encode
    local header, claims = crypto.jwt_decode(b64u(' \r\n\t{"alg":"none"}') .. "." ..
      b64u('{"scp":["a","b"],"exp":1e300,"n":-0.5}') .. ".")
    assert.same({ alg = "none" }, header)
    assert.same({ scp = { "a", "b" }, exp = 1e300, n = -0.5 }, claims)
  end)

  it("fails clearly on opaque, encrypted and broken tokens, never echoing them", function()
    local cases = {
      { "opaque-access-token-value", "expected 3 dot%-separated parts" },
      { "a.b.c.d.e", "encrypted %(JWE%)" },
      { "!!!.eyJ9.sig", "header is not base64url" },
      { "eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.sig", "payload is not a JSON object" },
      { "eyJhbGciOiJSUzI1NiJ9.MTIz.sig", "payload is not a JSON object" },
    }
    local function b64u(s) return crypto.b64url_encode(s) end
    local H = b64u('{"alg":"RS256"}')
    -- a JSON array decodes to a table too; NaN, Infinity and 1e999 to numbers
    -- that are not finite: none of them is a claims object (issue 12, defect 12)
    for _, bad in ipairs {
      { "[]", "payload is not a JSON object" },
      { ' ["a", "b"]', "payload is not a JSON object" },
      { "[{}]", "payload is not a JSON object" },
      { "NaN", "payload is not a JSON object" },
      { "Infinity", "payload is not a JSON object" },
      { '{"exp":NaN}', "payload holds a number that is not finite" },
      { '{"exp":-Infinity}', "payload holds a number that is not finite" },
      { '{"exp":1e999}', "payload holds a number that is not finite" },
      { '{"a":{"b":[1,2,{"c":Infinity}]}}', "payload holds a number that is not finite" },
    } do
      cases[#cases + 1] = { H .. "." .. b64u(bad[1]) .. ".sig", bad[2] }
    end
    cases[#cases + 1] = { b64u("[1]") .. "." .. b64u("{}") .. ".sig", "header is not a JSON object" }
    cases[#cases + 1] = { b64u('{"alg":NaN}') .. "." .. b64u("{}") .. ".sig", "header holds a number that is not finite" }
    for _, c in ipairs(cases) do
      local no, err = crypto.jwt_decode(c[1])
      expect_err("oauth", "decode", no, err)
      assert.matches(c[2], err.message)
      assert.is_nil(tostring(err):find(c[1], 1, true))
    end
  end)
end)

describe("crypto thumbprints", function()
  it("match openssl x509 -fingerprint; x5t / x5t#S256 are base64url of them", function()
    local c = certs.get()
    local pem = h.read_file(c.server.cert)
    for _, alg in ipairs({ "sha1", "sha256" }) do
      local out = run("openssl x509 -noout -fingerprint -" .. alg .. " -in " .. c.server.cert)
      local want = out:match("=([%x:]+)"):gsub(":", ""):lower()
      assert.are.equal(want, crypto.hex(crypto.thumbprint(pem, alg)))
    end
    assert.are.equal(crypto.b64url_encode(crypto.thumbprint(pem, "sha1")), crypto.x5t(pem))
    assert.are.equal(crypto.b64url_encode(crypto.thumbprint(pem, "sha256")), crypto.x5t_s256(pem))
    assert.are.equal(27, #crypto.x5t(pem))
    assert.are.equal(43, #crypto.x5t_s256(pem))
  end)

  it("fails clearly on something that is not a certificate", function()
    local no, err = crypto.x5t("not a certificate")
    expect_err("config", "cert", no, err)
    assert.matches("cannot read the certificate", err.message)
  end)
end)
