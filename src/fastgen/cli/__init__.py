"""The ``fastgen`` command line (see ``fastgen --help``)."""
