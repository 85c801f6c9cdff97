#!/usr/bin/env bash
# The packaging CI step: build the Debian packages, lint them, install them on
# this machine, verify the installed units, smoke-test the installed binaries,
# and remove the packages again.
#
#   bash packaging/ci.sh        (as root: it runs dpkg -i)
#
# It is idempotent and leaves the machine as it found it: packages left by an
# interrupted run are purged first, and an EXIT trap stops what it started,
# purges the packages, and removes the qlog user and group the package's
# sysusers entry created (Debian keeps system users on purge; a CI machine
# should not collect them). Tools it needs and lacks (cargo-deb, lintian,
# help2man, strace, pytest, jinja2, pyyaml) are installed, and stay.
#
# The packages' cargo-deb metadata is meant to live in sink/Cargo.toml and
# agent/Cargo.toml (packaging/deb/README.md). Until it does, the packages are
# built from a staged copy of the workspace with packaging/deb/*.toml appended
# to those manifests, against the same target directory, so the result is
# the same package.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
cd "$root"

say() { printf '\n== %s\n' "$*"; }
fail() { printf 'packaging/ci.sh: FAILED: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "run as root: the step installs the packages with dpkg -i"

packages=(qlog-sink qlog-agent)
sysusers_gecos="qlog log sink (qlogd)"
work=$(mktemp -d /tmp/qlog-packaging-ci.XXXXXX)
stage=""
pids=()
had_var_lib_qlog=no
[ -e /var/lib/qlog ] && had_var_lib_qlog=yes

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
present() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -Eq 'installed|config-files|half'; }

purge_packages() {
    local p
    for p in "${packages[@]}"; do
        if present "$p"; then
            dpkg --purge "$p" >/dev/null
        fi
    done
}

# The qlog user and group, when they are the ones the package's sysusers entry
# made (by their GECOS), and no installed package still needs them.
remove_sysusers_account() {
    if installed qlog-sink; then
        return
    fi
    if [ "$(getent passwd qlog | cut -d: -f5)" = "$sysusers_gecos" ]; then
        userdel qlog
    fi
    if getent group qlog >/dev/null && [ -z "$(getent group qlog | cut -d: -f4)" ] &&
        ! getent passwd qlog >/dev/null; then
        groupdel qlog
    fi
}

cleanup() {
    local status=$? pid
    set +e
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    purge_packages
    remove_sysusers_account
    if [ "$had_var_lib_qlog" = no ] && [ -d /var/lib/qlog ]; then
        rmdir /var/lib/qlog 2>/dev/null
    fi
    rm -rf "$work"
    [ -n "$stage" ] && rm -rf "$stage"
    if [ "$status" -eq 0 ]; then
        echo "packaging/ci.sh: passed"
    else
        echo "packaging/ci.sh: failed (exit $status); the machine was cleaned up" >&2
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'echo "packaging/ci.sh: command failed at line $LINENO: $BASH_COMMAND" >&2' ERR

say "tools"
need_apt=()
command -v lintian >/dev/null || need_apt+=(lintian)
command -v help2man >/dev/null || need_apt+=(help2man)
command -v strace >/dev/null || need_apt+=(strace)
command -v dpkg-shlibdeps >/dev/null || need_apt+=(dpkg-dev)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
command -v man >/dev/null || need_apt+=(man-db)
if [ ${#need_apt[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb
if ! python3 -c 'import jinja2, yaml, pytest' 2>/dev/null; then
    python3 -m pip install --quiet jinja2 pyyaml pytest
fi
cargo deb --version

say "leftovers of an earlier run"
purge_packages
remove_sysusers_account

say "build"
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
bash packaging/build-binaries.sh
if [ -x target/release/qrexec-client-vm ]; then
    double=$root/target/release/qrexec-client-vm
elif [ -x target/debug/qrexec-client-vm ]; then
    double=$root/target/debug/qrexec-client-vm
else
    cargo build --release -p qlog-tests --bin qrexec-client-vm
    double=$root/target/release/qrexec-client-vm
fi
bash packaging/gen-assets.sh

say "cargo deb"
rm -rf target/debian
mkdir -p target/debian
for crate in sink agent; do
    grep -q '^\[package\.metadata\.deb\]' "$crate/Cargo.toml" ||
        { echo "$crate/Cargo.toml has no [package.metadata.deb] (see packaging/deb/README.md)" >&2; exit 1; }
done
manifests=("$root/sink/Cargo.toml" "$root/agent/Cargo.toml")
for manifest in "${manifests[@]}"; do
    cargo deb --no-build --manifest-path "$manifest" --output "$root/target/debian/"
done
debs=(target/debian/qlog-sink_*.deb target/debian/qlog-agent_*.deb)
ls -l "${debs[@]}"

say "lintian (errors fail the step; warnings are listed)"
lintian_status=0
lintian --tag-display-limit 0 --fail-on error "${debs[@]}" >"$work/lintian.txt" 2>&1 ||
    lintian_status=$?
grep -v 'running with root privileges' "$work/lintian.txt" || true
[ "$lintian_status" -eq 0 ] || fail "lintian reported errors"
echo "lintian: $(grep -c '^E:' "$work/lintian.txt" || true) errors, $(grep -c '^W:' "$work/lintian.txt" || true) warnings"

say "unit exposure (systemd-analyze security --offline)"
exposure() {
    systemd-analyze security --offline=yes "$1" 2>/dev/null |
        sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p'
}
check_exposure() {
    local unit=$1 limit=$2 score
    score=$(exposure "packaging/systemd/$unit")
    [ -n "$score" ] || fail "no exposure score for $unit"
    echo "$unit: $score (limit $limit)"
    awk -v s="$score" -v l="$limit" 'BEGIN { exit !(s <= l) }' || fail "$unit scores $score, over $limit"
}
check_exposure qlogd.service 2.0
check_exposure qlog-agent.service 3.0

say "install"
dpkg -i "${debs[@]}"
for f in /usr/bin/qlogd /usr/bin/qlog /usr/bin/qlog-agent /usr/lib/qlog/qlogd-qubes-config \
    /usr/lib/qlog/qlog-bundle; do
    [ -x "$f" ] || fail "$f is not installed"
done
for f in /etc/qlog/qlogd.toml /usr/lib/systemd/system/qlogd.service \
    /usr/lib/systemd/system/qlog-agent.service /usr/lib/sysusers.d/qlog-sink.conf \
    /usr/lib/tmpfiles.d/qlog-sink.conf /usr/lib/qubes-bind-dirs.d/50_qlog-sink.conf \
    /usr/share/man/man8/qlogd.8.gz /usr/share/man/man1/qlog.1.gz \
    /usr/share/man/man1/qlog-tail.1.gz /usr/share/man/man1/qlog-bundle-verify.1.gz \
    /usr/share/man/man1/qlog-agent.1.gz /usr/share/bash-completion/completions/qlog \
    /usr/share/zsh/vendor-completions/_qlog /usr/share/fish/vendor_completions.d/qlog.fish; do
    [ -f "$f" ] || fail "$f is not installed"
done
getent passwd qlog >/dev/null || fail "the qlog user was not created"
[ "$(stat -c %U:%G:%a /var/lib/qlog)" = "qlog:qlog:750" ] || fail "/var/lib/qlog is not qlog:qlog 0750"
[ "$(readlink /etc/qubes-rpc/qlog.Ingest)" = /run/qlog/ingest.sock ] ||
    fail "/etc/qubes-rpc/qlog.Ingest does not point at /run/qlog/ingest.sock"
dpkg-query -W -f='${Conffiles}\n' qlog-sink | grep -q '/etc/qlog/qlogd.toml' ||
    fail "/etc/qlog/qlogd.toml is not a conffile"
systemctl is-enabled qlogd.service >/dev/null 2>&1 ||
    [ -L /etc/systemd/system/multi-user.target.wants/qlogd.service ] || fail "qlogd.service is not enabled"
echo "installed files, user, store directory, qrexec link and conffile: ok"

say "systemd-analyze verify (installed units)"
systemd-analyze verify /usr/lib/systemd/system/qlogd.service \
    /usr/lib/systemd/system/qlog-agent.service 2>&1 | tee "$work/verify.txt"
if grep -q . "$work/verify.txt"; then
    fail "systemd-analyze verify complained (see above)"
fi
echo "systemd-analyze verify: ok"

say "configuration"
qlogd check-config /etc/qlog/qlogd.toml
# Every key of the shipped example, uncommented, must be valid too.
sed -E 's/^#([a-z_]+ = |\[vm\.|\[health\])/\1/' /etc/qlog/qlogd.toml >"$work/qlogd-all-keys.toml"
grep -q '^vm_quota = ' "$work/qlogd-all-keys.toml" || fail "uncommenting the example failed"
qlogd check-config "$work/qlogd-all-keys.toml"
# The runtime copy, with dom0's expected VMs from a stand-in qubesdb-read.
mkdir -p "$work/fakebin"
cat >"$work/fakebin/qubesdb-read" <<'EOF'
#!/bin/sh
[ "$1" = -q ] && shift
case $1 in
    /vm-config/qlog-expected-vms) echo "sd-app, sd-proxy bad!name" ;;
    *) exit 1 ;;
esac
EOF
chmod +x "$work/fakebin/qubesdb-read"
PATH=$work/fakebin:$PATH /usr/lib/qlog/qlogd-qubes-config /etc/qlog/qlogd.toml "$work/runtime.toml"
qlogd check-config "$work/runtime.toml" | tee "$work/runtime-check.txt"
grep -q 'expected_vms = \["sd-app", "sd-proxy"\]' "$work/runtime-check.txt" ||
    fail "expected VMs from qubesdb did not reach qlogd"

say "smoke test from the installed paths"
# The shipped configuration (as the unit renders it, here without qubesdb),
# state and sockets under a temporary directory, qlogd as the qlog user with
# the groups given as the unit gives them, and sd_notify checked the way
# Type=notify and WatchdogSec= rely on it.
smoke=$work/smoke
mkdir -p "$smoke/state" "$smoke/run" "$smoke/rpc"
chown qlog:qlog "$smoke/state" "$smoke/run"
chmod 0755 "$work" "$smoke"
/usr/lib/qlog/qlogd-qubes-config /etc/qlog/qlogd.toml "$smoke/run/qlogd.toml"
python3 packaging/tests/notify_probe.py "$smoke/notify.sock" "$smoke/notify.log" 30 &
pids+=($!)
for _ in $(seq 50); do [ -S "$smoke/notify.sock" ] && break; sleep 0.1; done
NOTIFY_SOCKET=$smoke/notify.sock WATCHDOG_USEC=2000000 \
    setpriv --reuid=qlog --regid=qlog --init-groups \
    strace -f -qq -o "$smoke/run/qlogd.strace" /usr/bin/qlogd --config "$smoke/run/qlogd.toml" --state-dir "$smoke/state" \
    --ingest-socket "$smoke/run/ingest.sock" --query-socket "$smoke/run/query.sock" \
    --ingest-group qlog --query-group qlog >"$smoke/qlogd.log" 2>&1 &
tracer_pid=$!
pids+=("$tracer_pid")
for _ in $(seq 100); do grep -q 'READY=1' "$smoke/notify.log" 2>/dev/null && break; sleep 0.1; done
grep -q 'READY=1' "$smoke/notify.log" || { cat "$smoke/qlogd.log"; fail "qlogd sent no READY=1"; }
[ "$(stat -c %G:%a "$smoke/run/ingest.sock")" = "qlog:660" ] || fail "ingest socket is not group qlog, 0660"
[ "$(stat -c %G:%a "$smoke/run/query.sock")" = "qlog:660" ] || fail "query socket is not group qlog, 0660"
# Like /etc/qubes-rpc/qlog.Ingest: qrexec (here its double) follows the link.
ln -s "$smoke/run/ingest.sock" "$smoke/rpc/qlog.Ingest"
marker="qlog-packaging-smoke-$$-$RANDOM"
printf '%s one\n%s two\n%s three\n' "$marker" "$marker" "$marker" |
    QREXEC_DOUBLE_SERVICE_DIR=$smoke/rpc QREXEC_DOUBLE_SOURCE_VM=sd-app \
    timeout 60 strace -f -qq -o "$smoke/agent.strace" \
    /usr/bin/qlog-agent --log-vm sd-log --source stdin --qrexec-client "$double"
QLOG_QUERY_SOCKET=$smoke/run/query.sock /usr/bin/qlog tail --no-follow --no-color sd-app |
    tee "$smoke/tail.txt"
[ "$(grep -c "$marker" "$smoke/tail.txt")" -eq 3 ] || fail "qlog tail does not show the three lines"
QLOG_QUERY_SOCKET=$smoke/run/query.sock /usr/bin/qlog vms | tee "$smoke/vms.txt"
grep -q '^sd-app ' "$smoke/vms.txt" || fail "qlog vms does not list sd-app"
# qlog hands the bundle commands to its helper in /usr/lib/qlog (src/helper.rs): an
# error from the bundle reader shows the helper ran.
/usr/bin/qlog bundle verify "$smoke/no-such-bundle.tar.zst" 2>"$smoke/helper.txt" && fail "verify of a missing bundle succeeded"
grep -q '^qlog: cannot open ' "$smoke/helper.txt" || { cat "$smoke/helper.txt"; fail "qlog did not reach its helper qlog-bundle"; }
# Linked as packaging/build-binaries.sh says: static-pie, no program interpreter.
headers=$(readelf -lW /usr/bin/qlog)
grep -q 'DYN (Position-Independent Executable' <<<"$headers" || fail "/usr/bin/qlog is not PIE"
! grep -q 'program interpreter' <<<"$headers" || fail "/usr/bin/qlog is dynamically linked"
for _ in $(seq 40); do grep -q 'WATCHDOG=1' "$smoke/notify.log" && break; sleep 0.1; done
grep -q 'WATCHDOG=1' "$smoke/notify.log" ||
    fail "qlogd sent no WATCHDOG=1 within 2 s of WATCHDOG_USEC=2000000 (the unit sets WatchdogSec=)"
# setpriv became strace, whose one child is qlogd; strace exits with its status.
qlogd_pid=$(ps -o pid= --ppid "$tracer_pid" | tr -d ' ')
[ -n "$qlogd_pid" ] || fail "cannot find qlogd under strace"
kill -TERM "$qlogd_pid"
qlogd_status=0
wait "$tracer_pid" || qlogd_status=$?
[ "$qlogd_status" -eq 0 ] || { cat "$smoke/qlogd.log"; fail "qlogd exited $qlogd_status on SIGTERM"; }
[ ! -e "$smoke/run/ingest.sock" ] || fail "qlogd left its ingest socket behind"
grep -q 'STOPPING=1' "$smoke/notify.log" || fail "qlogd sent no STOPPING=1"
echo "smoke test: ok (notify: $(tr '\n' '|' <"$smoke/notify.log"))"

say "system calls against the units' SystemCallFilter="
python3 packaging/tests/check_syscalls.py /usr/lib/systemd/system/qlogd.service \
    "$smoke/run/qlogd.strace"
python3 packaging/tests/check_syscalls.py /usr/lib/systemd/system/qlog-agent.service \
    "$smoke/agent.strace" --exclude-exec "$double"
# journalctl runs under the agent's filter too; started as the agent starts it
# (this machine's journal may be empty, so this covers its start-up and wait).
timeout 3 strace -f -qq -o "$smoke/journalctl.strace" \
    journalctl --output=export --follow --all --boot >/dev/null 2>&1 || true
python3 packaging/tests/check_syscalls.py /usr/lib/systemd/system/qlog-agent.service \
    "$smoke/journalctl.strace"

say "Salt states, policy and helper tests"
python3 -m pytest -q packaging/tests

say "remove"
purge_packages
for f in /usr/bin/qlogd /usr/bin/qlog /usr/bin/qlog-agent /etc/qlog/qlogd.toml \
    /etc/qubes-rpc/qlog.Ingest /usr/lib/systemd/system/qlogd.service; do
    [ ! -e "$f" ] && [ ! -L "$f" ] || fail "$f is still there after purge"
done
echo "purge: ok"
