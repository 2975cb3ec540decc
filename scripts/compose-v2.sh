#!/usr/bin/env bash
# Compose v2 (`docker compose`) on a Debian machine that lacks it: run as root.
#
# Debian 12 packages only Compose v1 (its `docker-compose` 1.29, end of life).
# Debian 13 (trixie) packages v2 as `docker-compose`, whose docker CLI plugin is
# one static binary that runs on Debian 12 as well. This fetches that package
# from the trixie suite of the mirror this machine's apt already uses, through
# an apt configuration of its own (its own sources list, package lists and
# cache, all in a temporary folder: the system's apt state is left as it was),
# and copies the plugin where the docker CLI looks for plugins. Installs
# nothing when `docker compose version` already works.
set -euo pipefail

PLUGIN=/usr/local/lib/docker/cli-plugins/docker-compose
SUITE=trixie

if docker compose version >/dev/null 2>&1; then
  exit 0
fi
fail() { echo "compose-v2: $*" >&2; exit 1; }
command -v docker >/dev/null || fail "needs the docker CLI (Debian's docker.io package) first"
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || fail "needs apt-get and dpkg-deb (Debian)"
[ "$(id -u)" = 0 ] || fail "must run as root: it writes $PLUGIN"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# shellcheck disable=SC1091
. /etc/os-release
mirror=$(apt-get indextargets --format '$(REPO_URI)' "Release: ${VERSION_CODENAME:-}" | head -n 1)
[ -n "$mirror" ] || fail "no apt source for '${VERSION_CODENAME:-}' in this machine's apt configuration to take the mirror from"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $SUITE main" >"$tmp/sources.list"
mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial"
# The temporary folder is root's alone, so apt's unprivileged download user could not write there.
apt=(apt-get -qq -o Dir::Etc::sourcelist="$tmp/sources.list" -o Dir::Etc::sourceparts=-
     -o Dir::State::lists="$tmp/lists" -o Dir::Cache="$tmp/cache" -o APT::Sandbox::User=root)
"${apt[@]}" update >"$tmp/log" 2>&1 || { cat "$tmp/log" >&2; fail "apt-get update of $mirror $SUITE failed"; }
(cd "$tmp" && "${apt[@]}" download docker-compose) >"$tmp/log" 2>&1 \
  || { cat "$tmp/log" >&2; fail "apt-get download docker-compose from $SUITE failed"; }
dpkg-deb -x "$tmp"/docker-compose_*.deb "$tmp/root"
install -D -m 0755 "$tmp/root/usr/libexec/docker/cli-plugins/docker-compose" "$PLUGIN"
version=$(docker compose version --short 2>&1) || fail "docker compose does not run after installing $PLUGIN: $version"
case $version in
  2.*) ;;
  *) fail "$PLUGIN is Compose $version, not v2" ;;
esac
