"""python -m glmv"""
from .cli import entry

entry()
