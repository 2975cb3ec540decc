#!/usr/bin/env bash
# `make images`: both images from the Dockerfiles, as users get them.
#
# The Dockerfiles start FROM the official Python image. Where no registry can
# be reached (an air-gapped builder, a CI runner without Docker Hub), this first
# builds a stand-in for it from Debian's own packages (debootstrap, then
# `docker import`), tagged with the FROM name, so the Dockerfiles build
# unchanged. The stand-in is Debian bookworm's Python 3.11 with pip, where the
# official one is python.org's 3.11 on bookworm: the same Debian release and
# Python minor, and both put `python` and `pip` on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${TAG:-dev}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
base=$(awk '/^FROM/ {print $2; exit}' Dockerfile.serve)
if [ "$(awk '/^FROM/ {print $2; exit}' Dockerfile.train)" != "$base" ]; then
  echo "images: Dockerfile.train and Dockerfile.serve start FROM different images; this script expects one" >&2
  exit 2
fi

stand_in_base() {
  for tool in debootstrap docker; do
    command -v "$tool" >/dev/null || { echo "images: $base cannot be pulled and $tool is missing (Debian package: ${tool/docker/docker.io})" >&2; exit 1; }
  done
  [ "$(id -u)" = 0 ] || { echo "images: $base cannot be pulled, and building its stand-in (debootstrap) needs root" >&2; exit 1; }
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates \
    bookworm "$root" "$MIRROR" >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; exit 1; }
  rm -f "$root.log"
  # The official image's pip installs system-wide; Debian marks its Python as
  # apt's alone (PEP 668). In a container nothing else manages it.
  rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
  # This machine's own certificate authorities (Debian's local CA folder), for
  # a builder whose traffic to the package index passes through its own proxy.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null 2>&1
    # pip's own bundle (in a venv's pip) knows only the public authorities.
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$root/etc/pip.conf"
  fi
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc "$root"/usr/share/man
  tar -C "$root" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin:/bin:/sbin' \
    --change 'CMD ["python3"]' \
    --message "stand-in for $base: Debian bookworm (debootstrap) with its python3 and pip" - "$base" >/dev/null
}

if ! docker image inspect "$base" >/dev/null 2>&1 && ! docker pull --quiet "$base" >/dev/null 2>&1; then
  echo "images: $base cannot be pulled here; building a stand-in from Debian's packages (debootstrap), tagged $base"
  stand_in_base
fi

# The OCI labels (org.opencontainers.image.*): the checkout's commit, the time,
# the version pyproject.toml names, and the repository's URL: git's `origin`
# through common/redact.py's rule (a user and password in it stay out of the
# image), else SOURCE, else a placeholder that says none was set.
revision=$(git rev-parse HEAD 2>/dev/null || true)
created=$(date -u +%Y-%m-%dT%H:%M:%SZ)
version=$(awk -F'"' '/^version *=/ {print $2; exit}' pyproject.toml)
origin=$(git remote get-url origin 2>/dev/null || true)
origin=$(python3 -c 'import sys; from common.redact import redact; print(redact(sys.argv[1]))' "$origin")
source=${SOURCE:-${origin:-unknown: no git remote origin (set SOURCE)}}
for image in train serve; do
  start=$(date +%s)
  docker build -f "Dockerfile.$image" -t "cifar10-pipeline-$image:$TAG" \
    --build-arg REVISION="$revision" --build-arg SOURCE="$source" \
    --build-arg CREATED="$created" --build-arg VERSION="$version" .
  echo "images: cifar10-pipeline-$image:$TAG built in $(( $(date +%s) - start )) s," \
    "$(docker image inspect -f '{{.Size}}' "cifar10-pipeline-$image:$TAG" | awk '{printf "%.2f GB", $1 / 1e9}')"
done
