#!/usr/bin/env bash
# Builds qlog-dom0's noarch RPM from this repository:
#   packaging/dom0/build-rpm.sh [OUTDIR]     (default: target/rpm)
# Needs rpmbuild (Fedora: rpm-build; Debian: rpm). Run it in a build qube,
# not in dom0, and copy the RPM to dom0 afterwards.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-$root/target/rpm}
version=$(sed -n 's/^Version: *//p' "$root/packaging/dom0/qlog-dom0.spec")
top=$(mktemp -d)
trap 'rm -rf "$top"' EXIT
mkdir -p "$top/SOURCES" "$out"
tar -C "$root" --transform "s|^|qlog-dom0-$version/|" -czf "$top/SOURCES/qlog-dom0-$version.tar.gz" \
    packaging/dom0 packaging/salt packaging/deb/copyright docs/install-qubes.md
rpmbuild --define "_topdir $top" -bb "$root/packaging/dom0/qlog-dom0.spec"
find "$top/RPMS" -name '*.rpm' -exec cp {} "$out/" \;
ls -l "$out"/*.rpm
