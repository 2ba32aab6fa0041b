#!/usr/bin/env bash
# The README's first command: install what is missing, build, and run custody
# on an embedded default: a SoftHSM2 token and a SQLite store in ./state.
# It applies a policy that declares a project with dev/staging/prod (which
# creates its KEK in the token), seals an API-key-shaped secret into prod,
# then does the main job: starts custodyd on a socket in the state folder and
# fetches the key as a production server would (custody exec, then curl),
# shows another local user refused by policy with its audit record, and stops
# custodyd with SIGTERM. Then it rotates, shows usage and what the token
# holds, and verifies the audit log (also with stock openssl) and an
# attestation statement. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

bash ci/install-deps.sh
# CUSTODY_DEMO_PRESET: another build of the same sources (CI runs the demo
# on the `dev` build its tests use, so the run builds the code once fewer).
preset="${CUSTODY_DEMO_PRESET:-release}"
cmake --preset "$preset" >/dev/null
cmake --build --preset "$preset" --target custody custody-full custodyd

custody="$root/build/$preset/tools/custody"
custodyd="$root/build/$preset/tools/custodyd"
state="${CUSTODY_STATE_DIR:-$root/state}"
umask 077
mkdir -p "$state/softhsm/tokens"

export SOFTHSM2_CONF="$state/softhsm/softhsm2.conf"
export CUSTODY_CONFIG="$state/custody.toml"

# The token's PINs are random and live only in owner-only files, never in argv
# of custody (softhsm2-util, a set-up tool, takes them as arguments once).
if [[ ! -f "$state/softhsm/user.pin" ]]; then
  printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' \
    "$state/softhsm/tokens" > "$SOFTHSM2_CONF"
  head -c 24 /dev/urandom | base64 | tr -d '/+=' > "$state/softhsm/user.pin"
  head -c 24 /dev/urandom | base64 | tr -d '/+=' > "$state/softhsm/so.pin"
  softhsm2-util --init-token --free --label custody \
    --so-pin "$(cat "$state/softhsm/so.pin")" --pin "$(cat "$state/softhsm/user.pin")" >/dev/null
  echo "demo: created SoftHSM2 token 'custody' in $state/softhsm"
fi

if [[ ! -f "$CUSTODY_CONFIG" ]]; then
  "$custody" init --module /usr/lib/softhsm/libsofthsm2.so --token "pkcs11:token=custody" \
    --pin-file "$state/softhsm/user.pin" --state-dir "$state" --module-env "SOFTHSM2_CONF=$SOFTHSM2_CONF"
fi

# Another local account, for the CI principal of the policy below: the demo
# shows custodyd refusing it the production key.
demo_ci_user=custody-demo-ci
if ! id -u "$demo_ci_user" >/dev/null 2>&1; then
  useradd --system --no-create-home --shell /usr/sbin/nologin "$demo_ci_user"
  echo "demo: created the local account $demo_ci_user (the policy's CI principal)"
fi

# Policy as code: the operator running this demo is admin and owner; a
# production web service may read prod only; CI reaches dev and staging only.
# Applying it creates the project, its environments and its KEK.
cat > "$state/policy.toml" <<POLICY
version = 1
admins = ["user:operator"]

[principals."user:operator"]
uid = $(id -u)
[principals."svc:web-prod"]
tls_san = "web.prod.demo.internal"
[principals."svc:ci"]
unix_user = "$demo_ci_user"

[projects.demo]
rate = "600/min"
unseals_per_day = 10000
max_age = "90d"
grace = "24h"
keep_versions = 5

[projects.demo.environments.dev]
production = false
[projects.demo.environments.staging]
production = false
[projects.demo.environments.prod]
rate = "120/min"

[[projects.demo.grants]]
principal = "user:operator"
role = "owner"
[[projects.demo.grants]]
principal = "svc:web-prod"
role = "reader"
environments = ["prod"]
[[projects.demo.grants]]
principal = "svc:ci"
role = "ci"
POLICY
"$custody" policy check "$state/policy.toml"
"$custody" policy apply "$state/policy.toml"

# An API-key-shaped value, made here so it is never typed or shown in full.
key="sk-demo-$(head -c 32 /dev/urandom | base64 | tr -d '/+=' | head -c 40)"
printf '%s' "$key" | "$custody" secret put demo/prod/openai-api-key
back="$("$custody" secret get demo/prod/openai-api-key)"
if [[ "$back" != "$key" ]]; then
  echo "demo: the value read back differs from the one sealed" >&2
  exit 1
fi
echo "demo: read back demo/prod/openai-api-key = ${back:0:11}... (${#back} bytes, matches what was sealed)"
unset key back

echo
echo "demo: the main job: custodyd serves the keys to production servers over a Unix socket"
# The socket lives in the state folder; other local users may reach it
# (the folders are traversable, not listable), and the policy decides. When
# a folder above the state folder keeps other users out (a private temporary
# folder, a home folder), the socket goes to /run/custody-demo instead:
# loosening someone's home folder is not the demo's business.
mkdir -p "$state/run"
chmod 0711 "$state" "$state/run"
if runuser -u "$demo_ci_user" -- test -x "$state/run"; then
  sock_dir="$state/run"
else
  sock_dir=/run/custody-demo
  mkdir -p "$sock_dir"
  chmod 0755 "$sock_dir"
  echo "demo: $state is not reachable by other local users; the socket goes to $sock_dir"
fi
sock="$sock_dir/custody.sock"
if ! grep -q '^\[server\]' "$CUSTODY_CONFIG"; then
  printf '\n[server]\nsocket = "%s"\n' "$sock" >> "$CUSTODY_CONFIG"
fi
sock="$(sed -n 's/^socket = "\(.*\)"$/\1/p' "$CUSTODY_CONFIG" | tail -n 1)"
"$custodyd" 2> "$state/custodyd.log" &
custodyd_pid=$!
trap 'kill "$custodyd_pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  [[ -S "$sock" ]] && curl -sf --unix-socket "$sock" http://custody/v1/health >/dev/null 2>&1 && break
  if ! kill -0 "$custodyd_pid" 2>/dev/null; then
    break
  fi
  sleep 0.1
done
if ! curl -sf --unix-socket "$sock" http://custody/v1/health >/dev/null 2>&1; then
  echo "demo: custodyd did not start serving on $sock:" >&2
  cat "$state/custodyd.log" >&2
  exit 1
fi
echo "demo: custodyd is serving on $sock (pid $custodyd_pid); it holds the token PIN, its clients never do"
export CUSTODY_ADDR="unix:$sock"
echo "demo: custody exec: the child process sees the key in its environment only"
"$custody" exec --env OPENAI_API_KEY=demo/prod/openai-api-key -- \
  sh -c 'echo "  child: OPENAI_API_KEY has ${#OPENAI_API_KEY} bytes and starts with ${OPENAI_API_KEY%"${OPENAI_API_KEY#????????}"}..."'
echo "demo: the same over HTTP on the socket (the value masked here by the demo):"
curl -s --unix-socket "$sock" http://custody/v1/secrets/demo/prod/openai-api-key |
  sed -E 's/("value":")(.{8})[^"]*"/\1\2...(masked)"/'
echo
echo "demo: the CI account ($demo_ci_user) asks for the production key: refused by policy"
runuser -u "$demo_ci_user" -- curl -s --unix-socket "$sock" http://custody/v1/secrets/demo/prod/openai-api-key
echo
echo "demo: ... and the audit record that says so:"
"$custody" audit show --project demo --since 5m | grep -E 'svc:ci.*deny|deny.*svc:ci' | tail -n 1
unset CUSTODY_ADDR
kill -TERM "$custodyd_pid"
wait "$custodyd_pid"
echo "demo: custodyd stopped on SIGTERM (exit 0)"
trap - EXIT
"$custody" audit verify

echo
echo "demo: may CI read the production key? (deny by design)"
"$custody" policy explain svc:ci get demo/prod/openai-api-key || true
echo
echo "demo: rotation: a new value from the token's RNG; the old one stays readable for the grace period"
"$custody" secret rotate demo/prod/openai-api-key --generate 32 --prefix sk-demo-
"$custody" secret versions demo/prod/openai-api-key
"$custody" rotation status demo --fail-on-overdue
echo
echo "demo: KEK rotation: a new KEK in the token, every version re-sealed, the old KEK destroyed"
"$custody" kek rotate demo
"$custody" kek list demo
echo
"$custody" project list
echo
"$custody" secret list demo
echo
"$custody" usage demo
echo
"$custody" token info
echo
echo "demo: the audit trail, its signed checkpoint, and a check with the stock openssl command"
"$custody" audit show --project demo --since 1h
"$custody" audit checkpoint
"$custody" audit pubkey --out "$state/audit.pem"
"$custody" audit verify
latest="$(ls "$state/audit/checkpoints/"*.msg | tail -n 1)"
openssl dgst -sha256 -verify "$state/audit.pem" -signature "${latest%.msg}.sig" "$latest"
echo
echo "demo: attestation: a signed statement of the keys, the policy and the audit head, bound to a nonce"
nonce="$(openssl rand -hex 16)"
"$custody" attest --nonce "$nonce" --out "$state/statement.json" --pubkey-out "$state/attest.pem"
"$custody" attest verify "$state/statement.json" --pubkey "$state/attest.pem" --nonce "$nonce"
openssl dgst -sha256 -verify "$state/attest.pem" -signature "$state/statement.json.sig" "$state/statement.json.bin"
echo
echo "demo: state is in $state. To use it from this shell:"
echo "  export SOFTHSM2_CONF=$SOFTHSM2_CONF CUSTODY_CONFIG=$CUSTODY_CONFIG"
