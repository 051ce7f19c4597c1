"""A method added the way the README says a new one is: one file (``gaussian_fit.py``) and one
YAML (``gaussian_fit.yaml``), touching nothing in ``src/``. The conformance suite runs it like
every shipped config."""
