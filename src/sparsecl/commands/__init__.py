"""The commands of ``sparsecl`` (``sparsecl.cli``), one module each, imported when used."""
