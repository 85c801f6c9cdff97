# -*- coding: utf-8 -*-
# vim: set syntax=yaml ts=2 sw=2 sts=2 et :
#
# The source VMs. In dom0, for each VM in `sources`: the qlog-source tag (the
# policy lets tagged VMs call qlog.Ingest), the qlog-agent service flag (the
# unit starts only where it is on), and vm-config.qlog-log-vm, the log qube's
# name, which the agent reads from qubesdb. In a template listed in
# `source_templates` (--targets=TEMPLATE): the qlog-agent package.

{% from "qlog/defaults.jinja" import qlog with context %}

{% if grains['id'] == 'dom0' %}
{% for vm in qlog.sources %}
qlog-source-{{ vm }}-tag:
  qvm.tags:
    - name: {{ vm }}
    - add:
      - qlog-source

qlog-source-{{ vm }}-features:
  qvm.features:
    - name: {{ vm }}
    - enable:
      - service.qlog-agent
    - set:
      - vm-config.qlog-log-vm: {{ qlog.log_vm.name }}
{% endfor %}

{% elif grains['id'] in qlog.source_templates and qlog.install_packages %}
qlog-agent-package:
  pkg.installed:
    - name: qlog-agent
{% endif %}
