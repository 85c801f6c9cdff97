"""The packaging files agree with each other.

The same facts appear in several files (a path in a unit and in the package's
asset list, the snippet in packaging/deb/README.md and in the .toml beside it);
these tests catch one copy changing without the other.
"""

import re
import tomllib
from pathlib import Path

PACKAGING = Path(__file__).resolve().parent.parent
DEB = PACKAGING / "deb"


def metadata(name):
    return tomllib.loads((DEB / f"{name}.toml").read_text())["package"]["metadata"]["deb"]


def asset_destinations(name):
    dests = []
    for asset in metadata(name)["assets"]:
        source, dest = (asset["source"], asset["dest"]) if isinstance(asset, dict) else asset[:2]
        dests.append("/" + (dest + Path(source).name if dest.endswith("/") else dest))
    return dests


def test_readme_carries_both_snippets_verbatim():
    readme = (DEB / "README.md").read_text()
    for name in ("qlog-sink", "qlog-agent"):
        assert (DEB / f"{name}.toml").read_text() in readme, f"{name}.toml drifted from README.md"


def test_asset_sources_in_the_repository_exist():
    for name in ("qlog-sink", "qlog-agent"):
        for asset in metadata(name)["assets"]:
            source = asset["source"] if isinstance(asset, dict) else asset[0]
            if source.startswith("target/") or "/build/" in source:
                continue  # built by cargo or by gen-assets.sh
            assert (PACKAGING.parent / "sink" / source).resolve().exists(), source
        assert (PACKAGING.parent / "sink" / metadata(name)["maintainer-scripts"]).is_dir()


def test_units_run_what_the_packages_install():
    for unit, package in (("qlogd.service", "qlog-sink"), ("qlog-agent.service", "qlog-agent")):
        text = (PACKAGING / "systemd" / unit).read_text()
        installed = asset_destinations(package)
        for line in re.findall(r"^Exec\w+=[+-]*(\S+)", text, re.M):
            assert line in installed, f"{unit} runs {line}, which {package} does not install"
        assert metadata(package)["systemd-units"]["unit-name"] == unit.removesuffix(".service")


def test_the_qrexec_link_points_at_qlogds_default_ingest_socket():
    tmpfiles = (PACKAGING / "tmpfiles.d" / "qlog-sink.conf").read_text()
    link = re.search(r"^L\s+/etc/qubes-rpc/qlog\.Ingest\s+(?:\S+\s+){4}(\S+)", tmpfiles, re.M)
    assert link and link.group(1) == "/run/qlog/ingest.sock"
    assert '#ingest_socket = "/run/qlog/ingest.sock"' in (PACKAGING / "qlogd.toml").read_text()
    unit = (PACKAGING / "systemd" / "qlogd.service").read_text()
    assert "RuntimeDirectory=qlog\n" in unit


def test_one_user_everywhere():
    sysusers = (PACKAGING / "sysusers.d" / "qlog-sink.conf").read_text()
    assert re.search(r"^u\s+qlog\s", sysusers, re.M)
    assert re.search(r"^d\s+/var/lib/qlog\s+0750\s+qlog\s+qlog", (PACKAGING / "tmpfiles.d" / "qlog-sink.conf").read_text(), re.M)
    unit = (PACKAGING / "systemd" / "qlogd.service").read_text()
    assert "User=qlog\n" in unit and "StateDirectory=qlog\n" in unit
    assert "binds+=( '/var/lib/qlog' )" in (PACKAGING / "qubes" / "50_qlog-sink.conf").read_text()


def test_agent_unit_keeps_dev_xen_visible():
    unit = (PACKAGING / "systemd" / "qlog-agent.service").read_text()
    assert not re.search(r"^PrivateDevices=(yes|true|1)", unit, re.M)
    assert "ConditionPathExists=/run/qubes-service/qlog-agent" in unit
    assert "After=" in unit and "qubes-qrexec-agent.service" in unit
    assert "KillMode=mixed" in unit
    for node in ("evtchn", "gntdev", "gntalloc", "privcmd", "xenbus"):
        assert f"DeviceAllow=/dev/xen/{node} rw" in unit
