"""FedPipe's planning machinery (Flower-free; design and formulas in docs/fedpipe.md). Import from the module
that owns a name:

- ``profiles``: hardware profiles (``conf/client``), detection of this machine, assignment to clients;
- ``memory``: :class:`ModelSpec` (a model's shapes) and the memory model (:func:`predict_memory`);
- ``measure``: measured peak memory of a training step, calibration of the activation line;
- ``importance``: importance scores of weight matrices, their aggregation, module selection;
- ``timing``: the time model (compute and transfer seconds per round);
- ``plan``: the MILP that gives every client a (rank, batch, bits), and its brute-force check;
- ``planning``: the planning inputs read from a composed config (used by ``strategies/fedpipe.py``).
"""
