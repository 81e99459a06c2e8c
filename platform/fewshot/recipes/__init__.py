"""Whole workflows behind one command, each a module with its configs beside it as
package data: omniglot.py (`fewshot omniglot`, the headline model)."""
