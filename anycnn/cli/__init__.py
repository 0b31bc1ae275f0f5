"""The ``anycnn`` command: :func:`~anycnn.cli.commands.main` assembles the parser from one module
per command (``train``, ``evaluate``, ``predict``, ``info``, ``plot_command``, ``summary``,
``export``, ``bench``; each has ``HELP``, ``add_arguments`` and ``run``), with shared helpers in
:mod:`~anycnn.cli.common`, image folders in :mod:`~anycnn.cli.folders`, ``train``'s resume and
processes in :mod:`~anycnn.cli.resume` and :mod:`~anycnn.cli.launch`, and the pictures in
:mod:`~anycnn.cli.plot`. Importing it loads no array library: the command tunes NumPy's BLAS
before NumPy loads."""
