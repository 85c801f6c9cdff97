"""qlogd-qubes-config: the runtime configuration qlogd.service starts qlogd with.

The script runs with a stand-in `qubesdb-read` on PATH playing the log qube's
qubesdb, so dom0's feature vm-config.qlog-expected-vms can be anything a test
needs, including hostile values. Only the shell script is exercised here;
`packaging/ci.sh` also runs `qlogd check-config` on its output.
"""

import os
import stat
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "qubes" / "qlogd-qubes-config"
SHIPPED = Path(__file__).resolve().parent.parent / "qlogd.toml"


@pytest.fixture
def run(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()

    def run(source_text, qubesdb=None, persistence=None):
        keys = {}
        if qubesdb is not None:
            keys["/vm-config/qlog-expected-vms"] = qubesdb
        if persistence is not None:
            keys["/qubes-vm-persistence"] = persistence
        fake = bin_dir / "qubesdb-read"
        cases = "".join(f"    {k}) printf '%s\\n' '{v}' ;;\n" for k, v in keys.items())
        fake.write_text(f'#!/bin/sh\n[ "$1" = -q ] && shift\ncase $1 in\n{cases}    *) exit 1 ;;\nesac\n')
        fake.chmod(0o755)
        source = tmp_path / "qlogd.toml"
        if source_text is not None:
            source.write_text(source_text)
        dest = tmp_path / "run" / "qlogd.toml"
        dest.parent.mkdir(exist_ok=True)
        env = dict(os.environ, PATH=f"{bin_dir}:/usr/bin:/bin")
        result = subprocess.run([str(SCRIPT), str(source), str(dest)], env=env,
                                capture_output=True, text=True, check=True)
        return dest, result.stderr

    return run


def test_expected_vms_from_dom0_come_first_then_the_file(run):
    dest, _ = run('retention_days = 7\n[vm.sd-app]\nquota = "2GiB"\n', qubesdb="sd-app sd-proxy")
    text = dest.read_text()
    assert 'expected_vms = ["sd-app", "sd-proxy"]' in text
    # Top-level key before the file's tables, or TOML would put it in [vm.sd-app].
    assert text.index("expected_vms") < text.index("[vm.sd-app]")
    assert text.endswith('retention_days = 7\n[vm.sd-app]\nquota = "2GiB"\n')


def test_commas_and_extra_spaces_separate_names_too(run):
    dest, _ = run("", qubesdb="sd-app,sd-proxy ,  sys-usb")
    assert 'expected_vms = ["sd-app", "sd-proxy", "sys-usb"]' in dest.read_text()


def test_hostile_names_never_reach_the_toml(run):
    dest, err = run("", qubesdb='sd-app evil"] x=1 0bad ' + "a" * 32)
    text = dest.read_text()
    assert 'expected_vms = ["sd-app", "x"]' not in text
    line = [l for l in text.splitlines() if l.startswith("expected_vms")][0]
    assert line == 'expected_vms = ["sd-app"]', line
    assert "invalid VM name" in err


def test_a_star_is_not_expanded_into_file_names(run, tmp_path, monkeypatch):
    (tmp_path / "looks-like-a-vm").mkdir()
    monkeypatch.chdir(tmp_path)
    dest, err = run("", qubesdb="* sd-app")
    line = [l for l in dest.read_text().splitlines() if l.startswith("expected_vms")][0]
    assert line == 'expected_vms = ["sd-app"]', line
    assert "invalid VM name '*'" in err


def test_the_file_wins_over_dom0(run):
    dest, err = run('expected_vms = ["local"]\n', qubesdb="sd-app")
    text = dest.read_text()
    assert text.count("expected_vms") == 1
    assert 'expected_vms = ["local"]' in text
    assert "ignoring vm-config.qlog-expected-vms" in err


def test_without_qubesdb_or_feature_it_is_a_copy(run):
    dest, err = run(SHIPPED.read_text())
    assert "expected_vms = [" not in dest.read_text().split("# /etc/qlog")[0]
    assert dest.read_text().endswith(SHIPPED.read_text())
    assert err == ""


def test_missing_source_gives_an_empty_configuration(run, tmp_path):
    dest, _ = run(None, qubesdb="sd-app")
    assert 'expected_vms = ["sd-app"]' in dest.read_text()


def test_result_is_world_readable_and_no_temporary_file_is_left(run):
    dest, _ = run("", qubesdb="sd-app")
    assert stat.S_IMODE(dest.stat().st_mode) == 0o644
    assert [p.name for p in dest.parent.iterdir()] == ["qlogd.toml"]


def test_warns_when_an_app_qube_store_is_not_persistent(run):
    # /var/lib/qlog is not a mount point on a test machine.
    _, err = run("", persistence="rw-only")
    assert "lost at shutdown" in err
    _, err = run("", persistence="full")
    assert "lost at shutdown" not in err
