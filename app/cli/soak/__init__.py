"""Chaos and soak tooling: streams that reconnect and resume, a process killer, Redis audits.

``sluice soak`` runs hours-long load on a private stack and watches memory;
``tests/test_chaos.py`` kills processes under load with the same parts.
"""
