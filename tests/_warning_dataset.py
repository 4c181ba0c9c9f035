"""A dataset that issues a warning cl-hres filters (importing no cl-hres: see test_loaders)."""

import warnings


class WarningDataset:
    def __len__(self):
        return 2

    def __getitem__(self, i):
        warnings.warn_explicit(
            "no QP solver found", UserWarning, "qpsolvers.py", 1, module="qpsolvers"
        )
        return i
