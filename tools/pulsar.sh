#!/usr/bin/env bash
# Local Apache Pulsar standalone broker for Rendezvous (no Docker needed).
#
#   tools/pulsar.sh fetch    download + unpack the official distribution (Maven Central) once
#   tools/pulsar.sh up       start a fresh broker and wait until a produce/consume round trip works
#   tools/pulsar.sh down     stop it (SIGTERM, then SIGKILL)
#   tools/pulsar.sh restart  stop it and start it again with its data (topics, cursors) kept
#   tools/pulsar.sh status   exit 0 and print the URLs if healthy, non-zero otherwise
#   tools/pulsar.sh env      print PULSAR_SERVICE_URL / PULSAR_ADMIN_URL (/ PULSAR_TOKEN_FILE,
#                            PULSAR_TLS_TRUST_CERTS_FILE) lines
#
# Environment (all optional):
#   PULSAR_VERSION        distribution version                  (default 4.0.8)
#   PULSAR_BROKER_PORT    binary protocol port                  (default 6650)
#   PULSAR_WEB_PORT       HTTP admin port                       (default 8080)
#   PULSAR_RUN_DIR        config, data, logs, tokens            (default .run/pulsar)
#   PULSAR_AUTH           none | token: token authentication and authorization on `up`
#                         (a fresh secret key and tokens in PULSAR_RUN_DIR/auth, 0600)
#   PULSAR_TLS            none | on | only: TLS on `up`, the TLS ports beside the plaintext ones
#                         (on) or instead of them (only); a fresh local CA and a certificate for
#                         127.0.0.1 in PULSAR_RUN_DIR/tls (tools/certs.py); the URLs `env`
#                         prints are then pulsar+ssl:// and https://
#   PULSAR_BROKER_TLS_PORT  binary protocol port over TLS       (default 6651)
#   PULSAR_WEB_TLS_PORT     HTTPS admin port                    (default 8443)
#   PULSAR_START_TIMEOUT  seconds `up` waits for readiness      (default 180)
#   PULSAR_STOP_TIMEOUT   seconds `down` waits before SIGKILL   (default 15)
#   PULSAR_MEM, PULSAR_GC JVM heap/GC flags (defaults sized for 2 cores)
#   PYTHON                interpreter for the round-trip check and tools/certs.py
#                         (default .venv/bin/python, else python3)
#
# `status`, `env` and `restart` find the authentication and TLS of the broker `up` started in
# its run dir; the ports come from the same variables as for `up`. See docs/pulsar.md.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
readonly REPO_ROOT

PULSAR_VERSION="${PULSAR_VERSION:-4.0.8}"
PULSAR_BROKER_PORT="${PULSAR_BROKER_PORT:-6650}"
PULSAR_WEB_PORT="${PULSAR_WEB_PORT:-8080}"
PULSAR_START_TIMEOUT="${PULSAR_START_TIMEOUT:-180}"
PULSAR_STOP_TIMEOUT="${PULSAR_STOP_TIMEOUT:-15}"

readonly HOST=127.0.0.1
readonly MVN_DEP_PLUGIN=org.apache.maven.plugins:maven-dependency-plugin:3.8.1
readonly ARTIFACT_ID=pulsar-server-distribution
readonly CACHE_DIR="${REPO_ROOT}/.cache/pulsar"
readonly PULSAR_HOME_DIR="${CACHE_DIR}/apache-pulsar-${PULSAR_VERSION}"
readonly UNPACKED_MARKER="${PULSAR_HOME_DIR}/.rendezvous-unpacked"
PULSAR_AUTH="${PULSAR_AUTH:-none}"
PULSAR_TLS="${PULSAR_TLS:-none}"
PULSAR_BROKER_TLS_PORT="${PULSAR_BROKER_TLS_PORT:-6651}"
PULSAR_WEB_TLS_PORT="${PULSAR_WEB_TLS_PORT:-8443}"
RUN_DIR="${PULSAR_RUN_DIR:-${REPO_ROOT}/.run/pulsar}"
[[ "${RUN_DIR}" == /* ]] || RUN_DIR="${REPO_ROOT}/${RUN_DIR}"
readonly RUN_DIR
# Outside RUN_DIR, which `up` wipes.
readonly LOCK_FILE="${RUN_DIR}.lock"
# Token authentication (PULSAR_AUTH=token): the HS256 secret key, the token of the broker's
# own internal client, the clients' token (subject `rendezvous`; both are superusers) and
# a curl header file with it, so that no token ever appears on a command line.
readonly AUTH_DIR="${RUN_DIR}/auth"
readonly SECRET_KEY_FILE="${AUTH_DIR}/secret.key"
readonly BROKER_TOKEN_FILE="${AUTH_DIR}/broker.token"
readonly CLIENT_TOKEN_FILE="${AUTH_DIR}/client.token"
readonly ADMIN_HEADER_FILE="${AUTH_DIR}/admin.header"
readonly BROKER_ROLE=broker
# TLS (PULSAR_TLS=on|only): tools/certs.py's CA, server certificate (127.0.0.1, ::1,
# localhost) and key, made by `up`, kept by `restart`; `mode` records the choice for the
# commands that find it in the run dir.
readonly TLS_DIR="${RUN_DIR}/tls"
readonly TLS_CA_FILE="${TLS_DIR}/ca.pem"
readonly TLS_CERT_FILE="${TLS_DIR}/server.pem"
readonly TLS_KEY_FILE="${TLS_DIR}/server-key.pem"
readonly TLS_MODE_FILE="${TLS_DIR}/mode"
readonly CLIENT_ROLE=rendezvous
readonly PID_FILE="${RUN_DIR}/pulsar.pid"
readonly LOG_DIR="${RUN_DIR}/logs"
readonly CONF_TEMPLATE="${REPO_ROOT}/deploy/pulsar/standalone.conf"
readonly RENDERED_CONF="${RUN_DIR}/standalone.conf"
readonly STANDALONE_CLASS=org.apache.pulsar.PulsarStandaloneStarter

# Where clients connect: the TLS ports when TLS is on (set_urls, once the mode is known).
SERVICE_URL=""
ADMIN_URL=""
set_urls() {
    if [[ "${PULSAR_TLS}" == none ]]; then
        SERVICE_URL="pulsar://${HOST}:${PULSAR_BROKER_PORT}"
        ADMIN_URL="http://${HOST}:${PULSAR_WEB_PORT}"
    else
        SERVICE_URL="pulsar+ssl://${HOST}:${PULSAR_BROKER_TLS_PORT}"
        ADMIN_URL="https://${HOST}:${PULSAR_WEB_TLS_PORT}"
    fi
}

# The authentication and TLS of the broker `up` started in RUN_DIR (what status, env and
# restart must speak), whatever the caller's variables say.
find_run_security() {
    [[ -s "${CLIENT_TOKEN_FILE}" ]] && PULSAR_AUTH=token
    if [[ -s "${TLS_MODE_FILE}" ]]; then
        PULSAR_TLS="$(<"${TLS_MODE_FILE}")"
        [[ "${PULSAR_TLS}" == on || "${PULSAR_TLS}" == only ]] || die "${TLS_MODE_FILE} says '${PULSAR_TLS}'"
    fi
    return 0
}

log() { printf 'pulsar.sh: %s\n' "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

usage() {
    # The header comment, up to the first line that is not one.
    awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "${BASH_SOURCE[0]}"
}

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

validate_env() {
    local name
    for name in PULSAR_BROKER_PORT PULSAR_WEB_PORT PULSAR_BROKER_TLS_PORT PULSAR_WEB_TLS_PORT \
        PULSAR_START_TIMEOUT PULSAR_STOP_TIMEOUT; do
        is_uint "${!name}" || die "${name} must be a non-negative integer, got '${!name}'"
    done
    [[ "${PULSAR_VERSION}" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "PULSAR_VERSION must look like 4.0.8, got '${PULSAR_VERSION}'"
    [[ "${PULSAR_AUTH}" == none || "${PULSAR_AUTH}" == token ]] || die "PULSAR_AUTH must be none or token, got '${PULSAR_AUTH}'"
    [[ "${PULSAR_TLS}" =~ ^(none|on|only)$ ]] || die "PULSAR_TLS must be none, on or only, got '${PULSAR_TLS}'"
}

now() { date +%s.%N; }
elapsed_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# Install Debian packages when possible (fresh machines); otherwise explain what is missing.
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        die "missing $*; install it (no apt-get here)"
    fi
    local sudo=()
    if [[ "$(id -u)" -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 || die "missing $*; run as root or install it"
        sudo=(sudo)
    fi
    log "installing $* with apt-get"
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

java_bin() {
    if [[ -n "${JAVA_HOME:-}" && -x "${JAVA_HOME}/bin/java" ]]; then
        printf '%s\n' "${JAVA_HOME}/bin/java"
    elif command -v java >/dev/null 2>&1; then
        command -v java
    fi
}

# Major version of the given java binary (17 for "17.0.15", 1.8 -> 8).
java_major() {
    local line
    line="$("$1" -version 2>&1 | grep -m1 'version "')" || return 1
    if [[ "${line}" =~ \"1\.([0-9]+) ]]; then
        printf '%s\n' "${BASH_REMATCH[1]}"
    elif [[ "${line}" =~ \"([0-9]+) ]]; then
        printf '%s\n' "${BASH_REMATCH[1]}"
    else
        return 1
    fi
}

# Java release needed by the unpacked distribution: class-file major version of the
# standalone starter minus 44 (61 -> Java 17).  Falls back to 17 if it cannot be read.
required_java_major() {
    local jar
    jar="$(compgen -G "${PULSAR_HOME_DIR}/lib/org.apache.pulsar-pulsar-broker-${PULSAR_VERSION}.jar" || true)"
    if [[ -n "${jar}" ]] && command -v python3 >/dev/null 2>&1; then
        python3 - "${jar}" <<'PY' 2>/dev/null && return 0
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    head = z.read("org/apache/pulsar/PulsarStandaloneStarter.class")[:8]
assert head[:4] == b"\xca\xfe\xba\xbe"
print(int.from_bytes(head[6:8], "big") - 44)
PY
    fi
    printf '17\n'
}

ensure_java() {
    local need java have
    need="$(required_java_major)"
    java="$(java_bin)"
    have=0
    if [[ -n "${java}" ]]; then
        have="$(java_major "${java}" || echo 0)"
    fi
    if ((have >= need)); then
        return 0
    fi
    log "Pulsar ${PULSAR_VERSION} needs Java ${need}+; found: ${java:-none} (major ${have})"
    # bin/pulsar prefers JAVA_HOME; fall back to the java on PATH if that one is new enough.
    if [[ -n "${JAVA_HOME:-}" ]]; then
        unset JAVA_HOME
        java="$(java_bin)"
        if [[ -n "${java}" ]] && (($(java_major "${java}" || echo 0) >= need)); then
            log "ignoring JAVA_HOME; using ${java}"
            return 0
        fi
    fi
    apt_install "openjdk-${need}-jre-headless"
    java="$(java_bin)"
    have=0
    if [[ -n "${java}" ]]; then
        have="$(java_major "${java}" || echo 0)"
    fi
    ((have >= need)) || die "Java ${need}+ is still not the default java (${java:-none}: ${have}); set JAVA_HOME"
}

cmd_fetch() {
    if [[ -f "${UNPACKED_MARKER}" && -x "${PULSAR_HOME_DIR}/bin/pulsar" ]]; then
        log "Pulsar ${PULSAR_VERSION} already unpacked in ${PULSAR_HOME_DIR#"${REPO_ROOT}"/}"
        ensure_java
        return 0
    fi
    command -v mvn >/dev/null 2>&1 || apt_install maven
    command -v tar >/dev/null 2>&1 || apt_install tar
    mkdir -p "${CACHE_DIR}"

    local tarball="${CACHE_DIR}/${ARTIFACT_ID}-${PULSAR_VERSION}-bin.tar.gz"
    if [[ ! -s "${tarball}" ]]; then
        log "downloading org.apache.pulsar:${ARTIFACT_ID}:${PULSAR_VERSION}:tar.gz:bin from Maven Central (~240 MB, once; kept in ~/.m2)"
        # The dependency plugin is pinned: Maven 3.8.7's super POM would otherwise use 2.8.
        # It resolves into ~/.m2 first, so repeated fetches are local copies.
        # sed: Maven 3.8 prints stray colour resets (ESC[0m) even with -B -q.
        mvn -B -q "${MVN_DEP_PLUGIN}:copy" \
            -Dartifact="org.apache.pulsar:${ARTIFACT_ID}:${PULSAR_VERSION}:tar.gz:bin" \
            -DoutputDirectory="${CACHE_DIR}" 2>&1 | sed -e 's/\x1b\[[0-9;]*m//g' >&2 ||
            die "mvn could not fetch Pulsar ${PULSAR_VERSION} (does that version exist on Maven Central?)"
    fi
    [[ -s "${tarball}" ]] || die "expected ${tarball} after mvn copy"

    # Unpack into a scratch folder and move into place, so an interrupted run never leaves a
    # half-unpacked tree that looks complete.
    local scratch
    scratch="$(mktemp -d "${CACHE_DIR}/.unpack.XXXXXX")"
    log "unpacking into ${PULSAR_HOME_DIR#"${REPO_ROOT}"/}"
    if ! tar -xzf "${tarball}" -C "${scratch}"; then
        rm -rf "${scratch}"
        die "could not unpack ${tarball} (corrupt download? delete it and ~/.m2/repository/org/apache/pulsar/${ARTIFACT_ID}/${PULSAR_VERSION})"
    fi
    [[ -x "${scratch}/apache-pulsar-${PULSAR_VERSION}/bin/pulsar" ]] || {
        rm -rf "${scratch}"
        die "tarball does not contain apache-pulsar-${PULSAR_VERSION}/bin/pulsar"
    }
    rm -rf "${PULSAR_HOME_DIR}"
    mv "${scratch}/apache-pulsar-${PULSAR_VERSION}" "${PULSAR_HOME_DIR}"
    rmdir "${scratch}"
    touch "${UNPACKED_MARKER}"
    # ~/.m2 keeps a copy; no need for a second 240 MB file in the repo cache.
    rm -f "${tarball}"
    ensure_java
    log "Pulsar ${PULSAR_VERSION} ready in ${PULSAR_HOME_DIR#"${REPO_ROOT}"/}"
}

# --- process helpers -------------------------------------------------------------------

read_pid() {
    [[ -f "${PID_FILE}" ]] || return 1
    local pid
    pid="$(<"${PID_FILE}")"
    is_uint "${pid}" || return 1
    printf '%s\n' "${pid}"
}

# True if pid is alive and is our standalone broker (guards against pid reuse).
is_our_broker() {
    local pid="$1"
    [[ -r "/proc/${pid}/cmdline" ]] || return 1
    tr '\0' ' ' <"/proc/${pid}/cmdline" | grep -q "${STANDALONE_CLASS}"
}

running_pid() {
    local pid
    pid="$(read_pid)" || return 1
    is_our_broker "${pid}" || return 1
    printf '%s\n' "${pid}"
}

group_alive() { kill -0 -- "-$1" 2>/dev/null; }

rss_mib() {
    awk '/^VmRSS:/ { printf "%.0f", $2 / 1024 }' "/proc/$1/status" 2>/dev/null || echo "?"
}

# curl on the admin API, with the bearer token when the broker runs with authentication
# (read by curl from the header file: never on a command line), and over https trusting the
# broker's CA (and only it) when it runs with TLS.
admin_curl() {
    local auth=()
    [[ -f "${ADMIN_HEADER_FILE}" ]] && auth=(-H "@${ADMIN_HEADER_FILE}")
    [[ "${ADMIN_URL}" == https:* ]] && auth+=(--cacert "${TLS_CA_FILE}")
    curl "${auth[@]}" "$@"
}

http_code() {
    admin_curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$1" 2>/dev/null || true
}

port_in_use() {
    (exec 3<>"/dev/tcp/${HOST}/$1") 2>/dev/null
}

broker_healthy() {
    [[ "$(http_code "${ADMIN_URL}/admin/v2/brokers/health")" == 200 ]] || return 1
    admin_curl -sf --max-time 5 "${ADMIN_URL}/admin/v2/namespaces/public" 2>/dev/null | grep -q '"public/default"'
}

python_bin() {
    if [[ -n "${PYTHON:-}" ]]; then
        printf '%s\n' "${PYTHON}"
    elif [[ -x "${REPO_ROOT}/.venv/bin/python" ]]; then
        printf '%s\n' "${REPO_ROOT}/.venv/bin/python"
    else
        printf '%s\n' python3
    fi
}

# One produce + consume round trip on a fresh topic in public/default, bounded by $1 seconds.
round_trip() {
    local budget="$1" topic payload py
    topic="persistent://public/default/rendezvous-selfcheck-$(date +%s%N)"
    payload="ping-$$-${RANDOM}"
    py="$(python_bin)"
    local token_file="" trust_file=""
    [[ -f "${CLIENT_TOKEN_FILE}" ]] && token_file="${CLIENT_TOKEN_FILE}"
    [[ "${SERVICE_URL}" == pulsar+ssl:* ]] && trust_file="${TLS_CA_FILE}"
    if "${py}" -c 'import pulsar' >/dev/null 2>&1; then
        timeout -k 5 "${budget}" "${py}" - "${SERVICE_URL}" "${topic}" "${payload}" "${token_file}" "${trust_file}" <<'PY' >>"${LOG_DIR}/selfcheck.log" 2>&1
import sys
import pulsar

url, topic, payload, token_file, trust_file = sys.argv[1], sys.argv[2], sys.argv[3].encode(), sys.argv[4], sys.argv[5]
auth = None
if token_file:
    with open(token_file) as f:
        auth = pulsar.AuthenticationToken(f.read().strip())
# Over TLS: trust the broker's CA only, and check the certificate names 127.0.0.1.
tls = {"use_tls": True, "tls_trust_certs_file_path": trust_file,
       "tls_validate_hostname": True} if trust_file else {}
client = pulsar.Client(url, authentication=auth, operation_timeout_seconds=10,
                       connection_timeout_ms=5000,
                       logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn), **tls)
try:
    consumer = client.subscribe(topic, "selfcheck",
                                initial_position=pulsar.InitialPosition.Earliest)
    producer = client.create_producer(topic, send_timeout_millis=10000)
    producer.send(payload)
    msg = consumer.receive(timeout_millis=10000)
    consumer.acknowledge(msg)
    if msg.data() != payload:
        sys.exit(f"round trip returned {msg.data()!r}, expected {payload!r}")
finally:
    client.close()
PY
    else
        # No pulsar-client Python package: use the distribution's CLI (a JVM per call, slower).
        local client=("${PULSAR_HOME_DIR}/bin/pulsar-client" --url "${SERVICE_URL}") out
        if [[ -n "${token_file}" ]]; then
            client+=(--auth-plugin org.apache.pulsar.client.impl.auth.AuthenticationToken
                --auth-params "file://${token_file}")
        fi
        [[ -n "${trust_file}" ]] && client+=(--tlsTrustCertsFilePath "${trust_file}")
        out="$(mktemp)"
        if timeout -k 5 "${budget}" "${client[@]}" produce "${topic}" -m "${payload}" >>"${LOG_DIR}/selfcheck.log" 2>&1 &&
            timeout -k 5 "${budget}" "${client[@]}" consume "${topic}" -s selfcheck \
                -p Earliest -n 1 >"${out}" 2>&1; then
            cat "${out}" >>"${LOG_DIR}/selfcheck.log"
            grep -q "${payload}" "${out}" && rm -f "${out}" && return 0
        else
            cat "${out}" >>"${LOG_DIR}/selfcheck.log"
        fi
        rm -f "${out}"
        return 1
    fi
}

print_log_tail() {
    local f
    # The distribution logs to the console by default, i.e. into stdout.log.
    for f in "${LOG_DIR}/stdout.log" "${LOG_DIR}/selfcheck.log"; do
        [[ -s "${f}" ]] || continue
        log "---- last 40 lines of ${f#"${REPO_ROOT}"/} ----"
        tail -n 40 "${f}" >&2
    done
}

render_conf() {
    [[ -f "${CONF_TEMPLATE}" ]] || die "missing ${CONF_TEMPLATE}"
    local key
    for key in brokerServicePort webServicePort; do
        [[ "$(grep -c "^${key}=" "${CONF_TEMPLATE}")" == 1 ]] ||
            die "${CONF_TEMPLATE#"${REPO_ROOT}"/} must contain exactly one '${key}=' line"
    done
    sed -e "s/^brokerServicePort=.*/brokerServicePort=${PULSAR_BROKER_PORT}/" \
        -e "s/^webServicePort=.*/webServicePort=${PULSAR_WEB_PORT}/" \
        "${CONF_TEMPLATE}" >"${RENDERED_CONF}"
    if ! grep -qx "brokerServicePort=${PULSAR_BROKER_PORT}" "${RENDERED_CONF}" ||
        ! grep -qx "webServicePort=${PULSAR_WEB_PORT}" "${RENDERED_CONF}"; then
        die "could not render ports into ${RENDERED_CONF}"
    fi
    if [[ "${PULSAR_AUTH}" == token ]]; then
        set_conf authenticationEnabled true
        set_conf authenticationProviders org.apache.pulsar.broker.authentication.AuthenticationProviderToken
        set_conf tokenSecretKey "file://${SECRET_KEY_FILE}"
        set_conf authorizationEnabled true
        set_conf superUserRoles "${BROKER_ROLE},${CLIENT_ROLE}"
        # The standalone's internal client (it creates public/default through the admin API).
        set_conf brokerClientAuthenticationPlugin org.apache.pulsar.client.impl.auth.AuthenticationToken
        set_conf brokerClientAuthenticationParameters "file://${BROKER_TOKEN_FILE}"
    fi
    if [[ "${PULSAR_TLS}" != none ]]; then
        set_conf brokerServicePortTls "${PULSAR_BROKER_TLS_PORT}"
        set_conf webServicePortTls "${PULSAR_WEB_TLS_PORT}"
        set_conf tlsCertificateFilePath "${TLS_CERT_FILE}"
        set_conf tlsKeyFilePath "${TLS_KEY_FILE}"
        set_conf tlsTrustCertsFilePath "${TLS_CA_FILE}"
        set_conf tlsAllowInsecureConnection false
        # The standalone's internal client and admin calls (public/default) go over TLS too:
        # with `only` there is no plaintext port for them.
        set_conf brokerClientTlsEnabled true
        set_conf brokerClientTrustCertsFilePath "${TLS_CA_FILE}"
        if [[ "${PULSAR_TLS}" == only ]]; then
            # Empty: the port is not opened.
            set_conf brokerServicePort ""
            set_conf webServicePort ""
        fi
    fi
}

# The broker's CA, certificate and key (tools/certs.py, run by the venv's Python: it needs
# `cryptography`) and the TLS mode. Kept across `restart`, made anew by `up`.
make_certs() {
    if [[ ! -s "${TLS_CA_FILE}" || ! -s "${TLS_CERT_FILE}" || ! -s "${TLS_KEY_FILE}" ]]; then
        local py
        py="$(python_bin)"
        (cd "${REPO_ROOT}" && "${py}" -m tools.certs --out "${TLS_DIR}") >>"${LOG_DIR}/certs.log" 2>&1 ||
            die "tools/certs.py failed (${py}; run 'make setup'); see ${LOG_DIR#"${REPO_ROOT}"/}/certs.log"
        log "TLS on (${PULSAR_TLS}): CA and certificate for ${HOST} in ${TLS_DIR#"${REPO_ROOT}"/}"
    fi
    printf '%s\n' "${PULSAR_TLS}" >"${TLS_MODE_FILE}"
}

# Set KEY=VALUE in the rendered config: the template's line is replaced (one line per key;
# Pulsar would take the last of several), or the line is added.
set_conf() {
    local key="$1" value="$2" tmp="${RENDERED_CONF}.tmp"
    awk -v key="${key}" -v value="${value}" '
        BEGIN { done = 0 }
        index($0, key "=") == 1 { if (!done) print key "=" value; done = 1; next }
        { print }
        END { if (!done) print key "=" value }
    ' "${RENDERED_CONF}" >"${tmp}"
    mv "${tmp}" "${RENDERED_CONF}"
}

# A fresh secret key and tokens with the distribution's own `bin/pulsar tokens` (a JVM each,
# ~4 s: the two tokens are made in parallel). Kept across `restart`, made anew by `up`.
make_tokens() {
    [[ -s "${SECRET_KEY_FILE}" && -s "${BROKER_TOKEN_FILE}" && -s "${CLIENT_TOKEN_FILE}" &&
        -s "${ADMIN_HEADER_FILE}" ]] && return 0
    local tokens=("${PULSAR_HOME_DIR}/bin/pulsar" tokens) started
    started="$(now)"
    (
        umask 077
        mkdir -p "${AUTH_DIR}"
        # A short-lived JVM: small heap, serial GC, C1 only (starts faster than the broker's flags).
        export PULSAR_MEM="-Xms32m -Xmx128m" PULSAR_GC="-XX:+UseSerialGC -XX:TieredStopAtLevel=1" PULSAR_LOG_DIR="${LOG_DIR}"
        "${tokens[@]}" create-secret-key --output "${SECRET_KEY_FILE}" >>"${LOG_DIR}/tokens.log" 2>&1
        "${tokens[@]}" create --secret-key "file://${SECRET_KEY_FILE}" --subject "${BROKER_ROLE}" \
            >"${BROKER_TOKEN_FILE}" 2>>"${LOG_DIR}/tokens.log" &
        local broker=$!
        "${tokens[@]}" create --secret-key "file://${SECRET_KEY_FILE}" --subject "${CLIENT_ROLE}" \
            >"${CLIENT_TOKEN_FILE}" 2>>"${LOG_DIR}/tokens.log"
        wait "${broker}"
        printf 'Authorization: Bearer %s\n' "$(tr -d '[:space:]' <"${CLIENT_TOKEN_FILE}")" >"${ADMIN_HEADER_FILE}"
    ) || die "bin/pulsar tokens failed; see ${LOG_DIR#"${REPO_ROOT}"/}/tokens.log"
    [[ -s "${BROKER_TOKEN_FILE}" && -s "${CLIENT_TOKEN_FILE}" ]] || die "bin/pulsar tokens wrote no token"
    log "token authentication on: secret key and tokens in ${AUTH_DIR#"${REPO_ROOT}"/} ($(elapsed_since "${started}")s)"
}

# Serialise up/down across processes (e.g. a test fixture and a developer both calling `up`):
# without it, two `up`s wipe each other's data dir and fight over the RocksDB lock.
# fd 9 holds the lock until this script exits; the broker is started with fd 9 closed.
take_lock() {
    mkdir -p "$(dirname "${LOCK_FILE}")"
    if ! command -v flock >/dev/null 2>&1; then
        log "flock not found; not serialising concurrent up/down"
        return 0
    fi
    exec 9>"${LOCK_FILE}"
    if ! flock -n 9; then
        log "another tools/pulsar.sh up/down is running; waiting for it"
        flock -w "$((PULSAR_START_TIMEOUT + PULSAR_STOP_TIMEOUT + 60))" 9 ||
            die "timed out waiting for ${LOCK_FILE}"
    fi
}

# --- subcommands -----------------------------------------------------------------------

cmd_up() {
    command -v curl >/dev/null 2>&1 || apt_install curl
    take_lock
    local pid
    if pid="$(running_pid)"; then
        if broker_healthy; then
            log "already up and healthy (pid ${pid}, RSS $(rss_mib "${pid}") MiB)"
            cmd_env
            return 0
        fi
        log "broker pid ${pid} is running but not healthy; restarting it from a clean state"
        stop_broker
    fi
    cmd_fetch

    local port ports=()
    [[ "${PULSAR_TLS}" != only ]] && ports+=("${PULSAR_BROKER_PORT}" "${PULSAR_WEB_PORT}")
    [[ "${PULSAR_TLS}" != none ]] && ports+=("${PULSAR_BROKER_TLS_PORT}" "${PULSAR_WEB_TLS_PORT}")
    for port in "${ports[@]}"; do
        if port_in_use "${port}"; then
            die "${HOST}:${port} is already in use (another broker without our pid file? see 'ss -ltnp')"
        fi
    done

    # Fresh data on every `up`: the RocksDB metadata store is locked per process, and stale
    # metadata next to a wiped/changed bookie breaks topic loading. `restart` is the one
    # exception: after a clean stop the same broker comes back with its topics and cursors.
    if [[ "${KEEP_DATA:-0}" == 1 && -d "${RUN_DIR}/data" ]]; then
        log "keeping the previous run's data (restart)"
        mkdir -p "${LOG_DIR}"
    else
        rm -rf "${RUN_DIR}"
        mkdir -p "${RUN_DIR}/data" "${LOG_DIR}"
    fi
    [[ "${PULSAR_AUTH}" == token ]] && make_tokens
    [[ "${PULSAR_TLS}" != none ]] && make_certs
    render_conf

    # Sized for 2 cores / a small dev box. ZGC, as the distribution has it, but without
    # AlwaysPreTouch (which would commit the whole heap up front). G1's young pauses, meant
    # to be 10 ms, took 22-45 ms here (its GC threads compete with the mesh for 2 cores) and
    # froze every hop of every request at once; ZGC's longest pause in the same S2 run at
    # 100 req/s was 0.08 ms, at no more broker CPU (3.5 vs 3.9 ms per request).
    export PULSAR_MEM="${PULSAR_MEM:--Xms256m -Xmx768m -XX:MaxDirectMemorySize=512m}"
    export PULSAR_GC="${PULSAR_GC:--XX:+UseZGC -XX:+PerfDisableSharedMem}"
    export PULSAR_STANDALONE_CONF="${RENDERED_CONF}"
    export PULSAR_LOG_DIR="${LOG_DIR}"

    local started
    started="$(now)"
    # setsid: own session and process group (pgid == pid), detached from the caller's
    # terminal and job control; the inner shell records its pid, which bin/pulsar exec's into java.
    # shellcheck disable=SC2016  # $$ and "$@" are for the inner shell
    nohup setsid bash -c 'echo "$$" >"$0"; exec "$@"' "${PID_FILE}" \
        "${PULSAR_HOME_DIR}/bin/pulsar" standalone --no-functions-worker --no-stream-storage \
        --metadata-dir "${RUN_DIR}/data/metadata" \
        --bookkeeper-dir "${RUN_DIR}/data/bookkeeper" \
        --zookeeper-dir "${RUN_DIR}/data/zookeeper" \
        </dev/null >"${LOG_DIR}/stdout.log" 2>&1 9>&- &

    local deadline=$((SECONDS + PULSAR_START_TIMEOUT))
    pid=""
    while [[ -z "${pid}" ]]; do
        pid="$(read_pid || true)"
        ((SECONDS < deadline)) || break
        [[ -n "${pid}" ]] || sleep 0.1
    done
    [[ -n "${pid}" ]] || {
        print_log_tail
        die "broker did not start (no pid file)"
    }
    log "started pid ${pid}; waiting up to ${PULSAR_START_TIMEOUT}s for health, public/default and a round trip"

    local stage="health" healthy_at=""
    while :; do
        if ! kill -0 "${pid}" 2>/dev/null; then
            print_log_tail
            rm -f "${PID_FILE}"
            die "broker process ${pid} exited during startup"
        fi
        if ((SECONDS >= deadline)); then
            print_log_tail
            log "timed out after ${PULSAR_START_TIMEOUT}s waiting for: ${stage}; stopping it"
            stop_broker
            exit 1
        fi
        case "${stage}" in
            health)
                if [[ "$(http_code "${ADMIN_URL}/admin/v2/brokers/health")" == 200 ]]; then
                    stage="public/default"
                    continue
                fi
                ;;
            public/default)
                if admin_curl -sf --max-time 5 "${ADMIN_URL}/admin/v2/namespaces/public" 2>/dev/null |
                    grep -q '"public/default"'; then
                    healthy_at="$(elapsed_since "${started}")"
                    stage="round trip"
                    continue
                fi
                ;;
            "round trip")
                if round_trip "$((deadline - SECONDS > 5 ? deadline - SECONDS : 5))"; then
                    break
                fi
                ;;
            *) die "internal: unknown stage ${stage}" ;;
        esac
        sleep 0.5
    done

    local total
    total="$(elapsed_since "${started}")"
    log "ready in ${total}s (admin healthy + public/default after ${healthy_at}s); pid ${pid}, RSS $(rss_mib "${pid}") MiB"
    cmd_env
}

cmd_down() {
    take_lock
    stop_broker
}

# Stop and start the same broker, keeping its data (what a broker restart is in production).
cmd_restart() {
    take_lock
    # The same broker: with the authentication and TLS it had (main found them).
    stop_broker
    KEEP_DATA=1 cmd_up
}

stop_broker() {
    local pid
    if ! pid="$(read_pid)"; then
        rm -f "${PID_FILE}"
        log "not running"
        return 0
    fi
    if ! is_our_broker "${pid}"; then
        rm -f "${PID_FILE}"
        log "not running (stale pid file removed)"
        return 0
    fi
    log "stopping pid ${pid} (SIGTERM to its process group)"
    kill -TERM -- "-${pid}" 2>/dev/null || kill -TERM "${pid}" 2>/dev/null || true
    local deadline=$((SECONDS + PULSAR_STOP_TIMEOUT))
    while group_alive "${pid}" && ((SECONDS < deadline)); do
        sleep 0.2
    done
    if group_alive "${pid}"; then
        log "still alive after ${PULSAR_STOP_TIMEOUT}s; SIGKILL"
        kill -KILL -- "-${pid}" 2>/dev/null || true
        deadline=$((SECONDS + 10))
        while group_alive "${pid}" && ((SECONDS < deadline)); do sleep 0.1; done
        ! group_alive "${pid}" || die "process group ${pid} survived SIGKILL"
    fi
    rm -f "${PID_FILE}"
    log "stopped"
}

cmd_status() {
    local pid
    if ! pid="$(running_pid)"; then
        log "not running"
        return 3
    fi
    if ! broker_healthy; then
        log "pid ${pid} is running but ${ADMIN_URL} is not healthy (yet)"
        return 1
    fi
    log "healthy: pid ${pid}, RSS $(rss_mib "${pid}") MiB"
    cmd_env
}

cmd_env() {
    printf 'PULSAR_SERVICE_URL=%s\n' "${SERVICE_URL}"
    printf 'PULSAR_ADMIN_URL=%s\n' "${ADMIN_URL}"
    # The file, never the token: clients read it (PulsarSettings.token_file).
    if [[ -s "${CLIENT_TOKEN_FILE}" ]]; then
        printf 'PULSAR_TOKEN_FILE=%s\n' "${CLIENT_TOKEN_FILE}"
    fi
    # The CA to trust (PulsarSettings.tls_trust_certs_file).
    if [[ "${PULSAR_TLS}" != none ]]; then
        printf 'PULSAR_TLS_TRUST_CERTS_FILE=%s\n' "${TLS_CA_FILE}"
    fi
}

main() {
    validate_env
    case "${1:-}" in
        status | env | restart) find_run_security ;;
    esac
    set_urls
    case "${1:-}" in
        fetch) cmd_fetch ;;
        up) cmd_up ;;
        down) cmd_down ;;
        restart) cmd_restart ;;
        status) cmd_status ;;
        env) cmd_env ;;
        -h | --help | help) usage ;;
        *)
            usage >&2
            exit 2
            ;;
    esac
}

main "$@"
