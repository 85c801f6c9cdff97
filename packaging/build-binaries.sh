#!/usr/bin/env bash
# Builds the binaries the Debian packages ship, linked as they ship them: qlogd, qlog and
# qlog-bundle in target/release, qlog-agent in target/release-agent. The packaging test
# (packaging/ci.sh) and the benchmarks (qlog-bench) use these builds.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p qlog-sink -p qlog --bins
# qlog is started for every tail and query, and a tail answers in a few milliseconds, so
# its start-up is a large part of the answer: a static-pie qlog starts without the
# dynamic loader's work (mapping libc, libm and libgcc_s, binding their symbols),
# which measured as about a third of `qlog tail -n 100`. It stays position-independent,
# so ASLR still applies. qlog uses no part of glibc that loads code at run time (NSS,
# iconv, dlopen): it reads /etc/group itself. Cargo has no per-binary flags, so this
# links that one binary again with crt-static after the build above, which it reuses.
cargo rustc --release -p qlog --bin qlog -- -C target-feature=+crt-static
cargo build --profile release-agent -p qlog-agent
