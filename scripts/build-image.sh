#!/usr/bin/env bash
# Build the regproxy container image (deploy/Containerfile).
#
#   scripts/build-image.sh [--base IMAGE] [--tag TAG]... [--source URL]
#
# Without --tag the image is regproxy:VERSION (pyproject.toml) and regproxy:latest.
#
# The wheelhouse (regproxy and every dependency, as wheels for the base image's Python and
# platform) is built here, outside the image build, with this machine's pip and its index
# settings and CA bundle; the image build then installs it with --no-index and needs no
# network. The docker CLI talks to $DOCKER_HOST when it is set (the CLI is $DOCKER, default
# `docker`). Other docker build options (--progress, --label, ...) can follow `--`.
set -euo pipefail

usage() {
    sed -n '2,13s/^# \{0,1\}//p' "$0"
    exit "${1:-0}"
}

repo=$(cd "$(dirname "$0")/.." && pwd)
base=python:3.11-slim
tags=()
source=
extra=()
while (($#)); do
    case $1 in
        --base) base=${2:?--base needs an image}; shift 2 ;;
        --tag) tags+=(--tag "${2:?--tag needs a name}"); shift 2 ;;
        --source) source=${2:?--source needs a URL}; shift 2 ;;
        -h|--help) usage 0 ;;
        --) shift; extra=("$@"); break ;;
        *) echo "build-image.sh: unknown argument $1" >&2; usage 2 >&2 ;;
    esac
done
docker=${DOCKER:-docker}
python=${PYTHON:-python3}
if [[ -z $source ]]; then
    source=$(git -C "$repo" remote get-url origin 2>/dev/null || true)
fi
revision=$(git -C "$repo" rev-parse HEAD 2>/dev/null || true)
version=$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
    "$repo/pyproject.toml")
if ((${#tags[@]} == 0)); then
    tags=(--tag "regproxy:$version" --tag regproxy:latest)
fi

# What the base runs: "3.11 x86_64 2.36" (Python, machine, glibc). Wheels must match it.
read -r pyver arch glibc < <("$docker" run --rm --network none --entrypoint python3 "$base" -c \
    'import platform, sys; print("%d.%d" % sys.version_info[:2], platform.machine(), platform.libc_ver()[1] or "none")')
if [[ $glibc == none ]]; then
    echo "build-image.sh: $base has no glibc; the wheelhouse is built for manylinux" >&2
    exit 2
fi
platforms=(--platform "manylinux2014_$arch")
for ((minor = ${glibc#*.}; minor >= 17; minor--)); do
    platforms+=(--platform "manylinux_2_${minor}_$arch")
done

ctx=$(mktemp -d "${TMPDIR:-/tmp}/regproxy-image.XXXXXX")
trap 'rm -rf "$ctx"' EXIT
mkdir "$ctx/wheelhouse"
cp "$repo/deploy/Containerfile" "$repo/deploy/container/config.toml" "$ctx/"
# Build from a copy of what the wheel holds: a build in the checkout would leave build/ and
# *.egg-info behind.
mkdir "$ctx/src"
cp -r "$repo/pyproject.toml" "$repo/README.md" "$repo/proxy" "$ctx/src/"
find "$ctx/src" -name __pycache__ -prune -exec rm -rf {} +
pipq=(-q --disable-pip-version-check)
"$python" -m pip wheel "${pipq[@]}" --no-deps --wheel-dir "$ctx/wheelhouse" "$ctx/src"
rm -rf "$ctx/src"
download() {
    "$python" -m pip download "${pipq[@]}" --only-binary=:all: --implementation cp --python-version "$pyver" \
        "${platforms[@]}" --dest "$ctx/wheelhouse" "$@"
}
download "$ctx"/wheelhouse/regproxy-*.whl
# pip evaluates environment markers with this machine's Python, not the base's (3.11.2 needs
# async-timeout, 3.11.7 does not): let the base's own pip resolve the wheelhouse offline and
# add what it misses. The wheelhouse goes in on stdin, so a remote DOCKER_HOST works too.
check='import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode="r|").extractall("/tmp/wh")'
for ((round = 1; ; round++)); do
    if out=$(tar -C "$ctx" -c wheelhouse | "$docker" run -i --rm --network none --entrypoint sh "$base" -c \
        "python3 -c '$check' && python3 -m venv /tmp/venv && /tmp/venv/bin/python -m pip install -q \
         --disable-pip-version-check --no-index --find-links /tmp/wh/wheelhouse --dry-run regproxy" 2>&1); then
        break
    fi
    missing=$(sed -n 's/.*No matching distribution found for \([^;]*\).*/\1/p' <<<"$out" | head -n 1)
    if [[ -z $missing || $round -gt 10 ]]; then
        printf 'build-image.sh: the wheelhouse does not install on %s:\n%s\n' "$base" "$out" >&2
        exit 1
    fi
    download "$missing"
done

"$docker" build --network none --file "$ctx/Containerfile" "${tags[@]}" \
    --build-arg "BASE=$base" --build-arg "VERSION=$version" \
    --build-arg "SOURCE=$source" --build-arg "REVISION=$revision" \
    "${extra[@]}" "$ctx"
echo "built ${tags[*]//--tag /} (regproxy $version on $base, Python $pyver)"
