"""The ``anycnn`` command (:mod:`~anycnn.cli.commands`) and its parts: image data and ``predict``
(:mod:`~anycnn.cli.predict`), ``bench`` (:mod:`~anycnn.cli.bench`), ``plot``
(:mod:`~anycnn.cli.plot`). Importing it loads no array library: the command tunes NumPy's BLAS
before NumPy loads."""
