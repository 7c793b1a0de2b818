"""``sluice bench``: a load tester for Sluice and for any OpenAI-compatible endpoint.

Modules: :mod:`~app.bench.cli` (the click command), :mod:`~app.bench.config`
(steps, SLOs), :mod:`~app.bench.prompts`, :mod:`~app.bench.record` (per-request
measurement), :mod:`~app.bench.sluice_client` and :mod:`~app.bench.direct_client`
(the two targets; the direct one streams with the official ``openai`` SDK),
:mod:`~app.bench.load` (load modes), :mod:`~app.bench.runner`
(steps, comparison, sweeps), :mod:`~app.bench.stack` and :mod:`~app.bench.cpu`
(a private Sluice and its CPU accounting), :mod:`~app.bench.stats`,
:mod:`~app.bench.output` and :mod:`~app.bench.html` (results).
"""
