"""Tuning a prompt: the training loop (``train``), what a run is asked and reports (``config``),
starting rows (``init``), checkpoints and resume (``checkpoint``), data-parallel runs
(``distributed``), and the model card a trained adapter folder carries (``card``)."""
