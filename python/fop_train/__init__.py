"""fop_train: the `fop-train` application (time-to-accuracy studies), apart from the `fop` library.

`fop_train.cli` (the command line and the training loop), `fop_train.data` (datasets: sklearn's digits, MNIST from
IDX files), `fop_train.models` (the study models), `fop_train.report` (tables and plots). `fop` imports none of it.
"""
