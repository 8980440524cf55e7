"""Defending a model given as files: the reusable function behind `fineprune defend`.

`defend_files(DefendJob(...))` loads an untrusted model file and the defender's data files, runs
the defense, and writes the outputs (weights, metadata, metrics, curves, HTML report).
"""
from .defend_files import DefendFilesResult, defend_files
from .job import DefendJob

__all__ = ["DefendFilesResult", "DefendJob", "defend_files"]
