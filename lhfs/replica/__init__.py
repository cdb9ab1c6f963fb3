"""The replica process: a chunk store served over the wire protocol (``server``), and the
child process an engine, a test or a benchmark starts to run one (``process``)."""
