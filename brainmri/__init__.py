"""brainmri: distributed training of brain-MRI tumour classifiers on Ray."""

__version__ = "0.1.0"
