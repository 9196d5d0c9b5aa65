"""Sub-commands of the ``spach`` CLI; each module exposes ``add_arguments(parser)`` and ``run(args)``."""
