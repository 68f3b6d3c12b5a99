"""``aioblock benchmark``: a concurrency benchmarking harness comparing aioblock with QEMU's and fio's tools.

A *suite* (TOML, ``suite.py``) names workloads, the aioblock targets (engine x event loop) and the peers
(``qemu-img bench``, fio); it expands into *cells* (workload x format x block size x depth x cache x location).
``runner.py`` runs every target of every cell once per repetition, alternating them on the same image
(``images.py``), each as a child process (``child.py``) whose command line and output ``targets.py`` knows;
``results.py`` turns the repetitions into records (medians, spread, ratios against the peers) and compares
two runs; ``report.py`` prints markdown tables, ``plots.py`` draws PNGs, ``machine.py`` describes the host,
``latency.py`` holds the HDR latency histograms.

Nothing here is imported by the block layer itself; the CLI (``aioblock/cli/benchmark.py``) imports the
modules it needs when the command runs.
"""
