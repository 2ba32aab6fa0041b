#!/usr/bin/python3
"""A real Vault client (Debian's python3-hvac) against custodyd's Vault API.

Run by VaultServerTest.HvacLogsInReadsListsAndWrites with VAULT_ADDR (https),
VAULT_CACERT and PKI (a folder of NAME.pem / NAME.key client certificates).
Prints one "ok: ..." line per step and exits 0; any surprise raises, and the
test shows the traceback.
"""
import os
import sys

import hvac
import hvac.exceptions

addr = os.environ["VAULT_ADDR"]
ca = os.environ["VAULT_CACERT"]
pki = os.environ["PKI"]
expected = os.environ["EXPECTED_VALUE"]


def client(who):
    return hvac.Client(url=addr, verify=ca, cert=(f"{pki}/{who}.pem", f"{pki}/{who}.key"))


def step(what):
    print("ok: " + what, flush=True)


# A reader of payments/prod logs in with its certificate.
reader = client("web-prod")
login = reader.auth.cert.login()
assert login["auth"]["client_token"].startswith("cst."), login["auth"].keys()
assert "svc:web-prod" in login["auth"]["policies"], login["auth"]["policies"]
assert login["auth"]["renewable"] is True
assert reader.is_authenticated()
step("cert login as svc:web-prod")

r = reader.secrets.kv.v2.read_secret_version(path="prod/stripe", mount_point="payments")
assert r["data"]["data"] == {"value": expected}, r["data"]["data"].keys()
assert r["data"]["metadata"]["version"] == 1 and r["data"]["metadata"]["destroyed"] is False
step("read_secret_version payments prod/stripe v1")

keys = reader.secrets.kv.v2.list_secrets(path="prod", mount_point="payments")["data"]["keys"]
assert keys == ["stripe"], keys
step("list_secrets payments prod")

try:
    reader.secrets.kv.v2.create_or_update_secret(path="prod/stripe", secret={"value": "nope"},
                                                  mount_point="payments")
    raise AssertionError("a reader wrote a secret")
except hvac.exceptions.Forbidden:
    step("a reader's write is Forbidden")

# An owner writes a new version; the reader sees it.
deployer = client("deploy")
deployer.auth.cert.login()
w = deployer.secrets.kv.v2.create_or_update_secret(path="prod/stripe", secret={"value": "rotated-by-hvac"},
                                                   mount_point="payments")
assert w["data"]["version"] == 2, w["data"]
step("create_or_update_secret by svc:deploy made version 2")
r = reader.secrets.kv.v2.read_secret_version(path="prod/stripe", mount_point="payments")
assert r["data"]["data"]["value"] == "rotated-by-hvac" and r["data"]["metadata"]["version"] == 2
step("the reader reads version 2")

# Check-and-set: a write that names a version no longer the newest is
# refused as Vault refuses it, and nothing is stored.
try:
    deployer.secrets.kv.v2.create_or_update_secret(path="prod/stripe", secret={"value": "stale-write"},
                                                   cas=1, mount_point="payments")
    raise AssertionError("a stale check-and-set write was stored")
except hvac.exceptions.InvalidRequest as e:
    assert "check-and-set parameter did not match the current version" in str(e), str(e)
    step("a write with cas=1 on version 2 is InvalidRequest")
r = reader.secrets.kv.v2.read_secret_version(path="prod/stripe", mount_point="payments")
assert r["data"]["data"]["value"] == "rotated-by-hvac" and r["data"]["metadata"]["version"] == 2
step("the refused write stored nothing")

# Destroy: a version withdrawn for good (custody's revoke). Not for a
# reader; an owner may.
try:
    reader.secrets.kv.v2.destroy_secret_versions(path="prod/stripe", versions=[1], mount_point="payments")
    raise AssertionError("a reader destroyed a version")
except hvac.exceptions.Forbidden:
    step("a reader's destroy is Forbidden")
deployer.secrets.kv.v2.destroy_secret_versions(path="prod/stripe", versions=[1], mount_point="payments")
meta = deployer.secrets.kv.v2.read_secret_metadata(path="prod/stripe", mount_point="payments")["data"]
assert meta["versions"]["1"]["destroyed"] is True and meta["versions"]["2"]["destroyed"] is False, meta
assert meta["current_version"] == 2, meta
step("destroy_secret_versions [1] by svc:deploy: version 1 destroyed, 2 current")

# Another principal cannot read payments, but reads its own project.
other = client("other")
other.auth.cert.login()
try:
    other.secrets.kv.v2.read_secret_version(path="prod/stripe", mount_point="payments")
    raise AssertionError("svc:other read payments")
except hvac.exceptions.Forbidden:
    step("svc:other cannot read payments")
r = other.secrets.kv.v2.read_secret_version(path="prod/invoice-key", mount_point="billing")
assert r["data"]["data"]["value"] == "billing-value"
step("svc:other reads billing")

renewed = reader.auth.token.renew_self()
assert renewed["auth"]["lease_duration"] > 0
step("renew_self")

# A made-up token is refused as Vault refuses one.
stranger = hvac.Client(url=addr, verify=ca, cert=(f"{pki}/web-prod.pem", f"{pki}/web-prod.key"),
                       token="cst." + "A" * 32)
try:
    stranger.secrets.kv.v2.read_secret_version(path="prod/stripe", mount_point="payments")
    raise AssertionError("an unknown token was accepted")
except hvac.exceptions.Forbidden:
    step("an unknown token is Forbidden")
print("token-of-reader: " + reader.token, file=sys.stderr)
