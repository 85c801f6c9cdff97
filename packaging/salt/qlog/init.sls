# -*- coding: utf-8 -*-
# vim: set syntax=yaml ts=2 sw=2 sts=2 et :
#
# qlog in dom0: the qrexec policy for qlog.Ingest, the log qube (qlog.sink)
# and the source VMs (qlog.sources). Apply with
#   sudo qubesctl state.apply qlog
# then install the packages in the templates with
#   sudo qubesctl --skip-dom0 --targets=TEMPLATES state.apply qlog.sink  (or qlog.sources)
# or enable the top file (qubesctl top.enable qlog) and run state.highstate.

{% from "qlog/defaults.jinja" import qlog with context %}

include:
  - qlog.sink
  - qlog.sources

{% if grains['id'] == 'dom0' %}
# Tagged sources may call qlog.Ingest in the log qube, and nothing else may.
# The log qube's name is filled in here; qubes-policy-lint (Qubes 4.2 and
# later) checks the result before it replaces the file, because a policy file
# that does not parse makes every qrexec call fail.
qlog-policy:
  file.managed:
    - name: /etc/qubes/policy.d/50-qlog.policy
    - source: salt://qlog/files/50-qlog.policy
    - template: jinja
    - context:
        log_vm: {{ qlog.log_vm.name }}
    - user: root
    - group: root
    - mode: '0644'
    - check_cmd: /bin/sh -c 'if command -v qubes-policy-lint >/dev/null 2>&1; then exec qubes-policy-lint "$0"; fi'
{% endif %}
