# -*- coding: utf-8 -*-
# vim: set syntax=yaml ts=2 sw=2 sts=2 et :
#
# The log qube. In dom0: its template (cloned if `log_vm.clone_from` is set),
# the qube itself (no network, started at boot), the qlogd service flag, and
# the list of VMs expected to log, as the feature vm-config.qlog-expected-vms
# (qlogd.service turns it into expected_vms at every start). In the template
# (--targets=TEMPLATE): the qlog-sink package, and the operator's user in
# group qlog so `qlog` can query without sudo.

{% from "qlog/defaults.jinja" import qlog with context %}
{% set log_vm = qlog.log_vm %}

{% if grains['id'] == 'dom0' %}
{% if log_vm.clone_from %}
qlog-sink-template:
  qvm.clone:
    - name: {{ log_vm.template }}
    - source: {{ log_vm.clone_from }}
{% endif %}

qlog-log-vm:
  qvm.vm:
    - name: {{ log_vm.name }}
    - present:
      # Only when the qube is created; `prefs` below is enforced every run.
      - template: {{ log_vm.template }}
      - label: {{ log_vm.label }}
    - prefs:
      - template: {{ log_vm.template }}
      - netvm: ""
      - default_dispvm: ""
      - autostart: {{ log_vm.autostart }}
      - include_in_backups: true
    - features:
      - enable:
        - service.qlogd
      - set:
        - vm-config.qlog-expected-vms: "{{ qlog.sources | join(' ') }}"
{% if log_vm.clone_from %}
    - require:
      - qvm: qlog-sink-template
{% endif %}

{% if log_vm.private_size_gib %}
# The store lives on the private volume (bind-dirs); size it for the logs.
qlog-log-vm-private-size:
  cmd.run:
    - name: qvm-volume resize {{ log_vm.name }}:private {{ log_vm.private_size_gib }}GiB
    - unless: test "$(qvm-volume info {{ log_vm.name }}:private size)" -ge {{ log_vm.private_size_gib * 1024 * 1024 * 1024 }}
    - require:
      - qvm: qlog-log-vm
{% endif %}

{% elif grains['id'] == log_vm.template %}
{% if qlog.install_packages %}
qlog-sink-package:
  pkg.installed:
    - name: qlog-sink
{% endif %}

qlog-operator-group:
  group.present:
    - name: qlog
    - addusers:
      - {{ qlog.operator_user }}
{% if qlog.install_packages %}
    - require:
      - pkg: qlog-sink-package
{% endif %}
{% endif %}
