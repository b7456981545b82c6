"""seqtrain: train, evaluate and use recurrent sentiment classifiers from a YAML file."""

__version__ = "0.1.0"
