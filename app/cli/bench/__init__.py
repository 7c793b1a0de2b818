"""``sluice bench``: a load tester for Sluice and for any OpenAI-compatible endpoint.

Modules: :mod:`~app.cli.bench.cli` (the click command), :mod:`~app.cli.bench.config`
(steps, SLOs), :mod:`~app.cli.bench.prompts`, :mod:`~app.cli.bench.record` (per-request
measurement), :mod:`~app.cli.bench.sluice_client` and :mod:`~app.cli.bench.direct_client`
(the two targets; the direct one streams with the official ``openai`` SDK),
:mod:`~app.cli.bench.load` (load modes), :mod:`~app.cli.bench.runner`
(steps, comparison, sweeps), :mod:`~app.cli.bench.stack` and :mod:`~app.cli.bench.cpu`
(a private Sluice and its CPU accounting), :mod:`~app.cli.bench.stats`,
:mod:`~app.cli.bench.output` and :mod:`~app.cli.bench.html` (results), and
:mod:`~app.cli.bench.scale` (``sluice bench-scale``: a matrix of private stacks).
"""
