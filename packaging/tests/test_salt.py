"""The qlog Salt states and the qrexec policy, rendered as Salt would render them.

Every state is rendered with Jinja, the way Salt's default renderer (jinja|yaml)
does, for each kind of minion it meets in Qubes: dom0, the log qube's template,
a source VM's template and an unrelated qube, with the example pillar and with
none. The YAML is parsed and the resources that matter are checked: the log
qube with no network, the tags, service flags and features, the packages in
the templates, and the policy, which is also parsed line by line with the
rules of qrexec's policy syntax and evaluated for the calls that matter.

Runs with `python3 -m pytest packaging/tests` (needs jinja2 and pyyaml).
"""

import copy
import re
from pathlib import Path

import jinja2
import pytest
import yaml

PACKAGING = Path(__file__).resolve().parent.parent
SALT = PACKAGING / "salt"
POLICY = PACKAGING / "dom0" / "50-qlog.policy"
SPEC = PACKAGING / "dom0" / "qlog-dom0.spec"
PILLAR = yaml.safe_load((SALT / "pillar.example").read_text())

DOM0 = "dom0"
SINK_TEMPLATE = PILLAR["qlog"]["log_vm"]["template"]
SOURCE_TEMPLATE = PILLAR["qlog"]["source_templates"][0]


# Salt's Jinja context: `salt` (execution modules), `grains` and `pillar`.


def deep_merge(base, override):
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def salt_functions(pillar):
    def pillar_get(key, default="", merge=False, delimiter=":"):
        value = pillar
        for part in key.split(delimiter):
            if not isinstance(value, dict) or part not in value:
                return default
            value = value[part]
        if merge and isinstance(value, dict) and isinstance(default, dict):
            return deep_merge(default, value)
        return value

    return {"pillar.get": pillar_get}


def render(path, minion, pillar):
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(SALT)), undefined=jinja2.StrictUndefined)
    template = env.get_template(path)
    text = template.render(salt=salt_functions(pillar), grains={"id": minion}, pillar=pillar)
    return text, (yaml.safe_load(text) or {})


def args(state_body):
    """A state's `- key: value` list as a dict (the first function key skipped)."""
    [(function, items)] = state_body.items()
    out = {}
    for item in items:
        out.update(item)
    return function, out


def flat(items):
    """A `- key: value` list (as in qvm.vm's sections) as a dict."""
    out = {}
    for item in items:
        out.update(item)
    return out


# dom0: the log qube and the sources.


def test_dom0_log_qube_has_no_network_starts_at_boot_and_runs_qlogd():
    _, states = render("qlog/sink.sls", DOM0, PILLAR)
    function, vm = args(states["qlog-log-vm"])
    assert function == "qvm.vm"
    assert vm["name"] == "sd-log"
    present, prefs = flat(vm["present"]), flat(vm["prefs"])
    assert present["template"] == SINK_TEMPLATE == prefs["template"]
    assert prefs["netvm"] == "", "the log qube must have no network (netvm empty string)"
    assert prefs["default_dispvm"] == ""
    assert prefs["autostart"] is True
    features = flat(vm["features"])
    assert "service.qlogd" in features["enable"]
    expected = flat(features["set"])["vm-config.qlog-expected-vms"]
    assert expected.split() == PILLAR["qlog"]["sources"]
    assert vm["require"] == [{"qvm": "qlog-sink-template"}]


def test_dom0_clones_the_template_and_sizes_the_private_volume_when_asked():
    _, states = render("qlog/sink.sls", DOM0, PILLAR)
    function, clone = args(states["qlog-sink-template"])
    assert (function, clone["name"], clone["source"]) == (
        "qvm.clone", SINK_TEMPLATE, "debian-12-minimal")
    function, resize = args(states["qlog-log-vm-private-size"])
    assert function == "cmd.run"
    assert resize["name"] == "qvm-volume resize sd-log:private 20GiB"
    assert str(20 * 1024**3) in resize["unless"]


def test_dom0_sources_are_tagged_flagged_and_told_the_log_qube():
    _, states = render("qlog/sources.sls", DOM0, PILLAR)
    for vm in PILLAR["qlog"]["sources"]:
        function, tags = args(states[f"qlog-source-{vm}-tag"])
        assert (function, tags["name"], tags["add"]) == ("qvm.tags", vm, ["qlog-source"])
        function, features = args(states[f"qlog-source-{vm}-features"])
        assert function == "qvm.features"
        assert features["name"] == vm
        assert features["enable"] == ["service.qlog-agent"]
        assert flat(features["set"]) == {"vm-config.qlog-log-vm": "sd-log"}


def test_dom0_init_installs_the_policy_checked_and_includes_the_rest():
    _, states = render("qlog/init.sls", DOM0, PILLAR)
    assert states["include"] == ["qlog.sink", "qlog.sources"]
    function, policy = args(states["qlog-policy"])
    assert function == "file.managed"
    assert policy["name"] == "/etc/qubes/policy.d/50-qlog.policy"
    assert policy["source"] == "salt://qlog/files/50-qlog.policy"
    assert policy["template"] == "jinja"
    assert policy["context"] == {"log_vm": "sd-log"}
    assert "qubes-policy-lint" in policy["check_cmd"]
    # The policy template exists where the RPM puts the source (same file).
    assert "files/50-qlog.policy" in SPEC.read_text()


def test_defaults_apply_without_a_pillar():
    _, states = render("qlog/sink.sls", DOM0, {})
    _, vm = args(states["qlog-log-vm"])
    assert vm["name"] == "sd-log"
    assert flat(vm["prefs"])["netvm"] == ""
    assert "qlog-sink-template" not in states, "no clone unless clone_from is set"
    assert "qlog-log-vm-private-size" not in states
    _, sources = render("qlog/sources.sls", DOM0, {})
    assert sources == {}


def test_another_log_qube_name_reaches_every_state():
    pillar = deep_merge(PILLAR, {"qlog": {"log_vm": {"name": "sys-log"}}})
    _, sink = render("qlog/sink.sls", DOM0, pillar)
    assert args(sink["qlog-log-vm"])[1]["name"] == "sys-log"
    _, sources = render("qlog/sources.sls", DOM0, pillar)
    _, features = args(sources["qlog-source-sd-app-features"])
    assert flat(features["set"]) == {"vm-config.qlog-log-vm": "sys-log"}
    _, init = render("qlog/init.sls", DOM0, pillar)
    assert args(init["qlog-policy"])[1]["context"] == {"log_vm": "sys-log"}


# Templates and other qubes.


def test_log_template_gets_qlog_sink_and_the_operator_in_group_qlog():
    _, states = render("qlog/sink.sls", SINK_TEMPLATE, PILLAR)
    assert args(states["qlog-sink-package"]) == ("pkg.installed", {"name": "qlog-sink"})
    function, group = args(states["qlog-operator-group"])
    assert (function, group["name"], group["addusers"]) == ("group.present", "qlog", ["user"])
    assert group["require"] == [{"pkg": "qlog-sink-package"}]
    assert "qlog-log-vm" not in states, "qvm states run in dom0 only"


def test_source_template_gets_qlog_agent_only():
    _, states = render("qlog/sources.sls", SOURCE_TEMPLATE, PILLAR)
    assert states == {"qlog-agent-package": {"pkg.installed": [{"name": "qlog-agent"}]}}
    _, states = render("qlog/sink.sls", SOURCE_TEMPLATE, PILLAR)
    assert states == {}


def test_install_packages_false_leaves_packages_alone():
    pillar = deep_merge(PILLAR, {"qlog": {"install_packages": False}})
    _, sink = render("qlog/sink.sls", SINK_TEMPLATE, pillar)
    assert "qlog-sink-package" not in sink
    assert "require" not in args(sink["qlog-operator-group"])[1]
    _, sources = render("qlog/sources.sls", SOURCE_TEMPLATE, pillar)
    assert sources == {}


@pytest.mark.parametrize("sls", ["qlog/init.sls", "qlog/sink.sls", "qlog/sources.sls"])
def test_unrelated_qube_gets_nothing_but_the_includes(sls):
    _, states = render(sls, "sd-app", PILLAR)
    states.pop("include", None)
    assert states == {}


def test_top_file_targets_dom0_and_the_templates():
    _, top = render("qlog.top", DOM0, PILLAR)
    base = top["base"]
    assert base["dom0"] == [{"match": "nodegroup"}, "qlog"]
    assert base[SINK_TEMPLATE] == ["qlog.sink"]
    assert base[SOURCE_TEMPLATE] == ["qlog.sources"]


def test_pillar_example_uses_only_known_keys():
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(SALT)))
    module = env.get_template("qlog/defaults.jinja").make_module(
        {"salt": salt_functions({}), "grains": {"id": DOM0}})
    defaults = module.qlog
    assert set(PILLAR["qlog"]) <= set(defaults)
    assert set(PILLAR["qlog"]["log_vm"]) <= set(defaults["log_vm"])


# The qrexec policy.

SOURCE_TOKENS = re.compile(r"^(@anyvm|@tag:[A-Za-z0-9_-]+|@type:[A-Za-z]+|[a-zA-Z][a-zA-Z0-9_-]{0,30})$")
TARGET_TOKENS = re.compile(
    r"^(@anyvm|@adminvm|@default|@dispvm|@dispvm:\S+|@tag:[A-Za-z0-9_-]+|@type:[A-Za-z]+"
    r"|[a-zA-Z][a-zA-Z0-9_-]{0,30})$")
PARAMS = {
    "allow": {"target", "user", "notify", "autostart"},
    "ask": {"target", "default_target", "user", "notify", "autostart"},
    "deny": {"notify"},
}


def policy_rules(log_vm):
    text = jinja2.Template(POLICY.read_text(), undefined=jinja2.StrictUndefined).render(log_vm=log_vm)
    rules = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        service, argument, source, target, action, *params = line.split()
        where = f"50-qlog.policy:{number}"
        assert re.fullmatch(r"[A-Za-z0-9_.-]+", service), where
        assert argument == "*" or argument.startswith("+"), where
        assert SOURCE_TOKENS.match(source), f"{where}: bad source {source}"
        assert TARGET_TOKENS.match(target), f"{where}: bad target {target}"
        assert action in PARAMS, f"{where}: bad action {action}"
        parsed = dict(p.split("=", 1) for p in params)
        assert set(parsed) <= PARAMS[action], f"{where}: bad parameters {params}"
        if "notify" in parsed:
            assert parsed["notify"] in ("yes", "no"), where
        if "target" in parsed:
            assert TARGET_TOKENS.match(parsed["target"]), where
        rules.append((service, source, target, action, parsed))
    return rules


def decide(rules, source, source_tags, target):
    """First matching rule wins; no match is a deny (qrexec's semantics)."""
    def matches(token, vm, tags):
        if token == "@anyvm":
            return vm != "dom0" and vm != "@adminvm"
        if token.startswith("@tag:"):
            return token[5:] in tags
        return token == vm

    for service, src, tgt, action, params in rules:
        if service != "qlog.Ingest":
            continue
        if matches(src, source, source_tags) and matches(tgt, target, ()):
            return action, params
    return "deny", {}


def test_policy_parses_with_qrexec_syntax_and_names_only_the_log_qube():
    rules = policy_rules("sd-log")
    assert {r[0] for r in rules} == {"qlog.Ingest"}
    assert rules[-1][1:4] == ("@anyvm", "@anyvm", "deny"), "the file ends in a catch-all deny"


@pytest.mark.parametrize("source,tags,target,expected", [
    ("sd-app", {"qlog-source"}, "sd-log", ("allow", {})),
    ("sd-app", {"qlog-source"}, "@default", ("allow", {"target": "sd-log"})),
    ("sd-app", {"qlog-source"}, "sd-proxy", ("deny", {})),
    ("untagged", set(), "sd-log", ("deny", {})),
    ("untagged", set(), "@default", ("deny", {})),
    ("sd-log", {"qlog-source"}, "sd-log", ("deny", {"notify": "no"})),
    ("sd-log", set(), "@default", ("deny", {"notify": "no"})),
])
def test_policy_decides_the_calls_that_matter(source, tags, target, expected):
    assert decide(policy_rules("sd-log"), source, tags, target) == expected


def test_rpm_substitution_leaves_no_placeholder():
    # The spec's %build runs: sed -e 's/{{ log_vm }}/sd-log/g'
    assert "sed -e 's/{{ log_vm }}/sd-log/g'" in SPEC.read_text()
    rendered = POLICY.read_text().replace("{{ log_vm }}", "sd-log")
    assert "{{" not in rendered and "{%" not in rendered
    # Salt keeps a template's trailing newline, as keep_trailing_newline does.
    salt_rendered = jinja2.Template(POLICY.read_text(), keep_trailing_newline=True)
    assert rendered == salt_rendered.render(log_vm="sd-log")
