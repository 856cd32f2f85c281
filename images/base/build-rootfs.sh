#!/usr/bin/env bash
# Build an offline Debian bookworm rootfs image: debootstrap a minimal rootfs with the listed packages and
# `docker import` it. airlock/base uses images/base/packages.txt; airlock/postgres-rootfs its own list.
#
# Why: the build machines have no container registry, so no base image can be pulled. The Debian
# mirror is read from this machine's own apt configuration at run time; no host name lives in the repo.
#
# usage: build-rootfs.sh TAG [PACKAGES_FILE]   (TAG is content-addressed by the caller; see images/build.py;
#                                               PACKAGES_FILE defaults to images/base/packages.txt)
set -euo pipefail

tag=${1:?usage: build-rootfs.sh TAG [PACKAGES_FILE]}
list=${2:-"$(dirname "$0")/packages.txt"}
label=${tag#airlock/}
label=${label%%:*}
suite=bookworm
packages=$(grep -v '^[[:space:]]*\(#\|$\)' "$list" | tr '\n' ',' | sed 's/,$//')

mirror=${AIRLOCK_DEBIAN_MIRROR:-$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(TARGET_OF)' \
  | awk -v s="$suite" '$2 == s && $3 == "deb" {print $1; exit}')}
if [ -z "$mirror" ]; then
  echo "build-rootfs: no '$suite' deb source in this machine's apt configuration;" \
       "set AIRLOCK_DEBIAN_MIRROR to a Debian mirror URL" >&2
  exit 2
fi
command -v debootstrap >/dev/null || { echo "build-rootfs: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 2; }

work=$(mktemp -d /var/tmp/airlock-rootfs.XXXXXX)
trap 'rm -rf "$work"' EXIT
echo "[$label] debootstrap $suite (minbase + ${packages//,/ }) ..."
debootstrap --variant=minbase --include="$packages" "$suite" "$work/rootfs" "$mirror" \
  | awk -v l="$label" '/^I: (Retrieving|Validating|Extracting|Installing|Unpacking|Configuring) / {n++; if (n % 25 == 0) printf "[%s]   %d steps\n", l, n; fflush()} /^[EW]:/ {print}'

echo "[$label] trimming ..."
chroot "$work/rootfs" apt-get clean
rm -rf "$work/rootfs"/var/lib/apt/lists/* "$work/rootfs"/usr/share/doc/* "$work/rootfs"/usr/share/man/* \
       "$work/rootfs"/usr/share/locale/* "$work/rootfs"/var/cache/debconf/*-old "$work/rootfs"/var/log/*.log
# The rootfs keeps no mirror: sources point at nothing until a derived image configures its own.
: > "$work/rootfs/etc/apt/sources.list"

echo "[$label] docker import -> $tag"
tar --numeric-owner -C "$work/rootfs" -c . | docker import \
  --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$tag" >/dev/null
echo "[$label] done: $(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}')"
