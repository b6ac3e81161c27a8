"""The tools around the library: the command line, the benchmark, training, the toy tasks, the
install check and the README generator. The library (``backend``, ``validate``, ``registry``,
``nn``, ``attention``, ``layers``, ``models``) never imports from here."""
