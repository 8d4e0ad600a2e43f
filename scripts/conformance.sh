#!/usr/bin/env bash
# Run the OCI distribution-spec conformance suite (opencontainers/distribution-spec,
# conformance/, a ginkgo v2 Go test suite) against a registry and print a summary.
#
# NOT part of CI: the suite's source is not packaged by Debian and CI cannot download it
# (no GitHub, no Go module proxy). A developer runs this with a local copy of the source:
#
#   CONFORMANCE_SRC=/path/to/distribution-spec scripts/conformance.sh [URL]
#
# CONFORMANCE_SRC   a checkout of opencontainers/distribution-spec (its root or its
#                   conformance/ dir), or a bare git dir of it (then CONFORMANCE_REF,
#                   default v1.1.1, is extracted; newer commits replaced the ginkgo suite).
# URL               registry to test (no auth). Without it, regproxy is started on a free
#                   port with a fresh data dir and 'conformance/**' hosted, and stopped after.
#
# Building, first that works:
#   1. CONFORMANCE_GOPATH set: a prepared GOPATH holding the suite's dependencies (GOPATH mode).
#   2. module mode with the environment's GOPROXY / module cache (needs network or a warm cache).
#   3. offline GOPATH assembled from Debian's golang-*-dev packages (/usr/share/gocode) plus the
#      four modules Debian lacks or has too old (ginkgo v2.11.0, gomega v1.27.8, slim-sprig,
#      reggie v0.6.1), taken from bare git mirrors under CONFORMANCE_MIRROR (no default:
#      the developer's own mirror directory, layout <owner>+<name>/repo).
# The binary is cached in CONFORMANCE_BUILD (default /tmp/regproxy-conformance); delete it to rebuild.
#
# Other knobs: OCI_NAMESPACE (default conformance/test), OCI_CROSSMOUNT_NAMESPACE
# (conformance/other), OCI_AUTOMATIC_CROSSMOUNT (unset: those two specs are skipped),
# OCI_REPORT_DIR (default $CONFORMANCE_BUILD/report-<timestamp>: junit.xml, report.html, output.txt).
# Exit status: the suite's (0 when every spec that ran passed).
set -euo pipefail
cd "$(dirname "$0")/.."
repo_root=$(pwd)

: "${CONFORMANCE_SRC:?set CONFORMANCE_SRC to a distribution-spec checkout or bare git dir}"
ref=${CONFORMANCE_REF:-v1.1.1}
build=${CONFORMANCE_BUILD:-/tmp/regproxy-conformance}
mirror=${CONFORMANCE_MIRROR:-}
bin=$build/conformance.test
mkdir -p "$build"

log() { printf '== %s\n' "$*" >&2; }

debian_pkgs=(golang-go golang-github-opencontainers-go-digest-dev golang-github-google-uuid-dev
    golang-github-go-resty-resty-dev golang-github-asaskevich-govalidator-dev
    golang-github-mitchellh-mapstructure-dev golang-github-go-logr-logr-dev
    golang-github-google-go-cmp-dev golang-github-google-pprof-dev golang-golang-x-net-dev
    golang-golang-x-sys-dev golang-golang-x-text-dev golang-golang-x-tools-dev
    golang-gopkg-yaml.v3-dev)

ensure_go() {
    local missing=() p
    for p in "${debian_pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
    done
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# Lay the suite's source out as $1/src/github.com/opencontainers/distribution-spec.
place_source() {
    local dest=$1/src/github.com/opencontainers/distribution-spec
    rm -rf "$dest"; mkdir -p "$dest"
    if [[ -f $CONFORMANCE_SRC/conformance/go.mod ]]; then
        cp -r "$CONFORMANCE_SRC/." "$dest/"
    elif [[ -f $CONFORMANCE_SRC/go.mod && -f $CONFORMANCE_SRC/setup.go ]]; then
        mkdir -p "$dest/conformance"; cp -r "$CONFORMANCE_SRC/." "$dest/conformance/"
    elif git --git-dir="$CONFORMANCE_SRC" rev-parse --verify -q "$ref^{commit}" >/dev/null 2>&1; then
        git --git-dir="$CONFORMANCE_SRC" archive "$ref" | tar -x -C "$dest"
    else
        echo "CONFORMANCE_SRC=$CONFORMANCE_SRC is not a distribution-spec checkout" >&2; exit 2
    fi
    [[ -f $dest/conformance/setup.go ]] || {
        echo "no ginkgo suite (conformance/setup.go) in that source; use a v1.1.x tag" >&2; exit 2; }
    echo "$dest/conformance"
}

# Extract <owner>+<name> at <rev> from the mirror into GOPATH $1 at import path <path>.
from_mirror() {
    local gopath=$1 repo=$2 rev=$3 path=$4 gd=$mirror/$2/repo
    [[ -n $mirror ]] || { echo "set CONFORMANCE_MIRROR to build offline (needs github.com/${repo/+//} at $rev)" >&2; return 1; }
    [[ -d $gd ]] || { echo "missing mirror $gd (github.com/${repo/+//} at $rev)" >&2; return 1; }
    mkdir -p "$gopath/src/$path"
    git --git-dir="$gd" archive "$rev" | tar -x -C "$gopath/src/$path"
}

build_suite() {
    [[ -x $bin ]] && { log "using cached $bin"; return; }
    ensure_go
    export GOCACHE=$build/gocache GOFLAGS=
    local gopath=$build/gopath dir
    if [[ -n ${CONFORMANCE_GOPATH:-} ]]; then
        dir=$(place_source "$gopath")
        log "building in GOPATH mode with CONFORMANCE_GOPATH"
        (cd "$dir" && GO111MODULE=off GOPATH=$gopath:$CONFORMANCE_GOPATH:/usr/share/gocode \
            go test -c -o "$bin" .) && return
        exit 1
    fi
    dir=$(place_source "$gopath")
    log "trying module mode (GOPROXY=${GOPROXY:-default})"
    if (cd "$dir" && GOPATH=$build/modpath GOFLAGS=-mod=mod go test -c -o "$bin" . ) 2>"$build/modmode.err"; then
        return
    fi
    log "module mode failed ($(tail -1 "$build/modmode.err")); assembling an offline GOPATH"
    from_mirror "$gopath" onsi+ginkgo v2.11.0 github.com/onsi/ginkgo/v2
    from_mirror "$gopath" onsi+gomega v1.27.8 github.com/onsi/gomega
    from_mirror "$gopath" go-task+slim-sprig 52ccab3ef572 github.com/go-task/slim-sprig
    from_mirror "$gopath" bloodorangeio+reggie v0.6.1 github.com/bloodorangeio/reggie
    # Debian ships resty v2 without the /v2 suffix in its path.
    mkdir -p "$gopath/src/github.com/go-resty/resty"
    ln -sfn /usr/share/gocode/src/github.com/go-resty/resty "$gopath/src/github.com/go-resty/resty/v2"
    (cd "$dir" && GO111MODULE=off GOPATH=$gopath:/usr/share/gocode go test -c -o "$bin" .)
}

build_suite

url=${1:-}
proxy_pid= data=
cleanup() {
    [[ -n $proxy_pid ]] && kill "$proxy_pid" 2>/dev/null && wait "$proxy_pid" 2>/dev/null
    [[ -n $data ]] && rm -rf "$data"
    true
}
trap cleanup EXIT
if [[ -z $url ]]; then
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    data=$(mktemp -d /tmp/regproxy-conformance-data.XXXXXX)
    log "starting regproxy on 127.0.0.1:$port (data $data, log $data.log)"
    python3 -m proxy serve --listen "127.0.0.1:$port" --data-dir "$data" \
        --hosted 'conformance/**' >"$data.log" 2>&1 &
    proxy_pid=$!
    url=http://127.0.0.1:$port
    for _ in $(seq 50); do
        curl -fs "$url/v2/" >/dev/null 2>&1 && break
        kill -0 "$proxy_pid" 2>/dev/null || { cat "$data.log" >&2; exit 1; }
        sleep 0.2
    done
fi

report=${OCI_REPORT_DIR:-$build/report-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$report"
log "running the suite against $url (reports in $report)"
set +e
(cd "$report" && env OCI_ROOT_URL="$url" \
    OCI_NAMESPACE="${OCI_NAMESPACE:-conformance/test}" \
    OCI_CROSSMOUNT_NAMESPACE="${OCI_CROSSMOUNT_NAMESPACE:-conformance/other}" \
    OCI_TEST_PULL=1 OCI_TEST_PUSH=1 OCI_TEST_CONTENT_DISCOVERY=1 OCI_TEST_CONTENT_MANAGEMENT=1 \
    OCI_DELETE_MANIFEST_BEFORE_BLOBS="${OCI_DELETE_MANIFEST_BEFORE_BLOBS:-1}" \
    OCI_HIDE_SKIPPED_WORKFLOWS=0 OCI_DEBUG="${OCI_DEBUG:-0}" OCI_REPORT_DIR="$report" \
    "$bin" --ginkgo.no-color >"$report/output.txt" 2>&1)
rc=$?
set -e

python3 - "$report/junit.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET

counts = {}
lines = []
for tc in ET.parse(sys.argv[1]).iter("testcase"):
    status = tc.get("status")
    if not tc.get("name").startswith("OCI Distribution Conformance Tests"):
        continue  # ginkgo's report nodes (e.g. "html custom reporter")
    counts[status] = counts.get(status, 0) + 1
    name = tc.get("name").removeprefix("OCI Distribution Conformance Tests ")
    if status == "failed":
        msg = " ".join((tc.find("failure").get("message") or "").split())
        lines.append(f"FAIL  {name}\n      {msg}")
    elif status == "skipped":
        lines.append(f"SKIP  {name}")
print("\n".join(lines))
print("summary: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
      + f" ({sum(counts.values())} specs)")
EOF
grep -E '^(Ran [0-9]|FAIL!|SUCCESS!)' "$report/output.txt" || true
exit "$rc"
